"""Is the world learnable, but not trivially? A logistic-regression baseline on log-mel statistics.

Task: predict a sample's dominant land cover (Gaussian-weighted, σ = 250 m) from its audio alone
(mean and standard deviation of 40 log-mel bands, 50 Hz-7.8 kHz, at 16 kHz), then from audio plus the
recording's metadata (platform one-hot, hour and month as sin/cos, hour missing for freesound), and from
the metadata alone. Scored by 5-fold spatial cross-validation: folds are whole cells of the geographic
split, so every sample is predicted by a model that saw no sample of its cell. Also the per-event
detection AUC from audio (one-vs-rest), which shows that the events are audible in the clips.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from psm.data.world.rules import EVENT_NAMES, PLATFORMS

SR = 16_000
N_FFT = 512
HOP = 256
N_MELS = 40


def _filterbank() -> np.ndarray:
    from psm.data.audio import ClapFeatureSpec, mel_filterbank

    spec = ClapFeatureSpec(sampling_rate=SR, n_mels=N_MELS, n_fft=N_FFT, hop_length=HOP, f_min=50.0, f_max=7800.0)
    return mel_filterbank(spec).astype(np.float32)


def logmel_stats(waveform: np.ndarray, fb: np.ndarray | None = None) -> np.ndarray:
    """(2·N_MELS,) mean and std over frames of the log-mel spectrogram (dB) of a 16 kHz clip."""
    fb = _filterbank() if fb is None else fb
    x = np.asarray(waveform, dtype=np.float32)
    if x.size < N_FFT:
        x = np.pad(x, (0, N_FFT - x.size))
    n_frames = 1 + (x.size - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    frames = x[idx] * np.hanning(N_FFT).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = 10.0 * np.log10(power @ fb + 1e-10)
    return np.concatenate([mel.mean(axis=0), mel.std(axis=0)]).astype(np.float32)


def metadata_features(table: pd.DataFrame) -> np.ndarray:
    """Platform one-hot, hour sin/cos (+ a missing flag), month sin/cos."""
    plat = np.stack([(table["audio_source"].to_numpy() == p).astype(np.float32) for p in PLATFORMS], axis=1)
    hour = pd.to_numeric(table["hour"], errors="coerce").to_numpy(dtype=np.float64)
    known = np.isfinite(hour)
    h = np.where(known, hour, 0.0) * 2 * np.pi / 24
    month = pd.to_numeric(table["month"], errors="coerce").to_numpy(dtype=np.float64) * 2 * np.pi / 12
    cols = [np.sin(h) * known, np.cos(h) * known, (~known).astype(float), np.sin(month), np.cos(month)]
    return np.concatenate([plat, np.stack(cols, axis=1).astype(np.float32)], axis=1)


@dataclass
class BaselineResult:
    """Spatially cross-validated scores (every sample predicted once, by a model blind to its cell)."""

    n_samples: int  # samples of the kept classes
    classes: list[str]
    chance: float  # accuracy of always predicting the most frequent class
    audio: dict
    audio_metadata: dict
    metadata: dict
    event_auc: dict[str, float]
    ablations: dict[str, dict] = field(default_factory=dict)

    def format(self) -> str:
        def row(name: str, d: dict) -> str:
            acc, bal, f1 = d["accuracy"], d["balanced_accuracy"], d["macro_f1"]
            return f"  {name:<18s} accuracy {acc:.3f}  balanced {bal:.3f}  macro-F1 {f1:.3f}"

        aucs = [v for v in self.event_auc.values() if np.isfinite(v)]
        return "\n".join(
            [
                f"dominant land cover (σ 250 m), {len(self.classes)} classes, {self.n_samples} samples, 5-fold spatial "
                f"cross-validation (folds grouped by geographic cell)",
                f"  {'chance (majority)':<18s} accuracy {self.chance:.3f}",
                row("audio", self.audio),
                row("audio + metadata", self.audio_metadata),
                row("metadata only", self.metadata),
                *(row(k, v) for k, v in self.ablations.items()),
                f"  event detection from audio: mean AUC {np.mean(aucs):.3f} over {len(aucs)} events (min "
                f"{min(aucs):.3f})"
                if aucs
                else "  event detection: too few positives",
            ]
        )

    def to_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("n_samples", "classes", "chance", "audio", "audio_metadata", "metadata", "event_auc", "ablations")
        }


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
    }


def evaluate(
    features: np.ndarray,
    table: pd.DataFrame,
    labels: np.ndarray | None = None,
    *,
    min_class: int = 20,
    folds: int = 5,
    c_reg: float = 0.3,
) -> BaselineResult:
    """Spatial cross-validation of the baselines: ``folds`` folds grouped by the geographic split's cells
    (``split_cell``), so no test sample has a training sample in its cell. ``table`` needs
    dominant_landcover, split_cell, audio_source, hour and month; classes with fewer than ``min_class``
    samples are left out."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = table["dominant_landcover"].to_numpy().astype(str)
    groups = pd.to_numeric(table["split_cell"], errors="coerce").fillna(-1).to_numpy()
    counts = pd.Series(y).value_counts()
    keep_classes = sorted(counts[counts >= min_class].index)
    ok = np.isin(y, keep_classes)
    meta = metadata_features(table)
    n_plat = len(PLATFORMS)
    sets = {
        "audio": features,
        "audio_metadata": np.concatenate([features, meta], axis=1),
        "metadata": meta,
        "audio_platform": np.concatenate([features, meta[:, :n_plat]], axis=1),
        "audio_time": np.concatenate([features, meta[:, n_plat:]], axis=1),
    }
    cv = GroupKFold(n_splits=folds)

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=c_reg, max_iter=3000))

    out = {}
    for name, X in sets.items():
        pred = cross_val_predict(model(), X[ok], y[ok], cv=cv, groups=groups[ok])
        out[name] = _scores(y[ok], pred)
    aucs = {}
    if labels is not None:
        for j, e in enumerate(EVENT_NAMES):
            yj = labels[:, j].astype(int)
            if yj.sum() < 2 * folds or (1 - yj).sum() < 2 * folds:
                aucs[e] = float("nan")
                continue
            score = cross_val_predict(model(), features, yj, cv=cv, groups=groups, method="predict_proba")[:, 1]
            aucs[e] = float(roc_auc_score(yj, score))
    return BaselineResult(
        n_samples=int(ok.sum()),
        classes=list(keep_classes),
        chance=float(counts[keep_classes].max() / ok.sum()),
        audio=out["audio"],
        audio_metadata=out["audio_metadata"],
        metadata=out["metadata"],
        event_auc=aucs,
        ablations={"audio + platform": out["audio_platform"], "audio + hour/month": out["audio_time"]},
    )


def features_from_waveforms(waveforms: Iterable[np.ndarray]) -> np.ndarray:
    """Stack :func:`logmel_stats` of 16 kHz clips."""
    fb = _filterbank()
    return np.stack([logmel_stats(w, fb) for w in waveforms])


def run_on_files(world, limit: int | None = None) -> BaselineResult:
    """The baseline on a written world's audio files (decoded and resampled to 16 kHz by load_audio)."""
    from psm.data.audio import load_audio
    from psm.data.world.world import World, load_world

    w = world if isinstance(world, World) else load_world(world)
    manifest = w.manifest()
    ev = w.events_table()
    if limit is not None:
        manifest, ev = manifest.iloc[:limit], ev.iloc[:limit]
    feats = features_from_waveforms(load_audio(w.path / p, target_sr=SR) for p in manifest["audio_path"])
    table = manifest.assign(dominant_landcover=ev["dominant_landcover"].to_numpy())
    return evaluate(feats, table, ev[list(EVENT_NAMES)].to_numpy(dtype=bool))


def run_on_plan(world, samples: int, seed: int, max_duration_s: float = 5.0) -> BaselineResult:
    """The baseline on fresh samples of a world rendered in memory at 16 kHz (no files): for tests."""
    from psm.data.world.generate import ambience_of
    from psm.data.world.mixing import render_clip
    from psm.data.world.world import World, load_world

    w = world if isinstance(world, World) else load_world(world)
    plan = w.replan(samples, seed=seed, max_short_s=min(6.0, max_duration_s), long_share_scale=0.0)
    t = plan.table
    waves = (
        render_clip(
            seed,
            i,
            min(float(t.at[i, "duration_s"]), max_duration_s),
            SR,
            plan.snr_db[i],
            float(t.at[i, "peak_dbfs"]),
            ambience_of(t, i),
        )
        for i in range(len(t))
    )
    return evaluate(features_from_waveforms(waves), t, plan.labels)
