#!/usr/bin/env bash
# Every GPU check of the training and map benchmarks in one run (about 6 minutes on one H100), for a lent GPU
# machine without network: packages missing there travel as wheels in .whl/ (see docs/benchmarks.md; the
# image lacks soundfile+cffi+pycparser, soxr, rasterio+affine+cligj+click-plugins, zarr+numcodecs+donfig+
# google-crc32c, jsonargparse+docstring_parser+typeshed_client, webdataset+braceexpand).
# Results go to $OUT (or ./gpu-results) as one text file per benchmark. SKIP_FUSION=0 adds the fusion run,
# SKIP_TESTS=1 drops the GPU tests; INDEX_COMPILE lists the torch.compile modes the index run times;
# the training run times the whole model and loss compiled (`--model.compile all`); TRAIN_COMPILE_ENCODERS=1
# adds the encoders-only compile (another ~3 minutes of compiling: give TRAIN_TIMEOUT=500 then).
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc;
  python3 -c "import torch, transformers, timm, lightning; print(torch.__version__, transformers.__version__, timm.__version__, lightning.__version__)"; } 2>&1 | tee "$OUT/env.txt"
# The GPU-only tests (CLAP features and the map index's device transforms against the CPU), if pytest is there.
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_map_index.py tests/test_audio.py -k "gpu or cuda" 2>&1 | tail -5 | tee "$OUT/tests.txt"
# Map index: transforms on the GPU (auto), then with torch.compile of the encoder.
timeout 200 python3 -m benchmarks.bench_map_index --model psm-paper --points 1500 --baseline-points 150 --workers 16 \
  --batch-size 512 --threads 16 --skip-memory --compile ${INDEX_COMPILE:-default} 2>&1 | tee "$OUT/index.txt"
# Training step: plain, psm eager, psm compiled whole (fused AdamW on the GPU), and a profile of the last step.
timeout ${TRAIN_TIMEOUT:-330} python3 -m benchmarks.bench_train_throughput --model psm-paper --batch 128 --steps 5 \
  ${TRAIN_COMPILE_ENCODERS:+--compile} --compile-all --profile "$OUT/train-profile.txt" 2>&1 | grep -v "^W[0-9]" \
  | tee "$OUT/train.txt"
if [ "${SKIP_FUSION:-1}" = 0 ]; then
  timeout 100 python3 -m benchmarks.bench_map_query --no-scoring --fusion-points-tiny 1000000 --fusion-points-paper 1000000 \
    --fusion-batch 65536 --repeats 2 2>&1 | tee "$OUT/fusion.txt"
fi
