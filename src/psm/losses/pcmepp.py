"""PCME++ loss (Chun et al., ICLR 2024) exactly as the official PSM code computes it.

Each sample is a Gaussian N(μ, diag σ²) with μ already L2-normalised and the head output read
as log σ². For one pair of modalities (p, q) on one device the loss is

    L = 2·BCE(ℓ, M) + β·(KL_p + KL_q) + α·(BCE(ℓ, T_pq) + BCE(ℓᵀ, T_qp)),   ℓ = −a·CSD + b

with every BCE a mean over all N·M entries, M the target (identity on one device) and T the
pseudo-positive targets. The reference note pcmepp-loss-and-metrics.md (§2-6) has the details.
"""

import math
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# The official code drops a modality's KL term when it exceeds this value (loss explosion guard).
VIB_GUARD = 1e4

# Rows of the direct N×M×D squared difference materialised at once (about 64 MB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _check_gaussian(name: str, mu: Tensor, logvar: Tensor) -> None:
    if mu.dim() != 2:
        raise ValueError(f"mu_{name} must be 2-D [N, D], got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(
            f"logvar_{name} must have the same shape as mu_{name}, got {tuple(logvar.shape)} vs {tuple(mu.shape)}"
        )


def _check_pair(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor) -> None:
    _check_gaussian("p", mu_p, logvar_p)
    _check_gaussian("q", mu_q, logvar_q)
    if mu_p.shape[1] != mu_q.shape[1]:
        raise ValueError(
            f"mu_p and mu_q must have the same embedding dim D, got {tuple(mu_p.shape)} vs {tuple(mu_q.shape)}"
        )


class _SquaredDistance(torch.autograd.Function):
    """‖x_i − y_j‖² formed by direct subtraction (bitwise what training uses), in row chunks.

    Plain autograd on (x[:, None] - y[None]).pow(2).sum(-1) keeps N×M×D tensors alive for the
    backward pass (GiBs for a gathered global batch). The gradient has a closed form that only
    needs matmuls: ∂/∂x_i = 2 Σ_j g_ij (x_i − y_j), so we store nothing but x and y.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(x, y)
        rows = max(1, _CHUNK_ELEMENTS // max(1, y.shape[0] * y.shape[1]))
        out = [(xc[:, None, :] - y[None, :, :]).pow(2).sum(-1) for xc in x.split(rows)]
        return torch.cat(out) if out else x.new_zeros(0, y.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, y = ctx.saved_tensors
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = 2 * (g.sum(1, keepdim=True) * x - g @ y)
        if ctx.needs_input_grad[1]:
            gy = 2 * (g.sum(0)[:, None] * y - g.T @ x)
        return gx, gy


def _csd_parts(
    mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor, assume_unit_norm: bool = False
) -> tuple[Tensor, Tensor]:
    # μ part and σ part of the CSD separately: the official criterion logs both means.
    mu_part = 2 - 2 * (mu_p @ mu_q.T) if assume_unit_norm else _SquaredDistance.apply(mu_p, mu_q)
    # Σ_k (σ²_pk + σ²_qk) = Σσ²_p + Σσ²_q; summing first avoids an N×M×D tensor. The sum of two
    # terms is commutative in floating point, so csd(q, p) is bitwise csd(p, q)ᵀ.
    sigma_part = logvar_p.exp().sum(-1)[:, None] + logvar_q.exp().sum(-1)[None, :]
    return mu_part, sigma_part


def csd(mu_p: Tensor, logvar_p: Tensor, mu_q: Tensor, logvar_q: Tensor, *, assume_unit_norm: bool = False) -> Tensor:
    """Closed-form sampled distance [N, M]: ‖μ_p − μ_q‖² + Σσ²_p + Σσ²_q (= E‖z_p − z_q‖²).

    The default forms the squared difference directly, as training does; `assume_unit_norm`
    uses 2 − 2 μ_p·μ_q instead (one matmul, the official evaluation's form for big galleries).
    Half-precision inputs give a float32 result.
    """
    _check_pair(mu_p, logvar_p, mu_q, logvar_q)
    # Half inputs are lifted to float32 as in the loss: Σσ² over the dims overflows fp16 past 65504.
    dtype = torch.promote_types(mu_p.dtype, torch.float32)
    mu_p, logvar_p, mu_q, logvar_q = (t.to(dtype) for t in (mu_p, logvar_p, mu_q, logvar_q))
    mu_part, sigma_part = _csd_parts(mu_p, logvar_p, mu_q, logvar_q, assume_unit_norm)
    return mu_part + sigma_part


def vib_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) averaged over all N·D elements, replaced by 0 above 1e4 (official guard).

    The per-element mean (not a per-sample sum) is the official scale; with unit μ it only pulls
    log σ² towards 0.
    """
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()
    if kl > VIB_GUARD:  # host sync, as in the official code; the guard needs a Python branch to warn
        warnings.warn(
            f"VIB loss explosion ({kl.item():.4g} > {VIB_GUARD:g}); ignoring the VIB term for stability.",
            RuntimeWarning,
            stacklevel=2,
        )
        return kl.new_zeros(())  # a constant: no gradient flows for this modality
    return kl


def _pseudo_positive_targets(logits: Tensor, matched: Tensor) -> tuple[Tensor, Tensor]:
    # Row i's ground truth is the first column with the largest target; every column whose logit
    # is at least the ground truth's (ties included) gets the ground-truth label. The comparison
    # is a hard selection on detached logits: no gradient goes through *which* entries are chosen,
    # only through ℓ inside the BCE that uses these targets.
    gt_idx = matched.argmax(dim=1, keepdim=True)
    gt_label = matched.gather(1, gt_idx)
    selected = logits.detach() >= logits.detach().gather(1, gt_idx)
    targets = torch.where(selected, gt_label, matched)
    return targets, selected.sum() - logits.shape[0]


@dataclass
class PCMEPPTerms:
    """The official criterion's logged values for one (p, q) pair; only `loss` carries gradient."""

    loss: Tensor  # total pair loss (differentiable)
    match: Tensor  # 2·BCE(ℓ, matched), as added to the loss
    pseudo_positive: Tensor  # BCE(ℓ, T_pq) + BCE(ℓᵀ, T_qp), before the α weight
    vib: Tensor  # KL_p + KL_q, before the β weight (0 when β = 0, as the official skips it)
    n_pseudo_gts: Tensor  # selected entries beyond the ground truths, both directions summed
    mu_pdist: Tensor  # mean over N·M of ‖μ_p − μ_q‖²
    sigma_pdist: Tensor  # mean over N·M of Σσ²_p + Σσ²_q

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def pcmepp_pair_terms(
    mu_p: Tensor,
    logvar_p: Tensor,
    mu_q: Tensor,
    logvar_q: Tensor,
    a: float | Tensor,
    b: float | Tensor,
    alpha: float = 0.1,
    beta: float = 1e-4,
    matched: Tensor | None = None,
) -> PCMEPPTerms:
    """PCME++ loss of one modality pair with all logged terms (official `ClosedFormSampledDistanceLoss`).

    μ must be L2-normalised, logvar is the raw log σ² head output, a = negative_scale, b = shift,
    `matched` the [N, M] target (identity by default).
    """
    _check_pair(mu_p, logvar_p, mu_q, logvar_q)
    # Half-precision inputs (AMP) are lifted to float32: Σσ² over 512 dims and logits near −100
    # lose too much in fp16. float32 and float64 inputs are kept as they are.
    dtype = torch.promote_types(mu_p.dtype, torch.float32)
    mu_p, logvar_p, mu_q, logvar_q = (t.to(dtype) for t in (mu_p, logvar_p, mu_q, logvar_q))
    n, m = mu_p.shape[0], mu_q.shape[0]
    if matched is None:
        if n != m:
            raise ValueError(f"matched is required when N != M (got N={n}, M={m})")
        # Built in the working dtype: a float32 eye would silently make BCE return float32.
        matched = torch.eye(n, dtype=dtype, device=mu_p.device)
    elif matched.shape != (n, m):
        raise ValueError(f"matched must have shape (N, M) = {(n, m)}, got {tuple(matched.shape)}")

    mu_part, sigma_part = _csd_parts(mu_p, logvar_p, mu_q, logvar_q)
    logits = -a * (mu_part + sigma_part) + b
    matched = matched.to(logits.dtype)

    # The p→q and q→p matching losses are the same matrix (naver-ai/pcme issue #3): one BCE, ×2.
    match = 2 * F.binary_cross_entropy_with_logits(logits, matched)
    loss = match

    vib = logits.new_zeros(())
    if beta != 0:
        vib = vib_kl(mu_p, logvar_p) + vib_kl(mu_q, logvar_q)
        loss = loss + beta * vib

    pseudo = logits.new_zeros(())
    n_pseudo = torch.zeros((), dtype=torch.long, device=logits.device)
    if alpha != 0:
        # q→p: the official code recomputes the distances with swapped inputs, which gives
        # bitwise ℓᵀ (CSD is exactly symmetric), then selects row-wise on it with matchedᵀ.
        t_pq, n_pq = _pseudo_positive_targets(logits, matched)
        t_qp, n_qp = _pseudo_positive_targets(logits.T, matched.T)
        pseudo = F.binary_cross_entropy_with_logits(logits, t_pq) + F.binary_cross_entropy_with_logits(logits.T, t_qp)
        n_pseudo = n_pq + n_qp
        loss = loss + alpha * pseudo

    return PCMEPPTerms(
        loss=loss,
        match=match.detach(),
        pseudo_positive=pseudo.detach(),
        vib=vib.detach(),
        n_pseudo_gts=n_pseudo,
        mu_pdist=mu_part.detach().mean(),
        sigma_pdist=sigma_part.detach().mean(),
    )


def pcmepp_pair_loss(
    mu_p: Tensor,
    logvar_p: Tensor,
    mu_q: Tensor,
    logvar_q: Tensor,
    a: float | Tensor,
    b: float | Tensor,
    alpha: float = 0.1,
    beta: float = 1e-4,
    matched: Tensor | None = None,
) -> Tensor:
    """Scalar PCME++ loss of one modality pair (see `pcmepp_pair_terms`)."""
    return pcmepp_pair_terms(mu_p, logvar_p, mu_q, logvar_q, a, b, alpha, beta, matched).loss


def calibrated_shift(negative_scale: float, embed_dim: int, logvar_init: float, batch_size: int) -> float:
    """A shift b that starts the typical pair's logit at the log-odds of a positive, −ln(B − 1).

    The official b = 5 suits fine-tuning from pretrained encoders. From random weights it leaves the
    initial logits −a·CSD + b far from the base rate of a positive, and the network then calibrates by
    moving all images (and all audios) together, which collapses each modality to a point before any
    discriminative signal appears (measured on the offline world; docs/faithfulness.md). At init two
    unrelated unit means are ≈ orthogonal (‖μ_p − μ_q‖² ≈ 2) and Σσ² ≈ 2·D·exp(log σ²_init), so
    b = a·(2 + 2·D·e^{log σ²_init}) − ln(B − 1) puts the typical initial logit at the base rate.
    """
    if batch_size < 2:
        raise ValueError(f"a calibrated shift needs a batch of at least 2, got {batch_size}")
    expected_csd = 2.0 + 2.0 * embed_dim * math.exp(logvar_init)
    return negative_scale * expected_csd - math.log(batch_size - 1)


class PCMEPPCriterion(nn.Module):
    """PCME++ criterion with learnable logit scale a (`negative_scale`) and shift b (`shift`).

    Parameter names and shapes match the official checkpoints (`criterion.shift`,
    `criterion.negative_scale`, shape (1,)). Neither is constrained, as in the official code.
    """

    def __init__(
        self,
        init_shift: float = 5.0,
        init_negative_scale: float = 5.0,
        alpha: float = 0.1,
        beta: float = 1e-4,
    ) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.full((1,), float(init_shift)))
        self.negative_scale = nn.Parameter(torch.full((1,), float(init_negative_scale)))
        self.alpha = alpha
        self.beta = beta

    def forward(
        self,
        mu_p: Tensor,
        logvar_p: Tensor,
        mu_q: Tensor,
        logvar_q: Tensor,
        matched: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        terms = pcmepp_pair_terms(
            mu_p, logvar_p, mu_q, logvar_q, self.negative_scale, self.shift, self.alpha, self.beta, matched
        )
        logs = terms.as_dict()
        logs["loss"] = logs["loss"].detach()
        logs["shift"] = self.shift.detach()[0]
        logs["negative_scale"] = self.negative_scale.detach()[0]
        return terms.loss, logs

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"
