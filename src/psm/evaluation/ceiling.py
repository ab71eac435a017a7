"""Retrieval ceilings of an offline world: how well could a perfect listener rank the test clips?

The world knows, for every test sample, the probability of each event at its place, hour, month and platform
(the truth) and which events its clip holds (the labels). An "oracle" image→audio ranking scores query i
against clip j by the log-likelihood of clip j's labels under query i's truth; with ``ambience`` it also
compares the clips' background keynotes (urban, foliage, water), which the audio carries as well. The
official metrics of these rankings bound what a trained model can reach on that split: a model whose
R@10 % is near the "labels + metadata" ceiling hears the events as well as the truth allows.

Which tower holds a trained model back? :func:`model_probes` fits contrastive linear maps between one
description of each clip's image side (the truth, or the model's image embedding) and one of its audio side
(the true labels and keynotes, or the model's audio embedding) on the training split and ranks the test
split: swapping the truth for a tower's embedding shows how much that tower loses (docs/world.md).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from psm.evaluation.retrieval import retrieval_metrics

log = logging.getLogger(__name__)

AMBIENCE_COLUMNS = ("amb_urban", "amb_foliage", "amb_water")
AMBIENCE_SCALE = 0.05  # squared-difference scale of the ambience term (the keynotes are fractions in 0..1)
PLACE_ONLY_DRAWS = 200  # (hour, month, platform) draws that marginalise the truth for the place-only ceiling
# Contrastive probes: 32-d linear maps, symmetric InfoNCE with a learned temperature, AdamW on batches of 256.
PROBE_DIM, PROBE_STEPS, PROBE_BATCH, PROBE_LR = 32, 800, 256, 3e-3


def _label_log_likelihood(p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, N) log P(labels_j | truth_i), with probabilities clipped away from 0 and 1."""
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p) @ labels.T + np.log1p(-p) @ (1.0 - labels).T


def retrieval_ceilings(world: Any, split: str = "test", seed: int = 0) -> dict[str, dict[str, float]]:
    """Image→audio R@10 % and median rank of oracle rankings on ``split`` of ``world`` (a World).

    Settings: ``labels + metadata`` (truth at each query's own hour, month and platform), ``labels, place
    only`` (truth averaged over the training split's hours, months and platforms), and both again with the
    background ``ambience`` term.
    """
    events = world.events_table()
    test = events[events["split"] == split].reset_index(drop=True)
    if len(test) < 2:
        raise ValueError(f"split {split!r} of {world.path} has {len(test)} samples; need at least 2")
    names = list(world.events)
    labels = test[names].to_numpy(dtype=np.float64)
    own = test[[f"p_{e}" for e in names]].to_numpy(dtype=np.float64)
    train = events[events["split"] != split]
    draws = train.sample(min(PLACE_ONLY_DRAWS, len(train)), random_state=seed)
    lat, lon = test["latitude"].to_numpy(), test["longitude"].to_numpy()
    place = np.zeros_like(own)
    for hour, month, platform in zip(draws["true_hour"], draws["true_month"], draws["audio_source"], strict=True):
        place += world.probabilities(lat, lon, int(hour), int(month), str(platform))
    place /= len(draws)
    amb = test[list(AMBIENCE_COLUMNS)].to_numpy(dtype=np.float64)
    ambience = -((amb[:, None, :] - amb[None, :, :]) ** 2).sum(-1) / AMBIENCE_SCALE
    out = {}
    for name, p in (("labels + metadata", own), ("labels, place only", place)):
        base = _label_log_likelihood(p, labels)
        out[name] = retrieval_metrics(base)
        out[name + " + ambience"] = retrieval_metrics(base + ambience)
    return {k: {m: float(v) for m, v in d.items()} for k, d in out.items()}


def format_ceilings(ceilings: dict[str, dict[str, float]], n: int | None = None) -> str:
    """A Markdown table of the ceilings."""
    lines = ["| oracle ranking | I2S R@10% | median rank |", "|---|---|---|"]
    for name, m in ceilings.items():
        lines.append(f"| {name} | {m['recall_at_10pct']:.3f} | {m['median_rank']:.1f} |")
    if n is not None:
        lines.append(f"\n{n} clips; chance R@10% ≈ 0.10.")
    return "\n".join(lines)


def contrastive_probe(
    train_a: np.ndarray,
    train_b: np.ndarray,
    test_a: np.ndarray,
    test_b: np.ndarray,
    *,
    dim: int = PROBE_DIM,
    steps: int = PROBE_STEPS,
    seed: int = 0,
) -> dict[str, float]:
    """R@10 % and median rank of a→b on test after fitting linear maps of both sides with InfoNCE on train.

    Row i of ``a`` and of ``b`` describe the same clip. Features are standardised with the training split's
    mean and deviation; the maps are deterministic for a seed.
    """
    import torch
    from torch.nn import functional as F

    from psm.losses.infonce import GEOCLAP_INIT_LOGIT_SCALE, GEOCLAP_LOGIT_SCALE_RANGE, infonce_pair_loss

    def standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sd = train.mean(0), train.std(0) + 1e-6
        return tuple(torch.as_tensor((x - mu) / sd, dtype=torch.float32) for x in (train, test))

    a, a_test = standardise(np.asarray(train_a, np.float64), np.asarray(test_a, np.float64))
    b, b_test = standardise(np.asarray(train_b, np.float64), np.asarray(test_b, np.float64))
    if len(a) != len(b) or len(a_test) != len(b_test):
        raise ValueError("both sides need one row per clip")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        map_a, map_b = torch.nn.Linear(a.shape[1], dim), torch.nn.Linear(b.shape[1], dim)
    # GeoCLAP's learned temperature: exp-parameterised from log(1/0.07), the scale capped at 100.
    log_scale = torch.nn.Parameter(torch.tensor(GEOCLAP_INIT_LOGIT_SCALE, dtype=torch.float32))
    max_scale = float(np.exp(GEOCLAP_LOGIT_SCALE_RANGE[1]))
    params = [*map_a.parameters(), *map_b.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=PROBE_LR, weight_decay=0.05)
    batch = min(PROBE_BATCH, len(a))
    for _ in range(steps):
        idx = torch.randperm(len(a), generator=g)[:batch]
        za, zb = F.normalize(map_a(a[idx]), dim=-1), F.normalize(map_b(b[idx]), dim=-1)
        loss = infonce_pair_loss(za, zb, log_scale.exp().clamp(max=max_scale))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = F.normalize(map_a(a_test), dim=-1) @ F.normalize(map_b(b_test), dim=-1).T
    return {k: float(v) for k, v in retrieval_metrics(scores.double().numpy()).items()}


def model_probes(
    world: Any, train_embeddings: Any, test_embeddings: Any, zoom: int = 1, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Contrastive probes of a model's embeddings (``psm embed`` tables of the train and test splits).

    Image side: the truth (each event's probability at the clip's place, hour, month and platform, plus the
    keynote levels), the model's image features before the metadata fusion, or its conditioned image
    embedding. Audio side: the true labels (with or without the keynote levels) or the model's audio
    embedding. Keys are ``"image side × audio side"``.
    """
    events = world.events_table().set_index("key")
    names = list(world.events)
    truth_columns = [f"p_{e}" for e in names] + list(AMBIENCE_COLUMNS)

    def sides(table: Any) -> dict[str, np.ndarray]:
        columns = [f"image_features_z{zoom}", f"image_mean_z{zoom}", "audio_mean"]
        absent = [c for c in columns if c not in table.columns]
        if absent:
            raise ValueError(f"the embeddings have no column {absent[0]!r} (psm embed --zoom {zoom})")
        # psm embed leaves a sample's image columns null at a zoom where it did not load: no row to probe.
        loaded = table[columns].notna().all(axis=1)
        if not loaded.all():
            log.warning(
                "%d of %d embedded samples did not load at zoom %s: left out", (~loaded).sum(), len(table), zoom
            )
            table = table[loaded]
        keys = table["key"].to_numpy()
        missing = [k for k in keys if k not in events.index]
        if missing:
            raise ValueError(f"{len(missing)} embedded keys are not samples of {world.path}, e.g. {missing[0]!r}")
        ev = events.loc[keys]
        out = {
            "truth": ev[truth_columns].to_numpy(np.float64),
            "labels + keynotes": ev[names + list(AMBIENCE_COLUMNS)].to_numpy(np.float64),
            "labels": ev[names].to_numpy(np.float64),
        }
        for side, column in (
            ("model image features", f"image_features_z{zoom}"),
            ("model image", f"image_mean_z{zoom}"),
            ("model audio", "audio_mean"),
        ):
            out[side] = np.stack(table[column].to_numpy()).astype(np.float64)
        return out

    train, test = sides(train_embeddings), sides(test_embeddings)
    pairs = [
        ("truth", "labels + keynotes"),
        ("truth", "labels"),
        ("truth", "model audio"),
        ("model image features", "labels + keynotes"),
        ("model image", "labels + keynotes"),
        ("model image", "model audio"),
    ]
    return {f"{i} × {a}": contrastive_probe(train[i], train[a], test[i], test[a], seed=seed) for i, a in pairs}


def format_probes(probes: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the probes."""
    lines = ["| image side × audio side (linear probe) | I2S R@10% | median rank |", "|---|---|---|"]
    for name, m in probes.items():
        lines.append(f"| {name} | {m['recall_at_10pct']:.3f} | {m['median_rank']:.1f} |")
    return "\n".join(lines)
