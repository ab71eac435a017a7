"""InfoNCE baselines: PSM's (raw learnable multiplier τ) and GeoCLAP's (exp-parameterised, clamped scale).

Both score pairs by scaled cosine on embeddings that the encoders already L2-normalised and use
the symmetric loss ½(CE over rows + CE over columns) with the diagonal as the positives.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GEOCLAP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
GEOCLAP_LOGIT_SCALE_RANGE = (1.0, math.log(100))


def infonce_pair_loss(emb_p: Tensor, emb_q: Tensor, logit_scale: float | Tensor, *, symmetric: bool = True) -> Tensor:
    """½(CE(ℓ, arange) + CE(ℓᵀ, arange)) with ℓ = logit_scale · emb_p emb_qᵀ (CLIP-style InfoNCE).

    `symmetric=False` keeps only the row CE, with row i's positive in column i; this is the
    official multi-GPU form (local queries against the gathered gallery, own block first).
    """
    if emb_p.dim() != 2 or emb_q.dim() != 2 or emb_p.shape[1] != emb_q.shape[1]:
        raise ValueError(
            f"emb_p and emb_q must be 2-D with the same dim, got {tuple(emb_p.shape)} and {tuple(emb_q.shape)}"
        )
    n, m = emb_p.shape[0], emb_q.shape[0]
    if (symmetric and n != m) or n > m:
        raise ValueError(f"need N == M (or N <= M with symmetric=False), got N={n}, M={m}")
    logits = logit_scale * (emb_p @ emb_q.T)
    labels = torch.arange(n, device=logits.device)
    if not symmetric:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class InfoNCECriterion(nn.Module):
    """PSM's InfoNCE: logits = τ·cos with τ a raw learnable multiplier (init 1, no exp, no clamp).

    The parameter is named `tau` with shape (1,), as in the official checkpoints.
    """

    def __init__(self, init_tau: float = 1.0) -> None:
        super().__init__()
        self.tau = nn.Parameter(torch.full((1,), float(init_tau)))

    def forward(self, emb_p: Tensor, emb_q: Tensor, *, symmetric: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        loss = infonce_pair_loss(emb_p, emb_q, self.tau, symmetric=symmetric)
        return loss, {"loss": loss.detach(), "tau": self.tau.detach()[0]}


class GeoCLAPInfoNCECriterion(nn.Module):
    """GeoCLAP's InfoNCE: logits = exp(s)·cos, s init log(1/0.07), clamped to [1, ln 100] by `clamp_()`.

    GeoCLAP keeps one such scale per modality pair; the trainer calls `clamp_()` after every
    optimiser step (GeoCLAP does it in `on_before_zero_grad`).
    """

    def __init__(self, init_logit_scale: float = GEOCLAP_INIT_LOGIT_SCALE) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the log-scale in place so the multiplier stays in [e, 100]."""
        self.logit_scale.clamp_(*GEOCLAP_LOGIT_SCALE_RANGE)

    def forward(self, emb_p: Tensor, emb_q: Tensor, *, symmetric: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        loss = infonce_pair_loss(emb_p, emb_q, self.logit_scale.exp(), symmetric=symmetric)
        return loss, {"loss": loss.detach(), "logit_scale": self.logit_scale.detach()}
