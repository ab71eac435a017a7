"""Multi-process checks of the distributed loss modes (2 CPU ranks, gloo, 127.0.0.1).

Each rank holds half of one global batch. "global" must reproduce single-process training on the
full batch; "official" must equal PSM's local-vs-all recipe rebuilt by hand on one process.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from psm.losses import (
    MODALITIES,
    OFFICIAL_LABEL_SMOOTHING,
    PCMEPPCriterion,
    TriModalLoss,
    all_gather_with_grad,
    infonce_pair_loss,
)

WORLD, B, D = 2, 4, 8  # global batch of 8 samples per modality
PAIR_LIST = (("image_audio", "image", "audio"), ("image_text", "image", "text"), ("audio_text", "audio", "text"))
f64 = torch.float64


def global_leaves() -> dict[str, torch.Tensor]:
    """Raw leaf inputs of the full global batch, identical in every process (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    leaves = {}
    for m in MODALITIES:
        leaves[f"{m}/raw"] = torch.randn(WORLD * B, D, dtype=f64, generator=g)
        leaves[f"{m}/logvar"] = -2 + 0.5 * torch.randn(WORLD * B, D, dtype=f64, generator=g)
    # Correlate audio with image so pseudo-positives and ties between ranks are plausible.
    leaves["audio/raw"] = leaves["image/raw"] + 0.8 * leaves["audio/raw"]
    leaves["proj"] = torch.eye(D, dtype=f64) + 0.1 * torch.randn(D, D, dtype=f64, generator=g)
    return leaves


def forward(leaves: dict[str, torch.Tensor], combiner: TriModalLoss) -> torch.Tensor:
    # μ is computed from raw leaves through a shared "encoder" parameter (proj), so gradients
    # flow through the normalisation to both the per-sample leaves and a replicated parameter.
    emb = {
        m: {"mean": F.normalize(leaves[f"{m}/raw"] @ leaves["proj"], dim=-1), "logvar": leaves[f"{m}/logvar"]}
        for m in MODALITIES
    }
    return combiner(emb)[0]


def leaf_copy(leaves: dict[str, torch.Tensor], rows: slice | None = None) -> dict[str, torch.Tensor]:
    return {k: (v if rows is None or k == "proj" else v[rows]).clone().requires_grad_() for k, v in leaves.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * B, (rank + 1) * B)
        results: dict[str, torch.Tensor] = {}
        x = torch.arange(3.0, dtype=f64).repeat(B, 1) + 10 * rank
        results["gathered"] = all_gather_with_grad(x)

        for mode in ("global", "official"):
            for kind in ("pcmepp", "infonce"):
                combiner = TriModalLoss(kind, distributed=mode).double()
                leaves = leaf_copy(global_leaves(), rows)
                loss = forward(leaves, combiner)
                loss.backward()
                results[f"{mode}/{kind}/loss"] = loss.detach()
                for k, v in leaves.items():
                    results[f"{mode}/{kind}/grad/{k}"] = v.grad
                for k, p in combiner.named_parameters():
                    results[f"{mode}/{kind}/grad/{k}"] = p.grad
        # Uneven batches: the data's error policy skipped rank 1's last sample.
        n_local = B if rank == 0 else B - 1
        results["uneven/gathered"] = all_gather_with_grad(x[:n_local])
        leaves = leaf_copy(global_leaves(), slice(rank * B, rank * B + n_local))
        loss = forward(leaves, TriModalLoss("pcmepp", distributed="global").double())
        loss.backward()
        results["uneven/loss"], results["uneven/grad"] = loss.detach(), leaves["audio/raw"].grad
        try:
            forward(
                leaf_copy(global_leaves(), slice(rank * B, rank * B + n_local)),
                TriModalLoss("pcmepp", distributed="official").double(),
            )
            results["uneven/official_refused"] = torch.tensor(False)
        except ValueError as exc:
            results["uneven/official_refused"] = torch.tensor("same batch size on every rank" in str(exc))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
def test_all_gather_with_grad_concatenates_in_rank_order(rank_results):
    expected = torch.cat([torch.arange(3.0, dtype=f64).repeat(B, 1) + 10 * r for r in range(WORLD)])
    for res in rank_results:
        torch.testing.assert_close(res["gathered"], expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pcmepp", "infonce"])
def test_global_mode_equals_single_device_on_the_global_batch(rank_results, kind):
    combiner = TriModalLoss(kind).double()
    leaves = leaf_copy(global_leaves())
    loss = forward(leaves, combiner)
    loss.backward()
    criterion_grads = {k: p.grad for k, p in combiner.named_parameters()}

    for rank, res in enumerate(rank_results):
        rows = slice(rank * B, (rank + 1) * B)
        assert abs(res[f"global/{kind}/loss"].item() - loss.item()) <= 1e-10 * abs(loss.item())
        # Per-sample leaves: every rank computes the same global loss L, and the gather's
        # backward sums the W ranks' identical ∂L/∂x_r, so the local leaf grad is W × the
        # single-process grad of that slice. These leaves play the role of activations: the
        # factor W is cancelled by DDP's 1/W average on the parameters upstream (checked below).
        for m in MODALITIES:
            for part in ("raw", "logvar") if kind == "pcmepp" else ("raw",):
                key = f"{m}/{part}"
                torch.testing.assert_close(
                    res[f"global/{kind}/grad/{key}"], WORLD * leaves[key].grad[rows], rtol=1e-10, atol=1e-12
                )

    # Replicated parameters (the shared proj and the criterion's a, b / τ): emulate DDP's
    # all-reduce average; it must give exactly the single-device gradient.
    for key, single in [("proj", leaves["proj"].grad), *criterion_grads.items()]:
        averaged = sum(res[f"global/{kind}/grad/{key}"] for res in rank_results) / WORLD
        torch.testing.assert_close(averaged, single, rtol=1e-10, atol=1e-12)


def official_by_hand(kind: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """PSM's multi-GPU loss for every rank, built on one process; also ∂(Σ_r L_r)/∂leaves."""
    leaves = leaf_copy(global_leaves())
    mean = {m: F.normalize(leaves[f"{m}/raw"] @ leaves["proj"], dim=-1) for m in MODALITIES}
    logvar = {m: leaves[f"{m}/logvar"] for m in MODALITIES}
    pcme = PCMEPPCriterion().double()
    tau = 1.0

    def own_first(t: torch.Tensor, rank: int) -> torch.Tensor:
        blocks = list(t.split(B))
        return torch.cat([blocks[rank], *blocks[:rank], *blocks[rank + 1 :]])

    eps = OFFICIAL_LABEL_SMOOTHING
    matched = torch.cat([torch.eye(B, dtype=f64), torch.full((B, B * (WORLD - 1)), eps, dtype=f64)], dim=1)
    losses = []
    for rank in range(WORLD):
        rows = slice(rank * B, (rank + 1) * B)
        total = 0.0
        for _, p, q in PAIR_LIST:
            if kind == "pcmepp":
                q_all, lq_all = own_first(mean[q], rank), own_first(logvar[q], rank)
                p_all, lp_all = own_first(mean[p], rank), own_first(logvar[p], rank)
                l_pq = pcme(mean[p][rows], logvar[p][rows], q_all, lq_all, matched=matched)[0]
                l_qp = pcme(mean[q][rows], logvar[q][rows], p_all, lp_all, matched=matched)[0]
            else:
                l_pq = infonce_pair_loss(mean[p][rows], own_first(mean[q], rank), tau, symmetric=False)
                l_qp = infonce_pair_loss(mean[q][rows], own_first(mean[p], rank), tau, symmetric=False)
            total = total + 0.5 * (l_pq + l_qp) / 2
        losses.append(total)
    # Rank r's local leaf grad sums, via the gather's all-reduce, every rank's loss gradient.
    sum(losses).backward()
    return [loss.detach() for loss in losses], {k: v.grad for k, v in leaves.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pcmepp", "infonce"])
def test_official_mode_equals_local_vs_global_by_hand(rank_results, kind):
    losses, grads = official_by_hand(kind)
    assert abs(losses[0].item() - losses[1].item()) > 1e-6  # ranks see different local batches
    for rank, res in enumerate(rank_results):
        rows = slice(rank * B, (rank + 1) * B)
        assert abs(res[f"official/{kind}/loss"].item() - losses[rank].item()) <= 1e-12 * abs(losses[rank].item())
        for m in MODALITIES:
            key = f"{m}/raw"
            torch.testing.assert_close(res[f"official/{kind}/grad/{key}"], grads[key][rows], rtol=1e-10, atol=1e-12)


UNEVEN_ROWS = [r for r in range(WORLD * B) if r != WORLD * B - 1]  # rank 1's last sample was skipped


@pytest.mark.slow
def test_global_mode_takes_uneven_batches_as_one_process_on_their_union(rank_results):
    expected = torch.cat([torch.arange(3.0, dtype=f64).repeat(n, 1) + 10 * r for r, n in enumerate((B, B - 1))])
    leaves = leaf_copy({k: (v if k == "proj" else v[UNEVEN_ROWS]) for k, v in global_leaves().items()})
    loss = forward(leaves, TriModalLoss("pcmepp").double())
    loss.backward()
    starts = (0, B)
    for rank, res in enumerate(rank_results):
        torch.testing.assert_close(res["uneven/gathered"], expected, rtol=0, atol=0)
        torch.testing.assert_close(res["uneven/loss"], loss.detach(), rtol=1e-10, atol=0)
        n_local = res["uneven/grad"].shape[0]
        own = leaves["audio/raw"].grad[starts[rank] : starts[rank] + n_local]
        torch.testing.assert_close(res["uneven/grad"], WORLD * own, rtol=1e-10, atol=1e-12)
        assert bool(res["uneven/official_refused"])  # official mode says why instead of mis-blocking
