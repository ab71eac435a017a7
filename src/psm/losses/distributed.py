"""Cross-rank gathering with gradients, and the official PSM multi-GPU loss orchestration.

Two ways to use several ranks (see `TriModalLoss(distributed=...)`):

* "global": every rank gathers all embeddings (with gradients) and computes the loss of the full
  global batch, which reproduces single-device training on that batch exactly (see
  `all_gather_with_grad` for why the gradients come out right).
* "official": PSM's own recipe: local embeddings against the gathered other modality (own
  rank's block first), a label-smoothed block target, both directions averaged.

Every rank must call these functions in the same order, like any collective. "global" takes batches
that differ by rank (a sample skipped by the data's error policy); "official" needs equal ones.
"""

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

OFFICIAL_LABEL_SMOOTHING = 1e-4


def dist_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_HOST_GROUPS: dict[object, object] = {}


def gather_host_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (the same length on each), in rank order, exchanged on the host.

    The numbers travel over a gloo group beside the default one, so an NCCL run does not wait on the GPU
    queue for them: batch sizes (which differ by rank when the data's error policy skipped a sample) and
    counts of rows that lack a modality.
    """
    _, world = dist_world()
    if world == 1:
        return [list(values)]
    default = dist.group.WORLD
    if default not in _HOST_GROUPS:  # created once, at the same (first) call on every rank
        _HOST_GROUPS[default] = default if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    mine = torch.tensor(list(values), dtype=torch.long)
    rows = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=_HOST_GROUPS[default])
    return [row.tolist() for row in rows]


def gather_sizes(n: int) -> list[int]:
    """Every rank's first-dimension size, in rank order (see :func:`gather_host_ints`)."""
    return [row[0] for row in gather_host_ints([n])]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, sizes: list[int]) -> Tensor:
        rank, world = dist_world()
        top = max(sizes)
        # Collectives need equal shapes: pad to the largest rank's rows, then drop the padding.
        padded = t if t.shape[0] == top else torch.cat([t, t.new_zeros(top - t.shape[0], *t.shape[1:])])
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        ctx.start, ctx.n = sum(sizes[:rank]), t.shape[0]
        return torch.cat([c[:k] for c, k in zip(chunks, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # Each rank holds ∂L_r/∂(global batch) of its own loss L_r. Our slice influenced every
        # rank's loss, so its gradient is the sum over ranks (a copy: all_reduce works in place).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n], None


def all_gather_with_grad(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate `t` from all ranks along dim 0 in rank order, letting gradients flow back.

    Backward all-reduces (sums) the incoming gradients and returns this rank's slice (the
    SimCLR / PCME++ GatherLayer). Ranks may hold different numbers of rows; `sizes` (from
    :func:`gather_sizes`) saves exchanging them again. Without a process group or with one rank, returns `t`.
    """
    _, world = dist_world()
    if world == 1:
        return t
    return _AllGatherWithGrad.apply(t, gather_sizes(t.shape[0]) if sizes is None else list(sizes))


def own_block_first(gathered: Tensor, local: Tensor) -> Tensor:
    """Reorder a rank-ordered gathered batch as [local, other ranks in rank order] (official layout).

    The own block is the local tensor itself, so its gradient flows directly; the gathered copy
    of it is left unused (it receives zero gradient from this rank).
    """
    rank, world = dist_world()
    if world == 1:
        return local
    if gathered.shape[0] != world * local.shape[0]:
        raise ValueError(
            f"distributed_loss 'official' needs the same batch size on every rank (rank {rank} has "
            f"{local.shape[0]} of {gathered.shape[0]} rows, as when the data's error policy skipped a sample); "
            "use distributed_loss 'global', or drop the bad rows first (psm data validate)"
        )
    chunks = list(gathered.split(local.shape[0]))
    return torch.cat([local, *chunks[:rank], *chunks[rank + 1 :]])


def official_matched(n: int, world: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Official multi-GPU target [I | ε·1 | … ] of shape [n, n·world]: own block first, others ε."""
    eye = torch.eye(n, dtype=dtype, device=device)
    return torch.cat([eye, torch.full((n, n * (world - 1)), eps, dtype=dtype, device=device)], dim=1)


def _average_logs(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    # The official engine averages every logged value of the two calls (n_pseudo_gts included).
    return {k: (a[k] + b[k]) / 2 for k in a}


def official_pcmepp_pair(
    criterion: Callable[..., tuple[Tensor, dict[str, Tensor]]],
    p: tuple[Tensor, Tensor, Tensor, Tensor],
    q: tuple[Tensor, Tensor, Tensor, Tensor],
    label_smoothing: float = OFFICIAL_LABEL_SMOOTHING,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Official PSM multi-GPU PCME++ pair loss: ½[crit(p_local, q_all) + crit(q_local, p_all)].

    p and q are (mu_local, logvar_local, mu_gathered, logvar_gathered), gathered in rank order.
    Each call keeps its own ×2, pseudo-positive passes and VIB, as in the official engine.
    """
    mu_p, lv_p, mu_p_all, lv_p_all = p
    mu_q, lv_q, mu_q_all, lv_q_all = q
    _, world = dist_world()
    dtype = torch.promote_types(mu_p.dtype, torch.float32)
    matched = official_matched(mu_p.shape[0], world, label_smoothing, dtype=dtype, device=mu_p.device)
    loss_pq, logs_pq = criterion(
        mu_p, lv_p, own_block_first(mu_q_all, mu_q), own_block_first(lv_q_all, lv_q), matched=matched
    )
    # The official second target is [Iᵀ | ε·1 | …], which is the same matrix.
    loss_qp, logs_qp = criterion(
        mu_q, lv_q, own_block_first(mu_p_all, mu_p), own_block_first(lv_p_all, lv_p), matched=matched
    )
    return (loss_pq + loss_qp) / 2, _average_logs(logs_pq, logs_qp)


def official_infonce_pair(
    criterion: Callable[..., tuple[Tensor, dict[str, Tensor]]],
    p: tuple[Tensor, Tensor],
    q: tuple[Tensor, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Official multi-GPU InfoNCE pair loss: row-only CE of local vs all, averaged over both directions.

    p and q are (emb_local, emb_gathered). The official `InfoNCELoss(distributed=True)` drops the
    column CE because the other direction is the second call.
    """
    emb_p, emb_p_all = p
    emb_q, emb_q_all = q
    loss_pq, logs_pq = criterion(emb_p, own_block_first(emb_q_all, emb_q), symmetric=False)
    loss_qp, logs_qp = criterion(emb_q, own_block_first(emb_p_all, emb_p), symmetric=False)
    return (loss_pq + loss_qp) / 2, _average_logs(logs_pq, logs_qp)
