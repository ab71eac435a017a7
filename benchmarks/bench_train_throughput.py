"""Training throughput of the paper-size PSM: samples/s, peak memory and model FLOPs utilisation.

Two training steps are timed in the same process on the same synthetic batch (random init):

* ``plain``: the reference-style step — CLAP features precomputed on the host and copied in, captions padded
  to 128 tokens, fp32 on CPU (fp16 autocast on GPU, as the official ``precision=16``), eager.
* ``psm``: psm's step — CLAP features computed on the device from waveforms, captions padded to the batch's
  longest, bf16 autocast on GPU, fused attention (SDPA in timm and transformers);
* ``psm+compile`` (with ``--compile``): the same with ``torch.compile`` of each tower's encoder (audio HTSAT,
  image ViT, text RoBERTa), compiled separately so a graph break in one (HTSAT's data-dependent fusion
  indexing) does not split the others.

    python -m benchmarks.bench_train_throughput [--model psm-paper] [--batch 128] [--steps 5] [--device cuda]

Printed ratios compare the two in this run; on a GPU the issue's reference is ~494 samples/s for the plain
step at batch 128 in bf16 on one H100 and the target ≥ 1,000.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.profiler import record_function

from psm.data.audio import clap_fusion_features
from psm.losses import TriModalLoss
from psm.models.factory import create_model

# Dense bf16 tensor-core peak of the GPUs the device tool lends (per GPU), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def synthetic_batch(model, batch: int, device: torch.device, seed: int = 0) -> dict:
    """Images with mixed zooms, 10–30 s waveforms at 48 kHz, captions of 12–40 tokens, full metadata."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.image.img_size
    lengths = torch.randint(10 * 48_000, 30 * 48_000, (batch,), generator=g)
    waves = torch.randn(batch, int(lengths.max()), generator=g) * 0.1
    vocab = cfg.text.hf_config.get("vocab_size", 50265)
    n_tokens = torch.randint(12, 40, (batch,), generator=g)
    ids = torch.randint(3, vocab, (batch, 128), generator=g)
    mask = (torch.arange(128)[None] < n_tokens[:, None]).long()
    spec = cfg.metadata
    metadata = spec.encode(
        latitude=torch.rand(batch, generator=g) * 180 - 90,
        longitude=torch.rand(batch, generator=g) * 360 - 180,
        month=torch.randint(1, 13, (batch,), generator=g).float(),
        hour=torch.randint(0, 24, (batch,), generator=g).float(),
        audio_source=[spec.audio_sources[i % len(spec.audio_sources)] for i in range(batch)],
        caption_source=[spec.caption_sources[i % len(spec.caption_sources)] for i in range(batch)],
    )
    return dict(
        images=torch.randn(batch, 3, size, size, generator=g),
        zoom=torch.tensor([cfg.image.zoom_levels[i % len(cfg.image.zoom_levels)] for i in range(batch)]),
        waves=waves,
        lengths=lengths,
        ids=ids,
        mask=mask,
        metadata=metadata,
    )


def make_step(model, loss_fn, opt, data: dict, device: torch.device, psm_mode: bool):
    """One optimisation step as a closure (the two variants differ only in how inputs are prepared)."""
    amp = torch.bfloat16 if psm_mode else torch.float16
    use_amp = device.type == "cuda"
    if psm_mode:
        waves, lengths = data["waves"].to(device), data["lengths"].to(device)
        longest = int(data["mask"].sum(1).max())
        ids, mask = data["ids"][:, :longest].to(device), data["mask"][:, :longest].to(device)
    else:
        features, is_longer = clap_fusion_features(data["waves"], data["lengths"])  # host-side, like the loader
        ids, mask = data["ids"].to(device), data["mask"].to(device)
    images, zoom, metadata = data["images"].to(device), data["zoom"].to(device), data["metadata"].to(device)

    def step() -> float:
        # Named regions: the profile (--profile) reports each phase's host and device time.
        with record_function("step.audio_features"):
            if psm_mode:
                feats, longer = clap_fusion_features(waves, lengths)
            else:
                feats, longer = features.to(device), is_longer.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=use_amp):
            with record_function("step.forward"):
                out = model(images, zoom, feats, longer, ids, mask, metadata=metadata)
            with record_function("step.loss"):
                loss, _ = loss_fn({k: v.as_loss_input() for k, v in out.items()})
        opt.zero_grad(set_to_none=True)
        with record_function("step.backward"):
            loss.backward()
        with record_function("step.optimizer"):
            opt.step()
        return float(loss.detach())

    return step


def flops_per_sample(model, loss_fn, data: dict, device: torch.device) -> float:
    """Forward+backward FLOPs of one training sample, counted by torch's FlopCounterMode on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    small = {k: (v[:2] if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
    small["metadata"] = data["metadata"].select(slice(0, 2))
    feats, longer = clap_fusion_features(small["waves"], small["lengths"])
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(
            small["images"].to(device),
            small["zoom"].to(device),
            feats.to(device),
            longer.to(device),
            small["ids"].to(device),
            small["mask"].to(device),
            metadata=small["metadata"].to(device),
        )
        loss, _ = loss_fn({k: v.as_loss_input() for k, v in out.items()})
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB → GB (process peak RSS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="psm-paper")
    p.add_argument("--batch", type=int, default=None, help="default: 128 on GPU, 2 on CPU")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time psm's step with torch.compile of each tower")
    p.add_argument("--compile-all", action="store_true", help="also time a step with the whole model and loss compiled")
    p.add_argument("--profile", metavar="FILE", help="profile two steps of the last variant; operator table to FILE")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 2)
    torch.manual_seed(0)
    model = create_model(args.model, seed=0).to(device).train()
    loss_fn = TriModalLoss(kind="pcmepp" if model.config.probabilistic else "infonce").to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    data = synthetic_batch(model, batch, device)
    flops = flops_per_sample(model, loss_fn, data, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} on {name}: batch {batch}, {flops / 1e9:.1f} GFLOP per sample (forward+backward)")

    results = {}
    variants = [("plain", False), ("psm", True)] + ([("psm+compile", True)] if args.compile else [])
    variants += [("psm+compile-all", True)] if args.compile_all else []
    for label, psm_mode in variants:
        if label == "psm+compile":
            model.compile_encoders()
        if label == "psm+compile-all":
            # A fresh model compiled whole, with the loss: heads, fusion and loss fused too (graph breaks at
            # the host reads that remain). Same seed: the same weights as the other variants started from.
            model = create_model(args.model, seed=0).to(device).train()
            loss_fn = TriModalLoss(kind="pcmepp" if model.config.probabilistic else "infonce").to(device)
            params = list(model.parameters()) + list(loss_fn.parameters())
            model.compile()
            loss_fn.compile()
        # psm's training module uses the fused AdamW kernel on a GPU; the plain step the default one.
        fused = (psm_mode and device.type == "cuda") or None
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.2, fused=fused)
        step = make_step(model, loss_fn, opt, data, device, psm_mode)
        t0 = time.perf_counter()
        step()  # warm-up (and compilation)
        step()
        warm = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
        rate = batch / seconds
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        mfu = f"{rate * flops / peak:.1%}" if peak else "n/a (no peak for this device)"
        results[label] = rate
        print(
            f"{label:11s} {rate:9.2f} samples/s  {seconds * 1e3:9.1f} ms/step  "
            f"peak memory {peak_memory_gb(device):6.2f} GB  achieved {rate * flops / 1e12:7.3f} TFLOP/s  "
            f"MFU {mfu}  (warm-up {warm:.0f} s)",
            flush=True,
        )
        if args.profile and label == variants[-1][0]:
            profile_steps(step, device, args.profile, label)
    for label in results:
        if label != "plain":
            print(f"ratio {label} / plain: {results[label] / results['plain']:.2f}x")


def profile_steps(step, device: torch.device, path: str, label: str, steps: int = 2) -> None:
    """Write where a step's time goes (torch.profiler, operators by device time) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    phases = [e for e in events if e.key.startswith("step.")]
    lines = [f"{label}: {steps} steps", "phase: host ms / device ms per step"]
    for e in sorted(phases, key=lambda e: e.key):
        lines.append(f"  {e.key:22s} {e.cpu_time_total / 1e3 / steps:8.1f} {e.device_time_total / 1e3 / steps:8.1f}")
    sorts = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else [])
    for key in sorts:
        lines += [f"\noperators by {key}", events.table(sort_by=key, row_limit=50, max_name_column_width=90)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    print(f"profile of {label} written to {path}")
    if device.type == "cuda":
        report_syncs(step)


def report_syncs(step) -> None:
    """Count the host-device synchronisations of one step by where they come from (CUDA sync debug mode)."""
    import traceback
    import warnings

    torch.cuda.synchronize()
    sites: dict[str, int] = {}

    def hook(message, category, filename, lineno, file=None, line=None) -> None:
        # Runs where the warning is raised: the innermost psm / transformers frame names the cause.
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if "/psm/" in f.filename or "transformers" in f.filename]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}"
        sites[where] = sites.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"host-device synchronisations in one step: {sum(sites.values())}")
    for where, n in sorted(sites.items(), key=lambda t: -t[1])[:20]:
        print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()
