"""Projection MLPs and the Gaussian (μ, log σ²) heads shared by all three modalities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class Projector(nn.Module):
    """Linear → GELU → Linear (the official ``Projector``; attribute names match its checkpoints)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)
        self.gelu = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.gelu(self.linear1(x)))


def l2_normalize(x: Tensor) -> Tensor:
    """x / ‖x‖₂ with no epsilon, exactly as the official encoders do."""
    return x / x.norm(p=2, dim=-1, keepdim=True)


@dataclass
class GaussianEmbedding:
    """One modality's embedding: unit μ for scoring, raw log σ² (None when deterministic), and raw μ.

    The unnormalised μ is kept because query fusion (image + text) adds raw means before normalising.
    """

    mean: Tensor
    logvar: Tensor | None
    unnormalized_mean: Tensor

    @classmethod
    def from_raw(cls, raw_mean: Tensor, logvar: Tensor | None) -> GaussianEmbedding:
        return cls(l2_normalize(raw_mean), logvar, raw_mean)

    def sigma_l1(self) -> Tensor:
        """‖σ‖₁ = Σ_k exp(log σ²_k / 2): PSM's per-sample uncertainty."""
        if self.logvar is None:
            raise ValueError("a deterministic embedding has no σ")
        return torch.exp(self.logvar / 2).sum(-1)

    def detach(self) -> GaussianEmbedding:
        return GaussianEmbedding(
            self.mean.detach(),
            None if self.logvar is None else self.logvar.detach(),
            self.unnormalized_mean.detach(),
        )

    def as_loss_input(self) -> dict[str, Tensor | None]:
        """The mapping the losses take: ``{"mean": unit μ, "logvar": log σ²}``."""
        return {"mean": self.mean, "logvar": self.logvar}


class GaussianHeads(nn.Module):
    """μ head and log σ² head, each a :class:`Projector`; the σ head's biases start at −4.

    With both biases at −4 the hidden GELU is ≈ 0 and log σ² ≈ −4 per dimension at init (σ² ≈ 0.018),
    which keeps the CSD's variance term small while μ is still random (official init).
    """

    def __init__(self, dim: int, logvar_bias_init: float = -4.0, hidden_bias_init: float | None = None) -> None:
        super().__init__()
        self.mean_head = Projector(dim, dim)
        self.logvar_head = Projector(dim, dim)
        hidden = logvar_bias_init if hidden_bias_init is None else hidden_bias_init
        nn.init.constant_(self.logvar_head.linear1.bias, hidden)
        nn.init.constant_(self.logvar_head.linear2.bias, logvar_bias_init)

    def forward(self, x: Tensor) -> GaussianEmbedding:
        return GaussianEmbedding.from_raw(self.mean_head(x), self.logvar_head(x))


class DeterministicHead(nn.Module):
    """The InfoNCE (GeoCLAP-style) baseline: one projector, a unit embedding and no σ."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.head = Projector(dim, dim)

    def forward(self, x: Tensor) -> GaussianEmbedding:
        return GaussianEmbedding.from_raw(self.head(x), None)


class IdentityHead(nn.Module):
    """Deterministic image branch: the (fused) projector output is the embedding, as in ``SatMAE_baseline``."""

    def forward(self, x: Tensor) -> GaussianEmbedding:
        return GaussianEmbedding.from_raw(x, None)


def make_head(
    dim: int,
    probabilistic: bool,
    logvar_bias_init: float,
    identity: bool = False,
    hidden_bias_init: float | None = None,
) -> nn.Module:
    """The head for one modality given the model's kind."""
    if probabilistic:
        return GaussianHeads(dim, logvar_bias_init, hidden_bias_init)
    return IdentityHead() if identity else DeterministicHead(dim)
