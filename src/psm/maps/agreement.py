"""How well do query maps agree with a world's known truth? Spearman ρ per event class, and the hour effect.

For the offline world (:mod:`psm.data.world`) the probability of hearing each event at every place, hour and
month is known exactly. A text query for an event ("birdsong", the event's first caption word) scored over a
map index at one month and hour should rank places like that truth does, whatever the score's scale: hence
Spearman's rank correlation between the map's scores and the truth at the index's valid points.

Spearman weighs every point alike, so for a rare event (frogs by a lake, sirens in a town) it is dominated by
how the map orders the many places where the event is all but absent. "Where should I go to hear it?" is
asked by the hot-place AUC beside it: the probability that a place in the event's top decile of truth
outscores a place outside it (0.5 = no better than chance), per event and hour.

The hour check asks whether the map *moves with time* the way the truth does: the mean score of an event's
query over the points where the event is most likely (the top decile of its truth at its peak hour), at
each hour, next to the truth's mean there (e.g. dawn chorus in the forest at 6 h and at 14 h).

The uncertainty check (PCME++ models) asks whether ‖σ‖₁ of the conditioned image embeddings means anything:
its Spearman ρ, per hour, with how varied the place's soundscape truly is — the expected number of audible
events (Σ p) and their joint unpredictability (Σ of binary entropies). A place where many different clips
are plausible should be one the model is less sure about.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from psm.maps.query import (
    PROMPT_TEMPLATES,
    MapIndex,
    MapQueryError,
    MetadataSetting,
    condition,
    embed_text_query,
    score,
)


def event_query_text(event: str) -> str:
    """The text query for an event: its most specific caption word (one source: the world's event rules)."""
    from psm.data.world.rules import EVENT_INDEX, EVENTS

    if event not in EVENT_INDEX:
        raise MapQueryError(f"unknown event {event!r}; known: {', '.join(EVENT_INDEX)}")
    return EVENTS[EVENT_INDEX[event]].words[0]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ with average ranks for ties; NaN when either side is constant or fewer than 3 points."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def ranking_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counting half (Mann–Whitney U / n₊n₋); NaN without both."""
    from scipy.stats import rankdata

    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = rankdata(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class AgreementResult:
    """Per (event, hour): Spearman ρ of the query map against the truth layer; per event the hour profile."""

    month: int
    hours: list[int]
    zoom: int
    num_points: int
    rho: dict[str, dict[int, float]] = field(default_factory=dict)  # event → hour → ρ
    hot_auc: dict[str, dict[int, float]] = field(default_factory=dict)  # event → hour → AUC of the top decile
    hot_score: dict[str, dict[int, float]] = field(default_factory=dict)  # event → hour → mean score on hot points
    hot_truth: dict[str, dict[int, float]] = field(default_factory=dict)  # same points, mean truth probability
    # hour → {"expected_events": ρ, "event_entropy": ρ} of ‖σ‖₁ against the truth; empty for InfoNCE models
    sigma_rho: dict[int, dict[str, float]] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)  # event → the text query's label

    def mean_rho(self) -> float:
        """Mean ρ over every (event, hour) with a defined ρ."""
        return _finite_mean(self.rho)

    def mean_hot_auc(self) -> float:
        """Mean hot-place AUC over every (event, hour) with a defined AUC."""
        return _finite_mean(self.hot_auc)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_rho"] = self.mean_rho()
        out["mean_hot_auc"] = self.mean_hot_auc()
        return out

    def markdown(self) -> str:
        """A table: one row per event, ρ per hour, then score and truth at the hot points per hour."""
        hours = self.hours
        head = ["event", "query"] + [f"ρ {h:02d} h" for h in hours] + [f"AUC {h:02d} h" for h in hours]
        head += [f"score {h:02d} h" for h in hours] + [f"truth {h:02d} h" for h in hours]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for event, per in self.rho.items():
            cells = [event, f'"{self.queries.get(event, event_query_text(event))}"'] + [_fmt(per[h]) for h in hours]
            cells += [_fmt(self.hot_auc[event][h]) for h in hours]
            cells += [_fmt(self.hot_score[event][h], 2) for h in hours]
            cells += [_fmt(self.hot_truth[event][h], 3) for h in hours]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            f"Mean ρ {self.mean_rho():.3f} over {len(self.rho)} events × {len(hours)} hours; month {self.month}, "
            f"zoom {self.zoom}, {self.num_points:,} points. Mean AUC {self.mean_hot_auc():.3f}: how often a place "
            "in the event's top decile of truth at that hour outscores one outside it (0.5 = chance). Score and "
            "truth are means over the same points at every hour: each event's top decile of truth at its peak "
            "hour."
        )
        if self.sigma_rho:
            per_hour = "; ".join(
                f"{h:02d} h {_fmt(r['expected_events'])} / {_fmt(r['event_entropy'])}"
                for h, r in self.sigma_rho.items()
            )
            lines.append("")
            lines.append(
                "Uncertainty: Spearman ρ of ‖σ‖₁ with the place's expected number of audible events / with their "
                f"entropy (Σ binary entropies): {per_hour}."
            )
        return "\n".join(lines)


def soundscape_diversity(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per place, from (N, E) event probabilities: the expected number of audible events Σ p, and the
    unpredictability of which ones, Σ of the events' binary entropies (nats)."""
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log1p(-p), 0.0))
    return p.sum(axis=1), h.sum(axis=1)


def _finite_mean(per_event: dict[str, dict[int, float]]) -> float:
    """Mean of the finite values of an event → hour → value table (NaN when there are none)."""
    values = [v for per in per_event.values() for v in per.values() if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _top_decile(truth: np.ndarray) -> np.ndarray:
    """Places whose truth is in its top decile (all of them when the truth is constant: no AUC then)."""
    return truth >= np.quantile(truth, 0.9)


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if not np.isfinite(v) else f"{v:.{digits}f}"


def truth_agreement(
    index: MapIndex,
    model: Any,
    tokenizer: Any,
    world: Any,
    *,
    month: int,
    hours: Sequence[int],
    zoom: int,
    events: Sequence[str] | None = None,
    audio_source: str | None = None,
    cache_dir: Any = None,
    device: Any = None,
    prompt_ensemble: bool = True,
) -> AgreementResult:
    """Score each event's text query over ``index`` at ``month`` and each hour; compare with ``world``'s truth.

    ``world`` is a :class:`psm.data.world.World`; ``audio_source`` (a platform) conditions both the map and
    the truth. Metadata the model does not use is left out of the map's setting. An event's query is its most
    specific caption word in :data:`~psm.maps.query.PROMPT_TEMPLATES` (``prompt_ensemble``), or that word alone.
    (Its other words made the maps worse: they are shared with other events, e.g. "birds".)
    """
    spec = model.config.metadata
    events = list(events if events is not None else world.events)
    points = index.points
    lat, lon = points["latitude"].to_numpy(), points["longitude"].to_numpy()
    result = AgreementResult(month=int(month), hours=[int(h) for h in hours], zoom=int(zoom), num_points=0)
    if prompt_ensemble:
        queries = {
            e: embed_text_query(model, tokenizer, event_query_text(e), templates=PROMPT_TEMPLATES) for e in events
        }
    else:
        queries = {e: embed_text_query(model, tokenizer, event_query_text(e)) for e in events}
    result.queries = {e: q.label for e, q in queries.items()}
    scores: dict[int, dict[str, np.ndarray]] = {}
    truths: dict[int, np.ndarray] = {}
    sigmas: dict[int, np.ndarray] = {}
    valid = None
    for hour in result.hours:
        setting = MetadataSetting(
            month=month if "month" in spec.types else None,
            hour=hour if "hour" in spec.types else None,
            audio_source=audio_source if "audio_source" in spec.types else None,
        )
        cond = condition(index, model, zoom, setting, cache_dir=cache_dir, device=device)
        scores[hour] = {e: score(cond, q) for e, q in queries.items()}
        if cond.sigma_l1 is not None:
            sigmas[hour] = cond.sigma_l1
        truths[hour] = world.probabilities(lat, lon, hour, month, audio_source)  # (N, E)
        ok = np.isfinite(next(iter(scores[hour].values())))
        valid = ok if valid is None else valid & ok
    result.num_points = int(valid.sum())
    if result.num_points == 0:
        # Nothing to rank against the truth (the deciles below would fail on an empty array).
        raise MapQueryError(
            f"the index {index.path} has no point with imagery at zoom {zoom}: nothing to compare with the truth"
        )
    for e in events:
        col = world.events.index(e)
        result.rho[e] = {h: spearman(scores[h][e][valid], truths[h][valid, col]) for h in result.hours}
        result.hot_auc[e] = {
            h: ranking_auc(scores[h][e][valid], _top_decile(truths[h][valid, col])) for h in result.hours
        }
        # The same points at every hour: those whose truth at its peak hour is in the top decile.
        peak = np.max([truths[h][valid, col] for h in result.hours], axis=0)
        hot = _top_decile(peak)
        result.hot_score[e] = {h: float(scores[h][e][valid][hot].mean()) for h in result.hours}
        result.hot_truth[e] = {h: float(truths[h][valid, col][hot].mean()) for h in result.hours}
    for h, sigma in sigmas.items():
        expected, entropy = soundscape_diversity(truths[h][valid])
        result.sigma_rho[h] = {
            "expected_events": spearman(sigma[valid], expected),
            "event_entropy": spearman(sigma[valid], entropy),
        }
    return result
