"""The CLAP audio tower's training step (forward + backward): psm's HTSAT against HF's, in the same process.

psm swaps three pieces of HF's HTSAT for exact equivalents (psm.models.clap): the input BatchNorm's affine
waits until after the frame stretch, clips whose four fusion channels are one mel are stretched once, and
where every patch kernel covers one mel segment (psm-tiny) the affine is folded into the patch convs, so the
mel image carries no gradient. The baseline is the same weights in HF's own classes.

    python -m benchmarks.bench_audio_tower [--model psm-tiny] [--batch 32] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from psm.models.clap import hf_audio_model
from psm.models.factory import create_model


def hf_tower(tower: torch.nn.Module) -> torch.nn.Module:
    """A copy of psm's audio tower whose CLAP model is in HF's own classes."""
    plain = copy.deepcopy(tower)
    plain.clap = hf_audio_model(tower.clap)
    return plain


def time_step(tower: torch.nn.Module, feats: torch.Tensor, longer: torch.Tensor, steps: int) -> float:
    """Median seconds of one forward + backward."""
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        tower(feats, longer).sum().backward()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="psm-tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tower = create_model(args.model, seed=0).audio.tower.train()
    baseline = hf_tower(tower)
    # Clips up to 10 s (the offline world's usual case): four copies of one mel per clip; every clip "longer"
    # as the official loader forced.
    feats = torch.randn(args.batch, 1, 1001, 64).expand(-1, 4, -1, -1).contiguous()
    longer = torch.ones(args.batch, dtype=torch.bool)
    ours, theirs = time_step(tower, feats, longer, args.steps), time_step(baseline, feats, longer, args.steps)
    print(f"{args.model} audio tower, batch {args.batch}, forward + backward on {torch.get_num_threads()} threads:")
    print(f"  HF HTSAT  {theirs * 1e3:7.1f} ms")
    print(f"  psm HTSAT {ours * 1e3:7.1f} ms   ({theirs / ours:.2f}x)")


if __name__ == "__main__":
    main()
