"""Retrieval ceilings of an offline world: how well could a perfect listener rank the test clips?

The world knows, for every test sample, the probability of each event at its place, hour, month and platform
(the truth) and which events its clip holds (the labels). An "oracle" image→audio ranking scores query i
against clip j by the log-likelihood of clip j's labels under query i's truth; with ``ambience`` it also
compares the clips' background keynotes (urban, foliage, water), which the audio carries as well. The
official metrics of these rankings bound what a trained model can reach on that split: a model whose
R@10 % is near the "labels + metadata" ceiling hears the events as well as the truth allows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from psm.evaluation.retrieval import retrieval_metrics

AMBIENCE_COLUMNS = ("amb_urban", "amb_foliage", "amb_water")
AMBIENCE_SCALE = 0.05  # squared-difference scale of the ambience term (the keynotes are fractions in 0..1)
PLACE_ONLY_DRAWS = 200  # (hour, month, platform) draws that marginalise the truth for the place-only ceiling


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
