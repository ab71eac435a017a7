"""``psm train --config FILE.yaml``: LightningCLI over the module and data module, step based and resumable.

Every option of the YAML can be overridden on the command line (``--trainer.max_steps 200``,
``--model.loss infonce``, ``--data.batch_size 32``). ``--resume`` continues from ``<run>/checkpoints/last.ckpt``
with the same data order and step count. At the end the best (validation image→audio R@10 %) and the
last weights are exported as psm checkpoint folders (safetensors + YAML + tokenizer) under ``<run>/export``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from psm.models.checkpoint import save_checkpoint
from psm.training.checkpoint_io import SafeCheckpointIO, load_training_state
from psm.training.datamodule import TOKENIZER_DIR, PSMDataModule
from psm.training.module import PSMTrainingModule

log = logging.getLogger(__name__)
MONITOR = "val/i2s_r10"


def export_weights(module: PSMTrainingModule, checkpoint: dict[str, Any] | None, out: Path, run_dir: Path) -> Path:
    """Write the module's model, or that of a training checkpoint of it, as a psm checkpoint folder."""
    model = module.model
    loss_state, step = module.loss_fn.state_dict(), module.global_step
    if checkpoint is not None:
        # Everything from the checkpoint: the loss's a, b (τ) and the step are those of its weights, not the
        # module's current ones.
        state_dict = checkpoint["state_dict"]
        weights = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
        model = type(model)(model.config)
        model.load_state_dict(weights)
        loss_state = {k[len("loss_fn.") :]: v for k, v in state_dict.items() if k.startswith("loss_fn.")}
        step = checkpoint["global_step"]
    extra = {f"loss.{k}": v for k, v in loss_state.items()}
    folder = save_checkpoint(model, out, extra_tensors=extra, info={"step": step}, overwrite=True)
    tokenizer = run_dir / TOKENIZER_DIR
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, folder / TOKENIZER_DIR, dirs_exist_ok=True)
    return folder


class ExportCheckpoints(Callback):
    """At the end of training, export the best and the last model as psm checkpoint folders."""

    def on_train_end(self, trainer: L.Trainer, module: PSMTrainingModule) -> None:
        run_dir = Path(trainer.default_root_dir)
        # The final step may fall after the last validation: keep last.ckpt at the true final step.
        # The whole training state (optimizer, loops, callbacks): what --resume needs. Saying so also keeps
        # Lightning from logging that it chose it.
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        if not trainer.is_global_zero:
            return
        export_weights(module, None, run_dir / "export" / "last", run_dir)
        best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.best_model_path), "")
        if best and Path(best).is_file():
            export_weights(module, load_training_state(best), run_dir / "export" / "best", run_dir)
        report = getattr(trainer.datamodule, "skipped_report", None)
        count, where = report() if report is not None else (0, [])
        if count:
            print(f"skipped {count} bad samples; report: {', '.join(where)}")


class PSMCLI(LightningCLI):
    """LightningCLI with psm's defaults and a ``--resume`` flag."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--resume", action="store_true", help="continue from <run>/checkpoints/last.ckpt")
        parser.link_arguments("model.seed", "data.seed")
        parser.link_arguments("data.imagery_source", "model.imagery_source")


def trainer_defaults(run_dir: str = "runs/psm") -> dict[str, Any]:
    """Defaults every psm run starts from (any of them can be overridden in YAML or on the command line)."""
    return {
        "default_root_dir": run_dir,
        "max_steps": 1000,
        "max_epochs": -1,
        "val_check_interval": 500,
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # psm's samplers split the data by rank themselves
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
    }


def quiet_lightning_logs() -> None:
    """Print each Lightning log line once, and without its product tips.

    ``import lightning`` gives its umbrella logger a handler of its own that also propagates to the root
    handler psm's CLI sets up, so every line came out twice ("INFO: ..." and "INFO lightning...: ...").
    """
    lightning_logger = logging.getLogger("lightning")
    if not lightning_logger.handlers:
        return  # Lightning found a root handler at import and logs through it: once already
    lightning_logger.propagate = False
    for handler in lightning_logger.handlers:
        if not any(isinstance(f, _NoTips) for f in handler.filters):
            handler.addFilter(_NoTips())


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." advertisements."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith("💡 Tip")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a bad config, manifest or data file (reported in one line), not a bug in psm."""
    from psm.data.errors import DataError
    from psm.data.manifest import ManifestError
    from psm.models.checkpoint import CheckpointError
    from psm.models.config import ConfigError

    return ManifestError, DataError, ConfigError, CheckpointError, MisconfigurationException


def run_training(argv: Sequence[str]) -> int:
    """Parse ``argv`` like LightningCLI and fit; returns a process exit code (2: a bad config or data, with a
    one-line message; 130: interrupted with Ctrl-C)."""
    quiet_lightning_logs()
    try:
        with warnings.catch_warnings():
            # `psm train ...` hands LightningCLI its own argv (sys.argv minus "train"): not the mix-up it warns of.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = PSMCLI(
                PSMTrainingModule,
                PSMDataModule,
                args=list(argv),
                run=False,
                trainer_defaults=trainer_defaults(),
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
                parser_kwargs={"prog": "psm train"},  # its usage and "run: ... --help" tip name the real command
            )
    except (ValueError, MisconfigurationException) as e:  # the classes' own checks of their arguments
        print(f"psm train: error: {e}", file=sys.stderr)
        return 2
    try:
        return _fit(cli)
    except _user_errors() as e:
        print(f"psm train: error: {e}", file=sys.stderr)
        return 2
    except SystemExit:
        # Lightning answers Ctrl-C with a graceful shutdown and sys.exit(1): say it was an interruption.
        if cli.trainer.interrupted:
            last = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            then = f"--resume continues from {last}" if last.is_file() else "no checkpoint was written yet"
            print(f"psm train: interrupted; {then}", file=sys.stderr)
            return 130
        raise


def _fit(cli: PSMCLI) -> int:
    """Set psm's checkpointing and loggers on the parsed CLI's trainer and fit."""
    trainer = cli.trainer
    if getattr(cli.datamodule.hparams, "shards", None) is None and (trainer.max_steps or -1) < 1:
        # Said now rather than by a ValueError from the data module's loader once fitting has begun.
        raise MisconfigurationException(
            f"psm training is step based: set --trainer.max_steps N (N ≥ 1), got {trainer.max_steps}"
        )
    run_dir = Path(trainer.default_root_dir)
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=MONITOR,
        mode="max",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    # Replace Lightning's default checkpointing (pickles, versioned names) with psm's.
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, ModelCheckpoint)]
    trainer.callbacks.extend([checkpoint, ExportCheckpoints()])
    trainer.strategy.checkpoint_io = SafeCheckpointIO()
    if not trainer.loggers or all(type(lg).__name__ == "TensorBoardLogger" for lg in trainer.loggers):
        trainer.loggers = [CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tb")]
    ckpt_path = None
    if cli.config.get("resume"):
        last = ckpt_dir / "last.ckpt"
        if not last.is_file():
            print(f"psm train: --resume but no {last}; starting fresh")
        else:
            ckpt_path = str(last)
    with warnings.catch_warnings():
        # Lightning's own use of torch's deprecated LeafSpec: nothing a psm user can act on.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        if getattr(cli.datamodule.hparams, "shards", None) is None:
            # A manifest run's loader resumes itself (StepSampler starts at the checkpoint's step), which
            # Lightning cannot see: its "dataloader is not resumable" warning would be wrong. (Shards stream, and
            # there it is right.)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return 0
