"""``psm demo``: the smallest real end-to-end run, offline, on a laptop CPU in well under a minute.

It builds the tiny PSM (real timm ViT + GSD embedding, real HF CLAP towers, random weights), makes a few
places whose imagery, sounds and captions belong together (water/waves, forest/birds, city/traffic),
embeds them, trains a few PCME++ steps, and prints μ/σ summaries and the image→audio −CSD score matrix
before and after. Later issues grow this into the embedded offline world (learn, retrieve, map).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from psm.data.audio import clap_fusion_features
from psm.data.metadata import MetadataSpec
from psm.data.text import build_bpe_tokenizer
from psm.losses import TriModalLoss, csd
from psm.models.checkpoint import load_checkpoint, save_checkpoint
from psm.models.factory import create_model
from psm.models.psm import PSM

SR = 48_000
LR = 1e-3
PLACES = (
    # name, caption, audio source, month, hour, latitude, longitude
    ("lake", "waves lapping on the shore of a calm lake", "freesound", 7, 14, 52.48, 12.60),
    ("forest", "birds singing in the forest at dawn", "iNat", 5, 6, 52.51, 12.55),
    ("city", "traffic noise and car horns on a busy street", "yfcc", 11, 8, 52.52, 13.40),
    ("lake", "water splashing and gentle waves", "aporee", 8, 18, 52.47, 12.66),
    ("forest", "a woodpecker and songbirds among the trees", "iNat", 4, 7, 52.50, 12.52),
    ("city", "buses and cars passing, a siren far away", "yfcc", 2, 17, 52.53, 13.38),
)


def _image(kind: str, size: int, g: torch.Generator) -> torch.Tensor:
    """A normalised image whose colour and texture say what the place is."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    noise = torch.randn(3, size, size, generator=g) * 0.05
    if kind == "lake":
        base = torch.stack([0.1 + 0 * x, 0.3 + 0.05 * torch.sin(20 * y), 0.6 + 0 * x])
    elif kind == "forest":
        blobs = (torch.sin(30 * x) * torch.sin(30 * y) > 0.3).float()
        base = torch.stack([0.1 + 0.05 * blobs, 0.35 + 0.2 * blobs, 0.1 + 0 * x])
    else:
        grid = ((x * 8 % 1 < 0.15) | (y * 8 % 1 < 0.15)).float()
        base = torch.stack([0.5 + 0.3 * grid, 0.5 + 0.3 * grid, 0.5 + 0.3 * grid])
    return ((base + noise).clamp(0, 1) - 0.45) / 0.25


def _sound(kind: str, seconds: float, g: torch.Generator) -> torch.Tensor:
    """A 48 kHz clip with a signature per place: low rumbling waves, chirps, or broadband traffic."""
    n = int(seconds * SR)
    t = torch.arange(n) / SR
    noise = torch.randn(n, generator=g)
    if kind == "lake":  # slow swells of low-passed noise
        kernel = torch.ones(200) / 200
        low = torch.nn.functional.conv1d(noise[None, None], kernel[None, None], padding=100)[0, 0, :n]
        return 0.5 * low * (1 + torch.sin(2 * math.pi * 0.3 * t))
    if kind == "forest":  # frequency-swept chirps every 0.4 s
        phase = (t % 0.4) / 0.4
        chirp = torch.sin(2 * math.pi * (3000 + 2000 * phase) * t) * (phase < 0.3)
        return 0.3 * chirp + 0.01 * noise
    hum = torch.sin(2 * math.pi * 90 * t) + 0.5 * torch.sin(2 * math.pi * 180 * t)
    return 0.2 * hum + 0.1 * noise


def _embed(model: PSM, inputs: dict) -> dict:
    model.eval()
    with torch.no_grad():
        return model(**inputs)


def _print_matrix(title: str, scores: torch.Tensor, labels: list[str]) -> None:
    print(f"\n{title} (rows: image queries, columns: audio; higher = closer)")
    print(" " * 10 + "".join(f"{lab:>10s}" for lab in labels))
    for lab, row in zip(labels, scores.tolist(), strict=True):
        print(f"{lab:>10s}" + "".join(f"{v:10.3f}" for v in row))
    ranks = (scores > scores.diagonal()[:, None]).sum(1) + 1
    print(f"rank of the true audio per image: {ranks.tolist()} (mean {ranks.float().mean():.2f}; chance 3.5)")


def run_demo(seed: int = 0, steps: int = 60, out_dir: str | Path | None = None) -> int:
    """Run the demo and return a process exit code (0 on success)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = create_model("psm-tiny", seed=seed)
    cfg = model.config
    print(f"model psm-tiny: {sum(p.numel() for p in model.parameters()):,} parameters, embed dim {cfg.embed_dim}")

    kinds = [p[0] for p in PLACES]
    labels = [f"{k}{i}" for i, k in enumerate(kinds)]
    images = torch.stack([_image(k, cfg.image.img_size, g) for k in kinds])
    zoom = torch.tensor([1, 3, 5, 1, 3, 5])
    # Clips of 4–25 s: the ones over 10 s take CLAP's fusion path (global view + 3 chunks).
    clips = [_sound(k, s, g) for k, s in zip(kinds, (4.0, 12.0, 25.0, 6.0, 8.0, 15.0), strict=True)]
    features, is_longer = clap_fusion_features(clips, generator=g)
    print(f"audio: {len(clips)} clips → CLAP fusion features {tuple(features.shape)}, is_longer {is_longer.tolist()}")

    captions = [p[1] for p in PLACES]
    tokenizer = build_bpe_tokenizer(captions * 4, vocab_size=cfg.text.hf_config.get("vocab_size", 1024))
    tok = tokenizer(captions, padding="longest", return_tensors="pt")
    spec: MetadataSpec = cfg.metadata
    metadata = spec.encode(
        latitude=[p[5] for p in PLACES],
        longitude=[p[6] for p in PLACES],
        month=[p[3] for p in PLACES],
        hour=[p[4] for p in PLACES],
        audio_source=[p[2] for p in PLACES],
        caption_source=["meta"] * len(PLACES),
    )
    inputs = dict(
        images=images,
        zoom=zoom,
        audio_features=features,
        is_longer=is_longer,
        input_ids=tok["input_ids"],
        attention_mask=tok["attention_mask"],
        metadata=metadata,
    )

    emb = _embed(model, inputs)
    for name, e in emb.items():
        print(
            f"{name:5s}: μ {tuple(e.mean.shape)}  ‖σ‖₁ mean {e.sigma_l1().mean():.3f}  "
            f"log σ² mean {e.logvar.mean():.3f}"
        )

    def image_audio_scores(e: dict) -> torch.Tensor:
        i, a = e["image"], e["audio"]
        return -csd(i.mean, i.logvar, a.mean, a.logvar)

    _print_matrix("−CSD before training", image_audio_scores(emb), labels)

    loss_fn = TriModalLoss(kind="pcmepp")
    params = list(model.parameters()) + list(loss_fn.parameters())
    # The paper's AdamW betas, eps and weight decay; a larger lr than its 5e-5 so a few steps show learning.
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    train_gen = torch.Generator().manual_seed(seed + 1)
    print(f"\ntraining {steps} PCME++ steps on the {len(PLACES)} samples")
    for step in range(steps):
        out = model(**inputs, generator=train_gen)
        loss, _ = loss_fn({k: v.as_loss_input() for k, v in out.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:3d}  loss {loss.item():.4f}")

    emb = _embed(model, inputs)
    _print_matrix("−CSD after training", image_audio_scores(emb), labels)

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(model, Path(out_dir or tmp) / "psm-tiny-demo", overwrite=True)
        reloaded, _ = load_checkpoint(folder)
        same = torch.equal(_embed(reloaded, inputs)["image"].mean, emb["image"].mean)
        print(f"\ncheckpoint {folder.name}/ (safetensors + config.yaml) reloads identically: {same}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if same else 1
