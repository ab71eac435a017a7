"""The LightningModule: owns the losses, the optimiser and the schedule; the model itself stays plain.

Defaults are the official recipe (AdamW 5e-5, weight decay 0.2 on every parameter including the loss's
a, b and τ, betas (0.9, 0.98), eps 1e-6, cosine restarts every 5,000 steps with no warm-up). Validation
embeds the validation split with metadata dropout off and scores image→audio and audio→image.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from psm.data.audio import clap_fusion_features
from psm.data.batch import Batch
from psm.data.imagery_sources import get_imagery_source
from psm.losses import TriModalLoss, all_gather_with_grad, calibrated_shift
from psm.losses.distributed import gather_sizes
from psm.models.checkpoint import load_checkpoint
from psm.models.factory import create_model
from psm.models.heads import GaussianEmbedding

log = logging.getLogger(__name__)

SCHEDULES = ("official", "warmup-cosine", "constant")
COMPILE_MODES = ("encoders", "all")  # what `compile` may name: the three encoders, or model and loss whole


def use_fused_adamw(on_gpu: bool, gradient_clip_val: float | None) -> bool:
    """Whether to use AdamW's fused kernel (one launch for all parameters; the same update rule).

    Only on a GPU, and not with gradient clipping: under mixed precision Lightning refuses to clip the
    gradients of an optimizer that unscales them inside its own step, as the fused one does.
    """
    return bool(on_gpu and not gradient_clip_val)


def _differing_settings(config: Mapping[str, Any], overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the ``overrides`` whose values differ from those of ``config`` (a model config dict)."""
    out = []
    for key, value in overrides.items():
        current = config.get(key) if isinstance(config, Mapping) else None
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out += _differing_settings(current, value, f"{prefix}{key}.")
        elif (list(value) if isinstance(value, tuple) else value) != current:
            out.append(f"{prefix}{key}")
    return out


class PSMTrainingModule(L.LightningModule):
    """Trains a :class:`psm.models.psm.PSM` with PCME++ or InfoNCE on tri-modal batches."""

    def __init__(
        self,
        model: str = "psm-tiny",
        model_overrides: dict[str, Any] | None = None,
        imagery_source: str | None = None,
        metadata_types: list[str] | None = None,
        satmae_checkpoint: str | None = None,
        init_from: str | None = None,
        init_from_loss_scalars: bool = True,
        loss: str = "pcmepp",
        alpha: float = 0.1,
        beta: float = 1e-4,
        init_shift: float | str = 5.0,
        init_negative_scale: float = 5.0,
        pair_weights: dict[str, float] | None = None,
        distributed_loss: str = "global",
        lr: float = 5e-5,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        decay_loss_scalars: bool = True,
        schedule: str = "official",
        restart_steps: int = 5000,
        warmup_steps: int = 0,
        metadata_dropout_in_validation: bool = False,
        seed: int = 0,
        compile: bool | Literal["encoders", "all"] = False,
    ) -> None:
        """``model`` is an architecture name or YAML; ``init_from`` a psm checkpoint folder to start from.

        With ``init_from``, the loss's learned a, b (or τ) start from the checkpoint's values too when it holds
        those of the same loss (``init_from_loss_scalars=False``: from ``init_shift`` etc. instead).

        ``imagery_source`` (linked from the data's) sets the GSD and zoom levels; ``metadata_types`` the
        metadata the fusion uses (``[]``: none, the paper's "without metadata" runs).

        ``decay_loss_scalars=True`` applies weight decay to the loss's a, b, τ as the official code does;
        ``metadata_dropout_in_validation=True`` reproduces the official validation (see faithfulness.md).

        ``init_shift`` is PCME++'s initial b: the official 5.0, or ``"calibrated"`` to start every pair at the
        base rate of a positive (:func:`psm.losses.calibrated_shift`), which training from random weights
        needs to avoid collapsing each modality to a point.

        ``compile`` is for GPUs; checkpoints are unchanged. ``"encoders"`` (or ``True``) runs the three encoders
        through ``torch.compile`` (:meth:`PSM.compile_encoders`); ``"all"`` compiles the whole model and the
        loss, so heads, fusion and loss are fused too. On an H100 the paper-size step went from 1.2× the plain
        reference's samples/s (eager) to 1.6× (encoders) and 1.8× (all, after ~2 minutes of compiling).
        """
        super().__init__()
        self.save_hyperparameters()
        if isinstance(init_shift, str) and init_shift != "calibrated":
            raise ValueError(f"init_shift must be a number or 'calibrated', got {init_shift!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        overrides = dict(model_overrides or {})
        if imagery_source is not None:
            source = get_imagery_source(imagery_source)
            image = dict(overrides.get("image", {}))
            image.update(imagery_source=source.name, zoom_levels=list(source.zoom_levels))
            overrides["image"] = image
        if metadata_types is not None:
            overrides["metadata"] = {**overrides.get("metadata", {}), "types": list(metadata_types)}
        # The loss decides the heads: PCME++ needs Gaussian embeddings, InfoNCE deterministic ones.
        overrides.setdefault("probabilistic", loss == "pcmepp")
        checkpoint_extra: dict[str, Tensor] = {}
        if init_from:
            self.model, checkpoint_extra = load_checkpoint(init_from)
            # A checkpoint folder fixes the architecture: settings it would silently ignore are refused.
            ignored = _differing_settings(self.model.config.to_dict(), overrides)
            if satmae_checkpoint:
                ignored.append("satmae_checkpoint")
            if ignored:
                raise ValueError(
                    f"model.init_from {init_from}: the checkpoint fixes the architecture, but the run also sets "
                    f"{', '.join(ignored)} to something else; drop them or start a new model"
                )
        else:
            self.model = create_model(model, overrides=overrides, satmae_checkpoint=satmae_checkpoint, seed=seed)
        compile_mode = "encoders" if compile is True else (compile or None)
        if compile_mode not in (None, *COMPILE_MODES):
            raise ValueError(f"compile must be false, true or one of {COMPILE_MODES}, got {compile!r}")
        if compile_mode == "encoders":
            self.model.compile_encoders()
        if self.model.config.probabilistic != (loss == "pcmepp"):
            raise ValueError(f"loss {loss!r} does not fit a model with probabilistic={self.model.config.probabilistic}")
        world_loss = distributed_loss if torch.distributed.is_available() else "none"
        # "calibrated" keeps the criterion's default here and is set in setup(), once the batch size is known.
        shift = {} if isinstance(init_shift, str) else {"init_shift": float(init_shift)}
        self.loss_fn = TriModalLoss(
            kind=loss,
            pair_weights=pair_weights,
            alpha=alpha,
            beta=beta,
            init_negative_scale=init_negative_scale,
            **shift,
            distributed="none",
        )
        self._loss_from_checkpoint = init_from_loss_scalars and self._restore_loss_scalars(checkpoint_extra, init_from)
        if compile_mode == "all":
            # nn.Module.compile keeps parameter names, so checkpoints stay the same files.
            self.model.compile()
            self.loss_fn.compile()
        self._distributed_loss = world_loss
        self._val_outputs: list[dict[str, Tensor]] = []
        self._val_loss = torch.zeros(2)  # (Σ loss × batch size, samples) of the validation epoch so far
        self._last_step_time: float | None = None

    def _restore_loss_scalars(self, extra: dict[str, Tensor], source: str | None) -> bool:
        """Load a checkpoint's learned loss scalars (exported as ``loss.<key>``) if they fit this loss."""
        scalars = {k[len("loss.") :]: v for k, v in extra.items() if k.startswith("loss.")}
        if not scalars:
            return False
        own = self.loss_fn.state_dict()
        if set(scalars) != set(own):
            log.warning(
                "%s: its loss scalars (%s) are not those of loss %r; they start from their initial values",
                source,
                ", ".join(sorted(scalars)),
                self.hparams.loss,
            )
            return False
        # A scalar may be stored as shape () or (1,): the same value.
        self.loss_fn.load_state_dict(
            {k: v.reshape(own[k].shape) if v.numel() == own[k].numel() else v for k, v in scalars.items()}
        )
        return True

    def setup(self, stage: str) -> None:
        # The calibrated shift needs the global batch size, which only the trainer and data know. A resumed
        # run then loads its learned b over this initial value; a run started from a checkpoint keeps its b.
        if self.hparams.init_shift != "calibrated" or self.hparams.loss != "pcmepp" or self._loss_from_checkpoint:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(getattr(datamodule, "hparams", None), "batch_size", None)
        if batch_size is None:
            raise ValueError("init_shift='calibrated' needs a datamodule with a batch_size")
        cfg = self.model.config
        b = calibrated_shift(
            self.hparams.init_negative_scale, cfg.embed_dim, cfg.logvar_bias_init, batch_size * self.trainer.world_size
        )
        with torch.no_grad():
            self.loss_fn.criterion.shift.fill_(b)

    # --- batches ----------------------------------------------------------------------------------------
    def _step_seed(self, salt: int) -> int:
        """A seed private to this step, rank and use (``salt``)."""
        return (self.hparams.seed * 1_000_003 + self.global_step * 7919 + self.global_rank * 104_729 + salt) % 2**63

    def _generator(self, salt: int) -> torch.Generator:
        """A CPU generator private to this step and rank (reproducible augmentation and metadata dropout)."""
        return torch.Generator().manual_seed(self._step_seed(salt))

    def audio_inputs(self, batch: Batch, train: bool) -> tuple[Tensor, Tensor]:
        """CLAP fusion features on the training device (random chunks in training, fixed in validation)."""
        if batch.audio_features is not None:
            return batch.audio_features, batch.is_longer
        gen = self._generator(1) if train else None
        return clap_fusion_features(batch.waveforms, batch.waveform_lengths, generator=gen)

    def embed(self, batch: Batch, train: bool, metadata_dropout: bool | None = None) -> dict[str, GaussianEmbedding]:
        """Embeddings of a batch (text only when the batch has tokenised captions)."""
        features, is_longer = self.audio_inputs(batch, train)
        return self.model(
            batch.images,
            batch.zoom,
            features.to(self.device),
            is_longer.to(self.device),
            batch.input_ids,
            batch.attention_mask,
            metadata=batch.metadata,
            generator=self._generator(2) if train else None,
            metadata_dropout=metadata_dropout,
        )

    def compute_loss(
        self, embeddings: dict[str, GaussianEmbedding], caption_mask: Tensor | None = None, gather: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The tri-modal loss; rows without a caption (``caption_mask`` False) stay out of the text pairs.

        ``gather=False`` keeps it to this rank's batch (validation: a rank whose batch was skipped by the data's
        error policy calls no loss, so the others must not wait for it in a gather).
        """
        self.loss_fn.distributed = self._distributed_loss if gather and self.trainer.world_size > 1 else "none"
        # The mask stays on the CPU, where the loss counts the rows it drops without waiting on the device.
        masks = {"text": caption_mask} if caption_mask is not None and "text" in embeddings else None
        return self.loss_fn({k: v.as_loss_input() for k, v in embeddings.items()}, masks=masks)

    # --- Lightning hooks --------------------------------------------------------------------------------
    def training_step(self, batch: Batch | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every sample of the batch was skipped by the data's error policy
            if self.trainer.world_size > 1:
                # The other ranks would wait for this one's gradients and gathers forever: stop with the reason.
                raise RuntimeError(
                    f"rank {self.global_rank}: every sample of batch {batch_idx} was skipped by the data's error "
                    "policy (see the skipped-sample report in the run folder); remove the bad rows "
                    "(psm data validate) and resume"
                )
            return None
        loss, logs = self.compute_loss(self.embed(batch, train=True), batch.caption_mask)
        bs = len(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs, sync_dist=True)
        for key, value in logs.items():
            if key != "loss" and isinstance(value, Tensor) and value.numel() == 1:
                self.log(f"train/{key}", value.detach().float(), batch_size=bs)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("samples_per_s", bs * self.trainer.world_size / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout layers draw from the global RNG, whose state no checkpoint holds (and loaders and validation
        # draw from it too): seeded per step, a resumed run takes the same masks as an uninterrupted one.
        torch.manual_seed(self._step_seed(3))

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "on_train_epoch_start_hook"):
            datamodule.on_train_epoch_start_hook(self.current_epoch)

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self.loss_fn.clamp_()  # GeoCLAP keeps its logit scale in [1, ln 100]; a no-op otherwise

    def validation_step(self, batch: Batch | None, batch_idx: int) -> None:
        if batch is None:
            return
        dropout = True if self.hparams.metadata_dropout_in_validation else None
        emb = self.embed(batch, train=False, metadata_dropout=dropout)
        loss, _ = self.compute_loss(emb, batch.caption_mask, gather=False)
        # Summed here and reduced in on_validation_epoch_end: a rank whose batches were all skipped never gets
        # here, and a sync_dist log would leave the other ranks waiting for it.
        self._val_loss += torch.stack([loss.detach().float() * len(batch), torch.tensor(float(len(batch)))]).cpu()
        out = {"image_mean": emb["image"].mean, "audio_mean": emb["audio"].mean}
        if emb["image"].logvar is not None:
            out |= {"image_logvar": emb["image"].logvar, "audio_logvar": emb["audio"].logvar}
        # float32 on every rank, so the epoch's gather meets the same dtype (an empty rank's included).
        self._val_outputs.append({k: v.detach().float() for k, v in out.items()})

    def on_validation_epoch_end(self) -> None:
        from psm.evaluation.retrieval import cosine_scores, csd_scores, retrieval_metrics

        loss_sum, count = self._val_loss.tolist()
        self._val_loss = torch.zeros(2)
        if self._val_outputs:
            cat = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        elif self.trainer.world_size > 1:
            # A rank with no validation rows (all skipped by the data's error policy) still joins the gathers,
            # or the others wait for it forever.
            cat = {k: torch.zeros(0, self.model.config.embed_dim, device=self.device) for k in self._val_keys()}
        else:
            return
        self._val_outputs.clear()
        if self.trainer.world_size > 1:  # rank the whole validation split, not one rank's share
            cat = self._gather_uneven(cat)
            totals = self.all_gather(torch.tensor([loss_sum, count], device=self.device)).reshape(-1, 2).sum(0)
            loss_sum, count = totals.tolist()
        if count == 0:
            return
        self.log("val/loss", loss_sum / count, sync_dist=False)
        if "image_logvar" in cat:
            i2s = csd_scores(cat["image_mean"], cat["image_logvar"], cat["audio_mean"], cat["audio_logvar"])
            s2i = csd_scores(cat["audio_mean"], cat["audio_logvar"], cat["image_mean"], cat["image_logvar"])
        else:
            i2s = cosine_scores(cat["image_mean"], cat["audio_mean"])
            s2i = cosine_scores(cat["audio_mean"], cat["image_mean"])
        for name, scores in (("i2s", i2s), ("s2i", s2i)):
            m = retrieval_metrics(scores)
            self.log(f"val/{name}_r10", float(m["recall_at_10pct"]), prog_bar=name == "i2s", sync_dist=False)
            self.log(f"val/{name}_median_rank", float(m["median_rank"]), sync_dist=False)

    def _val_keys(self) -> tuple[str, ...]:
        """What validation_step keeps per batch for the epoch's ranking."""
        means = ("image_mean", "audio_mean")
        return (*means, "image_logvar", "audio_logvar") if self.model.config.probabilistic else means

    def _gather_uneven(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """All-gather tensors whose first dimension differs by rank (the loss's gather: padded, then unpadded)."""
        sizes = gather_sizes(next(iter(local.values())).shape[0])
        return {key: all_gather_with_grad(value, sizes) for key, value in local.items()}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        loss_params = list(self.loss_fn.parameters())
        if hp.decay_loss_scalars:  # official: one AdamW group over everything
            groups = [{"params": model_params + loss_params}]
        else:
            groups = [{"params": model_params}, {"params": loss_params, "weight_decay": 0.0}]
        on_gpu = all(p.is_cuda for p in model_params + loss_params)
        clip = self.trainer.gradient_clip_val if on_gpu else None  # (only a GPU run needs the trainer here)
        fused = use_fused_adamw(on_gpu, clip) or None
        opt = torch.optim.AdamW(
            groups, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas), eps=hp.eps, fused=fused
        )
        if hp.schedule == "official":
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=hp.restart_steps)
        elif hp.schedule == "warmup-cosine":
            total = max(1, self.trainer.max_steps if self.trainer.max_steps > 0 else hp.restart_steps)
            warm = hp.warmup_steps

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                progress = min(1.0, (step - warm) / max(1, total - warm))
                return 0.5 * (1 + math.cos(math.pi * progress))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
