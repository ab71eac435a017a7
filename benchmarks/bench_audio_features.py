"""CLAP fusion features: clips/second for 30-s 48 kHz clips, ours (batched torch) vs ClapFeatureExtractor.

Both run in the same process on the same clips; warm-up once, then the median of ``--repeats`` timings.
The reference always runs on CPU (it is numpy); ours on ``--device``.

    python -m benchmarks.bench_audio_features [--clips N] [--device cpu|cuda] [--threads T] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from psm.data.audio import clap_fusion_features, load_audio

SR = 48_000
CLIP_S = 30
SHARED_AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "audio"


def real_or_synthetic_clips(n_clips: int, seconds: int = CLIP_S) -> tuple[list[np.ndarray], str]:
    """``n_clips`` distinct 30-s clips cut from the shared real recordings (all concatenated, resampled to
    48 kHz), or synthetic tones + noise when ../shared/data is absent."""
    n = seconds * SR
    files = sorted(SHARED_AUDIO.rglob("*.wav")) + sorted(SHARED_AUDIO.rglob("*.ogg"))
    if files:
        audio = np.concatenate([load_audio(f, SR) for f in files])
        while len(audio) < n + n_clips:
            audio = np.concatenate([audio, audio])
        step = max(1, (len(audio) - n) // max(1, n_clips - 1))
        return [audio[i * step : i * step + n].copy() for i in range(n_clips)], f"real ({len(files)} files)"
    rng = np.random.default_rng(0)
    t = np.arange(n) / SR
    clips = [
        (0.3 * np.sin(2 * np.pi * (300 + 100 * i) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
        for i in range(n_clips)
    ]
    return clips, "synthetic"


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time both extractors, print rates, ratio and a parity spot check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8, help="30-s clips per batch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ref-clips", type=int, default=None, help="clips for the (slow) reference; default min(clips, 8)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of ours")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")

    from transformers import ClapFeatureExtractor  # imported late: only the benchmark needs it

    reference = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=SR,
        hop_length=480,
        max_length_s=10,
        fft_window_size=1024,
        padding_value=0.0,
        return_attention_mask=False,
        frequency_min=50,
        frequency_max=14000,
        top_db=None,
        truncation="fusion",
        padding="repeatpad",
    )
    clips, source = real_or_synthetic_clips(args.clips)
    batch = torch.from_numpy(np.stack(clips)).to(args.device)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        return clap_fusion_features(batch)

    ref_clips = clips[: args.ref_clips or min(args.clips, 8)]

    def ref() -> dict:
        return reference(ref_clips, sampling_rate=SR, return_tensors="np")

    t_ours = median_seconds(ours, args.repeats, sync)
    t_ref = median_seconds(ref, args.repeats, lambda: None)

    feats, _ = ours()
    ref_feats = np.asarray(ref()["input_features"])
    global_err = float(np.abs(feats[: len(ref_clips), 0].cpu().numpy() - ref_feats[:, 0]).max())

    rate_ours, rate_ref = args.clips / t_ours, len(ref_clips) / t_ref
    print(f"clips: {args.clips} x {CLIP_S} s at {SR} Hz, {source}; repeats: {args.repeats} (median)")
    print(
        f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}, "
        f"CPUs: {os.cpu_count()}, device (ours): {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    print(
        f"ClapFeatureExtractor (numpy, CPU): {rate_ref:9.2f} clips/s  ({1000 / rate_ref:.1f} ms/clip, "
        f"{len(ref_clips)} clips)"
    )
    print(
        f"clap_fusion_features ({args.device}):   {rate_ours:9.2f} clips/s  ({1000 / rate_ours:.1f} ms/clip, "
        f"{args.clips} clips)"
    )
    print(f"speed-up: {rate_ours / rate_ref:.2f}x; max |global channel diff|: {global_err:.2e} dB")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            ours()
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
