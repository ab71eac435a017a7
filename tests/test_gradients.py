"""One PCME++ (and InfoNCE) training step reaches every trainable parameter of the model and the loss."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_batch
from psm.losses import TriModalLoss
from psm.models.factory import create_model


@pytest.mark.parametrize(("probabilistic", "kind"), [(True, "pcmepp"), (False, "infonce")])
def test_gradients_reach_every_trainable_parameter(probabilistic, kind):
    model = create_model("psm-tiny", overrides={"probabilistic": probabilistic}, seed=0).train()
    loss_fn = TriModalLoss(kind=kind)
    batch = tiny_batch(model, batch_size=6, zooms=(1, 3, 5))
    # every source id appears, so every embedding row is used
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    loss, _ = loss_fn({name: emb.as_loss_input() for name, emb in out.items()})
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [
        name
        for name, p in list(model.named_parameters()) + list(loss_fn.named_parameters())
        if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))
    ]
    assert no_grad == []


def test_frozen_clap_towers_get_no_gradient():
    model = create_model("psm-tiny", overrides={"audio": {"freeze": True}, "text": {"freeze": True}}, seed=0).train()
    assert not model.audio.tower.clap.training  # the official freeze also sets eval mode
    out = model(**tiny_batch(model))
    loss, _ = TriModalLoss(kind="pcmepp")({k: v.as_loss_input() for k, v in out.items()})
    loss.backward()
    assert all(p.grad is None for p in model.audio.tower.parameters())
    assert model.audio.head.mean_head.linear1.weight.grad is not None
