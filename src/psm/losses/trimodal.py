"""The tri-modal loss the trainer uses: one criterion over the image–audio, image–text and audio–text pairs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from psm.losses.distributed import (
    OFFICIAL_LABEL_SMOOTHING,
    all_gather_with_grad,
    gather_host_ints,
    official_infonce_pair,
    official_pcmepp_pair,
)
from psm.losses.infonce import GEOCLAP_INIT_LOGIT_SCALE, GeoCLAPInfoNCECriterion, InfoNCECriterion
from psm.losses.pcmepp import PCMEPPCriterion

MODALITIES = ("image", "audio", "text")
# (pair name, p modality, q modality), in the official order: L_ia, L_it, L_at.
PAIRS = (("image_audio", "image", "audio"), ("image_text", "image", "text"), ("audio_text", "audio", "text"))
# Official GeoSound weighting (1 − w)·L_ia + w·(L_it + L_at) with w = loss_text_weight = 0.5.
DEFAULT_PAIR_WEIGHTS = {"image_audio": 0.5, "image_text": 0.5, "audio_text": 0.5}
KINDS = ("pcmepp", "infonce", "geoclap_infonce")
DISTRIBUTED_MODES = ("none", "global", "official")


def _field(entry: Any, key: str) -> Tensor | None:
    # Accept plain mappings ({"mean": ..., "logvar": ...}) and objects with those attributes.
    if isinstance(entry, Mapping):
        return entry.get(key)
    return getattr(entry, key, None)


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Rows that hold both modalities of a pair (None: every row)."""
    if a is None or b is None:
        return a if b is None else b
    return a & b


def _select_rows(entry: tuple[Tensor, Tensor | None], keep: Tensor) -> tuple[Tensor, Tensor | None]:
    mean, logvar = entry
    return mean[keep], None if logvar is None else logvar[keep]


class TriModalLoss(nn.Module):
    """Loss over the (image, audio), (image, text), (audio, text) pairs, weighted as in PSM.

    For "pcmepp" and "infonce" one criterion (`self.criterion`) serves every pair, so a, b or τ
    are shared, as in PSM; "geoclap_infonce" has one scale per pair (`self.criteria[pair]`).
    With a single pair present (e.g. no text) the loss is that pair's loss alone (PSM `sat_audio`).
    `distributed` is "none", "global" (full global batch on every rank) or "official" (PSM's recipe).
    """

    def __init__(
        self,
        kind: str = "pcmepp",
        pair_weights: dict[str, float] | None = None,
        alpha: float = 0.1,
        beta: float = 1e-4,
        init_shift: float = 5.0,
        init_negative_scale: float = 5.0,
        init_tau: float = 1.0,
        init_logit_scale: float = GEOCLAP_INIT_LOGIT_SCALE,
        distributed: str = "none",
        label_smoothing: float = OFFICIAL_LABEL_SMOOTHING,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {distributed!r}")
        weights = dict(DEFAULT_PAIR_WEIGHTS if pair_weights is None else pair_weights)
        if set(weights) != set(DEFAULT_PAIR_WEIGHTS):
            raise ValueError(
                f"pair_weights needs exactly the keys {sorted(DEFAULT_PAIR_WEIGHTS)}, got {sorted(weights)}"
            )
        self.kind = kind
        self.pair_weights = weights
        self.distributed = distributed
        self.label_smoothing = label_smoothing
        if kind == "pcmepp":
            self.criterion = PCMEPPCriterion(init_shift, init_negative_scale, alpha, beta)
        elif kind == "infonce":
            self.criterion = InfoNCECriterion(init_tau)
        else:
            self.criteria = nn.ModuleDict({name: GeoCLAPInfoNCECriterion(init_logit_scale) for name, _, _ in PAIRS})

    def clamp_(self) -> None:
        """Clamp GeoCLAP logit scales after an optimiser step (no-op for the other kinds)."""
        if self.kind == "geoclap_infonce":
            for criterion in self.criteria.values():
                criterion.clamp_()

    def _pair_loss(
        self, pair: str, p: str, q: str, local: dict[str, tuple], gathered: dict[str, tuple]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        (mu_p, lv_p), (mu_q, lv_q) = local[p], local[q]
        if self.kind == "pcmepp":
            if self.distributed == "official":
                p_all, q_all = (mu_p, lv_p, *gathered[p]), (mu_q, lv_q, *gathered[q])
                return official_pcmepp_pair(self.criterion, p_all, q_all, self.label_smoothing)
            return self.criterion(mu_p, lv_p, mu_q, lv_q)
        criterion = self.criterion if self.kind == "infonce" else self.criteria[pair]
        if self.distributed == "official":
            return official_infonce_pair(criterion, (mu_p, gathered[p][0]), (mu_q, gathered[q][0]))
        return criterion(mu_p, mu_q)

    def forward(
        self, embeddings: Mapping[str, Any], masks: Mapping[str, Tensor | None] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the pair losses of the modalities present; also returns detached logs.

        `embeddings[m]` holds "mean" (L2-normalised μ) and "logvar" (log σ², None when deterministic);
        an absent or None modality drops the pairs that use it. `masks[m]` (B,) bool marks the rows that
        really have modality m (e.g. captions): a pair is computed on the rows that have both of its
        modalities, and dropped when fewer than two have.
        """
        masks = {m: v for m, v in (masks or {}).items() if v is not None}
        if set(masks) - set(MODALITIES):
            raise ValueError(f"unknown modality in masks {sorted(masks)}; expected a subset of {MODALITIES}")
        local: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name, entry in embeddings.items():
            if name not in MODALITIES:
                raise ValueError(f"unknown modality {name!r}; expected a subset of {MODALITIES}")
            if entry is None:
                continue
            mean, logvar = _field(entry, "mean"), _field(entry, "logvar")
            if mean is None:
                raise ValueError(f"embeddings[{name!r}] has no 'mean'")
            if self.kind == "pcmepp" and logvar is None:
                raise ValueError(f"PCME++ needs embeddings[{name!r}]['logvar'] (log σ²), got None")
            local[name] = (mean, logvar if self.kind == "pcmepp" else None)
        if not [pair for pair, p, q in PAIRS if p in local and q in local]:
            raise ValueError(f"need at least two modalities, got {sorted(local)}")
        masks = {m: v.bool() for m, v in masks.items() if m in local}

        sizes = None
        if self.distributed != "none":
            # Which modalities some rank masks must be known on every rank, or their mask gathers would not
            # match up; the rows each rank lacks are counted on the host (masks come from the loader, on the CPU).
            names = [m for m in MODALITIES if m in local]
            n = local[names[0]][0].shape[0]
            lacking = [int((~masks[m]).sum()) if m in masks else 0 for m in names]
            table = gather_host_ints([n, *lacking])
            sizes = [row[0] for row in table]
            masked = [m for j, m in enumerate(names) if any(row[1 + j] for row in table)]
            if masked and self.distributed == "official":
                raise ValueError(
                    "distributed_loss 'official' needs every sample to have every modality (its target assumes "
                    "equal blocks per rank); with missing captions use distributed_loss 'global'"
                )
            masks = {m: masks.get(m, torch.ones(n, dtype=torch.bool)) for m in masked}
        masks = {m: v.to(local[m][0].device) for m, v in masks.items()}

        # Gather once per modality (fixed MODALITIES order: collectives must match across ranks).
        gathered = {
            m: tuple(None if t is None else all_gather_with_grad(t, sizes) for t in local[m])
            for m in MODALITIES
            if m in local and self.distributed != "none"
        }
        if sizes is not None:
            masks = {m: all_gather_with_grad(masks[m].to(torch.uint8), sizes).bool() for m in MODALITIES if m in masks}
        if self.distributed == "global":
            # Every rank computes the loss of the identical global batch L. The gather's backward
            # sums the ranks' gradients, so rank r's local embeddings get W·∂L/∂x_r, and its
            # encoder parameters W·(∂L/∂θ via its own samples). DDP then averages over the W ranks:
            # (1/W)·Σ_r W·∂L/∂θ|_r = ∂L/∂θ, exactly single-device training on the global batch.
            # a, b, τ get the same ∂L/∂a on every rank, which the average leaves unchanged.
            local = gathered

        pairs, rows = [], {}
        for pair, p, q in PAIRS:
            if p not in local or q not in local:
                continue
            keep = _both(masks.get(p), masks.get(q))
            if keep is not None and int(keep.sum()) < 2:
                continue  # one row has no negatives to contrast with
            pairs.append((pair, p, q))
            rows[pair] = keep
        if not pairs:
            raise ValueError("no pair of modalities has two rows that hold both")
        weights = self.pair_weights if len(pairs) > 1 else {pairs[0][0]: 1.0}
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        for pair, p, q in pairs:
            keep = rows[pair]
            subset = local if keep is None else {m: _select_rows(local[m], keep) for m in (p, q)}
            loss, pair_logs = self._pair_loss(pair, p, q, subset, gathered)
            total = weights[pair] * loss if total is None else total + weights[pair] * loss
            logs.update({f"{pair}/{k}": v for k, v in pair_logs.items()})
        assert total is not None
        logs["loss"] = total.detach()
        return total, logs
