"""Samples without a caption keep the batch's text loss for those that have one.

Until session 9 one missing caption dropped the text of its whole batch (at batch 128 and 3 % missing, 98 % of
batches trained without text), and under DDP a rank whose batch had text and a rank whose batch had none ran
different collectives and hung.
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from psm.data.batch import Sample, collate_samples
from psm.data.metadata import MetadataSpec
from psm.data.text import build_bpe_tokenizer
from psm.losses import MODALITIES, TriModalLoss
from test_losses_distributed import _free_port

B, D = 6, 8
f64 = torch.float64


def _samples(captions: list[str | None]) -> list[Sample]:
    return [
        Sample(
            key=f"k{i}",
            image=torch.zeros(3, 4, 4),
            zoom=1,
            caption=c,
            audio_features=torch.zeros(4, 5, 3),
            is_longer=False,
        )
        for i, c in enumerate(captions)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(["birds sing in the wood", "traffic at dawn", "frogs by the lake"] * 10, vocab_size=300)


def test_collate_tokenises_every_row_and_marks_the_captioned_ones(tokenizer):
    batch = collate_samples(_samples(["birds sing", None, "traffic"]), MetadataSpec(), tokenizer)
    assert batch.captions == ["birds sing", "", "traffic"]
    assert batch.input_ids is not None and batch.input_ids.shape[0] == 3
    assert batch.caption_mask.tolist() == [True, False, True]


def test_collate_with_a_tokenizer_carries_text_even_when_no_row_has_a_caption(tokenizer):
    # Under DDP every rank must run the text tower, whatever its batch holds.
    batch = collate_samples(_samples([None, None]), MetadataSpec(), tokenizer)
    assert batch.input_ids is not None
    assert batch.caption_mask.tolist() == [False, False]


def test_collate_with_every_caption_has_no_mask(tokenizer):
    batch = collate_samples(_samples(["a", "b"]), MetadataSpec(), tokenizer)
    assert batch.caption_mask is None and batch.input_ids is not None
    assert collate_samples(_samples(["a", None]), MetadataSpec(), None).captions is None  # no tokenizer: no text


def _leaves(seed: int = 0, n: int = B) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    emb = {}
    for m in MODALITIES:
        raw = torch.randn(n, D, dtype=f64, generator=g, requires_grad=True)
        emb[m] = {"raw": raw, "logvar": (-2 + 0.5 * torch.randn(n, D, dtype=f64, generator=g)).requires_grad_()}
    return emb


def _inputs(leaves, rows=None):
    return {
        m: {
            "mean": F.normalize(v["raw"] if rows is None else v["raw"][rows], dim=-1),
            "logvar": v["logvar"] if rows is None else v["logvar"][rows],
        }
        for m, v in leaves.items()
    }


@pytest.mark.parametrize("kind", ["pcmepp", "infonce"])
def test_masked_text_rows_leave_the_text_pairs_only(kind):
    loss_fn = TriModalLoss(kind).double()
    leaves = _leaves()
    mask = torch.tensor([True, False, True, True, False, True])
    loss, logs = loss_fn(_inputs(leaves), masks={"text": mask})
    assert any(k.startswith("image_text/") for k in logs)

    full, sub = _inputs(leaves), _inputs(leaves, rows=mask)
    by_hand = 0.5 * loss_fn({"image": full["image"], "audio": full["audio"]})[0]
    by_hand = by_hand + 0.5 * loss_fn({"image": sub["image"], "text": sub["text"]})[0]
    by_hand = by_hand + 0.5 * loss_fn({"audio": sub["audio"], "text": sub["text"]})[0]
    torch.testing.assert_close(loss, by_hand)

    loss.backward()
    grad = leaves["text"]["raw"].grad
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask].abs().sum(-1) > 0)


def test_text_pairs_are_dropped_when_fewer_than_two_rows_have_a_caption():
    loss_fn = TriModalLoss("pcmepp").double()
    leaves = _leaves()
    for mask in (torch.zeros(B, dtype=torch.bool), torch.tensor([False, True, False, False, False, False])):
        loss, logs = loss_fn(_inputs(leaves), masks={"text": mask})
        alone = loss_fn({m: e for m, e in _inputs(leaves).items() if m != "text"})[0]
        torch.testing.assert_close(loss, alone)  # as a batch without text: image–audio with weight 1
        assert not any(k.startswith("image_text/") for k in logs)


def test_masks_are_checked():
    loss_fn = TriModalLoss("pcmepp").double()
    with pytest.raises(ValueError, match="unknown modality"):
        loss_fn(_inputs(_leaves()), masks={"caption": torch.ones(B, dtype=torch.bool)})
    official = TriModalLoss("pcmepp", distributed="official").double()
    with pytest.raises(ValueError, match="use distributed_loss 'global'"):
        official(_inputs(_leaves()), masks={"text": torch.tensor([True, False, True, True, True, True])})
    # a mask that drops nothing is no obstacle
    official(_inputs(_leaves()), masks={"text": torch.ones(B, dtype=torch.bool)})


# --- two CPU ranks: "global" with masks equals one process on the global batch --------------------------------
WORLD = 2
# Rank 0's rows are all captioned, so it passes no mask at all, as the module does; rank 1 lacks two captions.
GLOBAL_MASK = torch.tensor([True, True, True, True, False, False, True, True])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        n = len(GLOBAL_MASK) // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        leaves = _leaves(seed=7, n=len(GLOBAL_MASK))
        local = {m: {k: v[rows].detach().clone().requires_grad_() for k, v in e.items()} for m, e in leaves.items()}
        loss, _ = TriModalLoss("pcmepp", distributed="global").double()(
            _inputs(local), masks={"text": None if GLOBAL_MASK[rows].all() else GLOBAL_MASK[rows]}
        )
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local["text"]["raw"].grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_mode_with_missing_captions_equals_one_process(tmp_path):
    ranks = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):  # mismatched collectives hang: fail instead of waiting forever
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail("the two ranks hung in their collectives")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    leaves = _leaves(seed=7, n=len(GLOBAL_MASK))
    loss, _ = TriModalLoss("pcmepp").double()(_inputs(leaves), masks={"text": GLOBAL_MASK})
    loss.backward()
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach())
    # The gather's backward sums every rank's gradient; DDP then averages over ranks: W·∂L/∂x / W = ∂L/∂x.
    grad = torch.cat([r["grad"] for r in ranks]) / WORLD
    torch.testing.assert_close(grad, leaves["text"]["raw"].grad)
