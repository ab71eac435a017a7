#!/usr/bin/env bash
# Every GPU check of the training and map benchmarks in one run (about 8 minutes on one H100), for a lent GPU
# machine without network: packages missing there travel as wheels in .whl/ (see docs/benchmarks.md; the
# image lacks soundfile+cffi+pycparser, soxr, rasterio+affine+cligj+click-plugins, zarr+numcodecs+donfig+
# google-crc32c, jsonargparse+docstring_parser+typeshed_client, webdataset+braceexpand).
# Results go to $OUT (or ./gpu-results) as one text file per benchmark.
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc;
  python3 -c "import torch, transformers, timm, lightning; print(torch.__version__, transformers.__version__, timm.__version__, lightning.__version__)"; } 2>&1 | tee "$OUT/env.txt"
timeout 150 python3 -m benchmarks.bench_train_throughput --model psm-paper --batch 128 --steps 5 2>&1 | tee "$OUT/train.txt"
timeout 150 python3 -m benchmarks.bench_map_index --model psm-paper --points 1500 --baseline-points 150 --workers 16 \
  --batch-size 512 --threads 16 --skip-memory 2>&1 | tee "$OUT/index.txt"
timeout 120 python3 -m benchmarks.bench_map_index --model psm-paper --points 1500 --baseline-points 150 --workers 16 \
  --batch-size 512 --threads 16 --skip-memory --overviews 2>&1 | tee "$OUT/index-overviews.txt"
timeout 100 python3 -m benchmarks.bench_map_query --no-scoring --fusion-points-tiny 1000000 --fusion-points-paper 1000000 \
  --fusion-batch 65536 --repeats 2 2>&1 | tee "$OUT/fusion.txt"
timeout 300 python3 -m benchmarks.bench_train_throughput --model psm-paper --batch 128 --steps 5 --compile 2>&1 | tee "$OUT/train-compile.txt"
