"""The trainer: a real LightningCLI run on a small real dataset, exports, safe checkpoints, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_raster_manifest
from psm.losses import calibrated_shift
from psm.models.checkpoint import load_checkpoint
from psm.training.checkpoint_io import load_training_state, save_training_state
from psm.training.sampler import StepSampler
from psm.training.train import trainer_defaults


def _args(manifest: Path, run: Path, steps: int, every: int) -> list[str]:
    options = {
        "model.model": "psm-tiny",
        "data.manifest": manifest,
        "data.batch_size": 6,
        "trainer.max_steps": steps,
        "trainer.val_check_interval": every,
        "trainer.default_root_dir": run,
        "trainer.accelerator": "cpu",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.log_every_n_steps": 1,
    }
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def test_step_sampler_resumes_the_same_order_on_any_rank():
    full = list(StepSampler(10, 3, seed=1, end_step=9))
    resumed = list(StepSampler(10, 3, seed=1, start_step=4, end_step=9))
    assert resumed == full[4 * 3 :]
    # each pass over the data sees every sample once, and passes follow each other
    first_pass = [i for i, epoch in full if epoch == 0]
    assert sorted(first_pass) == list(range(10))
    # two ranks interleave global batches and together see each sample once per pass
    r0 = list(StepSampler(12, 3, seed=1, rank=0, world_size=2, end_step=2))
    r1 = list(StepSampler(12, 3, seed=1, rank=1, world_size=2, end_step=2))
    assert sorted(i for i, _ in r0 + r1) == list(range(12))


def test_training_state_round_trips_without_pickle(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3, betas=(0.9, 0.98))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {
        "epoch": 1,
        "global_step": 5,
        "optimizer_states": [opt.state_dict()],
        "best": float("inf"),
        "path": str(tmp_path / "checkpoints" / "best.ckpt"),
        "nested": {"betas": (0.9, 0.98), "none": None},
    }
    save_training_state(state, tmp_path / "checkpoints" / "last.ckpt")
    back = load_training_state(tmp_path / "checkpoints" / "last.ckpt")
    assert back["global_step"] == 5 and back["best"] == float("inf") and back["nested"]["betas"] == (0.9, 0.98)
    assert back["path"] == str((tmp_path / "checkpoints" / "best.ckpt").resolve())
    assert torch.equal(back["optimizer_states"][0]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert str(tmp_path) not in (tmp_path / "checkpoints" / "last.ckpt").read_bytes()[:20000].decode("latin-1")
    with pytest.raises(TypeError, match="without pickle"):
        save_training_state({"bad": object()}, tmp_path / "x.ckpt")
    assert not list((tmp_path).glob(".x.ckpt.*"))  # nothing half-written left behind


def test_train_exports_best_and_last_and_logs_validation(tmp_path):
    from psm.training.train import run_training

    manifest = make_raster_manifest(tmp_path)
    run = tmp_path / "run"
    args = [*_args(manifest, run, steps=4, every=2), "--model.init_shift", "calibrated"]
    assert run_training(args) == 0
    for name in ("best", "last"):
        _, extra = load_checkpoint(run / "export" / name)
        assert (run / "export" / name / "tokenizer" / "tokenizer.json").is_file()
        assert set(extra) == {"loss.criterion.shift", "loss.criterion.negative_scale"}
    # the calibrated PCME++ shift was set from the batch size before training (4 steps of lr 5e-5 move it little)
    assert abs(float(extra["loss.criterion.shift"]) - calibrated_shift(5.0, 32, -4.0, 6)) < 0.01
    metrics = pd.read_csv(next((run / "logs").glob("version_*/metrics.csv")))
    assert {"val/i2s_r10", "val/s2i_median_rank", "train/loss"} <= set(metrics.columns)
    assert load_training_state(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_step_count(tmp_path):
    manifest = make_raster_manifest(tmp_path)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "psm.cli", "train", *_args(manifest, run, steps=12, every=3)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and load_training_state(last)["global_step"] >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-run: no chance to clean up
    proc.wait()
    killed_at = load_training_state(last)["global_step"]
    assert 3 <= killed_at < 12
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # every checkpoint under a final name is whole
        load_training_state(ckpt)
    loud = {k: v for k, v in env.items() if k != "PYTHONWARNINGS"}  # the resumed run's warnings are checked
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=loud, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # A manifest loader resumes itself: no false "not resumable" warning, and no Lightning-internal deprecations
    assert "not resumable" not in done.stderr and "LeafSpec" not in done.stderr, done.stderr[-3000:]
    assert load_training_state(last)["global_step"] == 12
    assert load_training_state(run / "checkpoints" / "best.ckpt")["global_step"] in (3, 6, 9, 12)
    assert not list((run / "checkpoints").glob(".*.tmp"))
    load_checkpoint(run / "export" / "best")


def _corrupt_first_audio_member(shard: Path) -> str:
    """Rewrite ``shard`` with its first audio member's bytes replaced by garbage; returns that member's key."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    bad = next(m.name for m, _ in members if m.name.rsplit(".", 1)[-1] in ("flac", "wav", "ogg", "mp3"))
    tmp = shard.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for m, data in members:
            data = b"not audio at all" if m.name == bad else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    tmp.replace(shard)
    return bad.split(".", 1)[0]


def test_train_from_packed_shards(tmp_path, capsys):
    """Training reads packed shards; a corrupt clip is skipped by policy, logged, and counted in the
    end-of-run summary (shard and manifest loaders keep separate logs, one summary)."""
    from psm.cli import main as cli_main
    from psm.data.shards import read_error_logs
    from psm.data.text import build_bpe_tokenizer
    from psm.training.train import run_training

    manifest = make_raster_manifest(tmp_path, n=12, val_every=3)
    for split in ("train", "val"):
        assert cli_main(["data", "pack", str(manifest), str(tmp_path / "shards"), "--split", split]) == 0
    bad_key = _corrupt_first_audio_member(sorted((tmp_path / "shards").glob("train-*.tar"))[0])
    build_bpe_tokenizer(["sound number with birds"] * 10, vocab_size=300).save_pretrained(tmp_path / "tok")
    args = _args(manifest, tmp_path / "run", steps=3, every=3)
    i = args.index("--data.manifest")
    args[i : i + 2] = ["--data.shards", str(tmp_path / "shards"), "--data.tokenizer", str(tmp_path / "tok")]
    assert run_training([*args, "--data.on_error", "skip"]) == 0
    assert load_training_state(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    errors = [e for e in read_error_logs(tmp_path / "run" / "skipped-train.jsonl") if e["kind"] == "error"]
    assert errors and {e["key"] for e in errors} == {bad_key}
    assert f"skipped {len(errors)} bad samples" in capsys.readouterr().out


def test_dataset_cache_gives_the_same_samples_and_stops_rereading(tmp_path):
    from psm.data.dataset import ManifestDataset

    manifest = make_raster_manifest(tmp_path, n=6, val_every=100)
    common = dict(imagery_source="sentinel2", train=True, input_size=32, audio_features=True)
    plain = ManifestDataset(manifest, **common)
    cached = ManifestDataset(manifest, cache=True, **common)
    for epoch in (0, 1, 2):  # random zooms, crops and flips per epoch: the cache must not freeze them
        for i in range(len(plain)):
            a, b = plain.load(i, epoch), cached.load(i, epoch)
            assert a.zoom == b.zoom and torch.equal(a.image, b.image)
            assert torch.equal(a.audio_features, b.audio_features) and a.is_longer == b.is_longer
    fixed = ManifestDataset(manifest, cache=True, zoom=1, **common)
    first = [fixed.load(i, 0) for i in range(len(fixed))]
    for f in [tmp_path / "mosaic.tif", *tmp_path.glob("*.wav")]:
        f.unlink()  # a cached sample needs neither its raster window nor its (short) clip again
    again = [fixed.load(i, 5) for i in range(len(fixed))]
    assert all(torch.equal(x.audio_features, y.audio_features) for x, y in zip(first, again, strict=True))
    from psm.data.imagery import ImageryError

    with pytest.raises(ImageryError, match=r"mosaic\.tif"):
        plain.load(0, 0)


def test_cache_refuses_shards():
    from psm.training.datamodule import PSMDataModule

    with pytest.raises(ValueError, match="cache"):
        PSMDataModule(shards="somewhere", tokenizer="tok", cache=True)


def test_fused_adamw_only_on_a_gpu_and_without_gradient_clipping():
    """Lightning refuses to clip gradients under mixed precision for an optimizer that unscales inside its step."""
    from psm.training.module import use_fused_adamw

    assert use_fused_adamw(True, None) and use_fused_adamw(True, 0.0)
    assert not use_fused_adamw(True, 1.0)
    assert not use_fused_adamw(False, None)


@pytest.mark.parametrize(
    ("compile", "whole", "encoders"),
    [(False, False, False), (True, False, True), ("encoders", False, True), ("all", True, False)],
)
def test_compile_option_compiles_what_it_names(compile, whole, encoders):
    """ "all" wraps model and loss (heads, fusion and loss fused too); True / "encoders" only the three towers.

    Compilation itself is lazy (first call), so this checks the wiring without a compiler run.
    """
    from psm.training.module import PSMTrainingModule

    module = PSMTrainingModule(model="psm-tiny", compile=compile)
    compiled = lambda m: m._compiled_call_impl is not None  # noqa: E731 (set by nn.Module.compile)
    assert compiled(module.model) == whole and compiled(module.loss_fn) == whole
    assert compiled(module.model.image.encoder) == encoders and compiled(module.model.audio.tower.clap) == encoders
    assert set(module.state_dict()) == set(PSMTrainingModule(model="psm-tiny").state_dict())  # same checkpoints


def test_compile_option_rejects_an_unknown_mode():
    from psm.training.module import PSMTrainingModule

    with pytest.raises(ValueError, match="compile must be"):
        PSMTrainingModule(model="psm-tiny", compile="everything")


def test_psm_train_does_not_warn_that_it_passes_its_own_arguments(monkeypatch, capsys):
    """`psm train X` gives LightningCLI sys.argv minus "train"; Lightning's args-and-argv warning is noise there."""
    import warnings

    from psm.training.train import run_training

    monkeypatch.setattr(sys, "argv", ["psm", "train", "--print_config"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            run_training(["--print_config"])
    assert "compile:" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_lightning_logs_print_once_without_tips():
    """Lightning's own handler and the root handler of psm's CLI printed every line twice."""
    import logging

    from psm.training.train import quiet_lightning_logs

    lightning_logger = logging.getLogger("lightning")
    handler = logging.StreamHandler()
    lightning_logger.addHandler(handler)  # as ``import lightning`` does when no root handler exists yet
    before = lightning_logger.propagate
    try:
        lightning_logger.propagate = True
        quiet_lightning_logs()
        quiet_lightning_logs()  # idempotent: one filter
        assert lightning_logger.propagate is False and len(handler.filters) == 1

        def record(message: str) -> logging.LogRecord:
            return logging.LogRecord("lightning.pytorch", logging.INFO, __file__, 1, message, None, None)

        assert not handler.filter(record("💡 Tip: For seamless cloud logging, try installing litlogger"))
        assert handler.filter(record("GPU available: False, used: False"))
    finally:
        lightning_logger.removeHandler(handler)
        lightning_logger.propagate = before


def _index_fit(root: Path, steps: int, *, stop_at: int | None = None, ckpt: Path | None = None) -> dict[int, list]:
    """Fit a no-op module on ``PSMDataModule``'s step sampler over 5 items; returns the item indices per step.

    Validation every 3 steps saves ``last.ckpt`` as psm runs do; ``stop_at`` kills the fit before that step.
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from psm.training.datamodule import PSMDataModule

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, item: tuple[int, int] | int) -> torch.Tensor:
            return torch.tensor(item[0] if isinstance(item, tuple) else item)

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.seen = torch.nn.Parameter(torch.zeros(1)), {}

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.seen[self.global_step] = batch.tolist()
            return (self.w * batch).sum()

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            pass

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class Kill(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_step == stop_at:
                raise RuntimeError("killed")

    data = PSMDataModule(manifest="unused", batch_size=2, tokenizer=None)
    data.setup = lambda stage=None: None  # type: ignore[method-assign]
    data.train_set, data.val_set = Items(), Items()
    data._collate = lambda: None  # type: ignore[method-assign]
    module = Recorder()
    trainer = L.Trainer(
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True), Kill()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{**trainer_defaults(str(root)), "max_steps": steps, "val_check_interval": 3},
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    except RuntimeError as e:
        assert str(e) == "killed"
    return module.seen


def test_resumed_run_continues_the_data_order_it_was_killed_in(tmp_path):
    """Lightning counts the batches a resumed epoch already ran as fetched: the loader's length must include
    them, or the resumed epoch ended early and the next one replayed the batches from the resume point."""
    full = _index_fit(tmp_path / "full", 8)
    assert _index_fit(tmp_path / "run", 8, stop_at=4) == {s: full[s] for s in range(4)}
    resumed = _index_fit(tmp_path / "run", 8, ckpt=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert resumed == {s: full[s] for s in range(3, 8)}  # from the checkpoint at step 3, each step once


def test_best_export_takes_loss_scalars_and_step_from_the_best_checkpoint(tmp_path):
    """export/best held the best weights but the final a, b and step of the run."""
    from psm.models.checkpoint import read_checkpoint_config
    from psm.training.module import PSMTrainingModule
    from psm.training.train import export_weights

    module = PSMTrainingModule(model="psm-tiny")
    best = {k: v.clone() for k, v in module.state_dict().items()}
    best["loss_fn.criterion.shift"] = torch.tensor([1.25])
    with torch.no_grad():
        module.loss_fn.criterion.shift.fill_(7.0)  # where the run ended
    folder = export_weights(module, {"state_dict": best, "global_step": 3}, tmp_path / "best", tmp_path)
    _, extra = load_checkpoint(folder)
    assert float(extra["loss.criterion.shift"]) == 1.25
    assert read_checkpoint_config(folder)[1]["step"] == 3


def test_init_from_refuses_settings_the_checkpoint_would_ignore(tmp_path):
    """``--model.init_from`` silently kept the checkpoint's metadata types, imagery source and overrides."""
    from psm.models.checkpoint import save_checkpoint
    from psm.models.factory import create_model
    from psm.training.module import PSMTrainingModule

    model = create_model("psm-tiny", overrides={"image": {"imagery_source": "sentinel2"}})
    folder = save_checkpoint(model, tmp_path / "ckpt")
    same = dict(imagery_source="sentinel2", metadata_types=list(model.config.metadata.types))
    module = PSMTrainingModule(init_from=str(folder), **same)  # what the checkpoint has: fine
    assert torch.equal(next(iter(module.model.parameters())), next(iter(model.parameters())))
    for changed, name in [
        ({"metadata_types": []}, "metadata.types"),
        ({"imagery_source": "google_earth"}, "image.imagery_source"),
        ({"model_overrides": {"fusion": {"layers": 2}}}, "fusion.layers"),
        ({"satmae_checkpoint": "pretrain.pth"}, "satmae_checkpoint"),
    ]:
        with pytest.raises(ValueError, match=name):
            PSMTrainingModule(init_from=str(folder), **{**same, **changed})


def test_each_step_seeds_the_global_rng_that_dropout_draws_from():
    """Dropout used the global RNG as the process left it: a resumed run took other masks than an
    uninterrupted one (loaders and validation draw from it too, and no checkpoint holds its state)."""
    from psm.training.module import PSMTrainingModule

    module = PSMTrainingModule(model="psm-tiny")
    module.on_train_batch_start(None, 0)
    first = torch.rand(4)
    torch.rand(100)  # whatever else ran in between
    module.on_train_batch_start(None, 0)
    assert torch.equal(torch.rand(4), first)


def test_filled_cache_gives_the_same_samples_and_keeps_bad_rows_reported(tmp_path):
    """fill_cache reads every zoom's window and every clip's log-mel up front (threads); the samples are those
    of a dataset that fills its cache as it goes, and a row that fails is still reported when loaded."""
    from psm.data.dataset import ManifestDataset
    from psm.data.errors import SkipLog

    manifest = make_raster_manifest(tmp_path, n=6)
    (tmp_path / "c1.wav").unlink()  # a missing clip: left out of the cache, reported on load
    kwargs = dict(imagery_source="sentinel2", train=True, split="train", input_size=32, audio_features=True)
    filled = ManifestDataset(manifest, cache=True, skip_log=SkipLog(), **kwargs)
    lazy = ManifestDataset(manifest, cache=True, skip_log=SkipLog(), **kwargs)
    n = len(filled)  # 4 train rows, one without its clip: 4 × 3 zooms + 3 mels
    assert filled.fill_cache(threads=2) == n * 3 + (n - 1)
    assert filled.fill_cache() == 0  # nothing left to read
    for epoch in (0, 1):
        for i in range(n):
            a, b = filled[(i, epoch)], lazy[(i, epoch)]
            if a is None:
                assert b is None
                continue
            assert a.zoom == b.zoom and torch.equal(a.image, b.image)
            assert torch.equal(a.audio_features, b.audio_features)
    assert len(filled.skip_log) == len(lazy.skip_log) == 2 and "c1.wav" in str(filled.skip_log.problems[0])
    with pytest.raises(ValueError, match="cache=True"):
        ManifestDataset(manifest, **kwargs).fill_cache()


def test_a_fully_skipped_batch_under_ddp_stops_with_the_reason():
    # One rank returning no loss would leave the others waiting in their gathers and gradient all-reduce forever.
    import lightning as L

    from psm.training.module import PSMTrainingModule

    module = PSMTrainingModule(model="psm-tiny")
    module.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    assert module.trainer.world_size == 2
    with pytest.raises(RuntimeError, match="every sample of batch 3 was skipped"):
        module.training_step(None, 3)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert module.training_step(None, 3) is None  # one process simply moves on


def _psm_train_ddp(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``psm train ARGS`` in its own process group; a hang is killed with every rank Lightning started."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    psm = str(Path(sys.executable).with_name("psm"))
    proc = subprocess.Popen(
        [psm, "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"psm train with 2 ranks hung for {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_with_skipped_samples_and_missing_captions(tmp_path):
    """A real two-rank run (Lightning DDP over gloo). A corrupt training clip makes one rank's batch smaller,
    some rows have no caption, and rank 1's only validation row is corrupt, so it has nothing to rank. Each of
    these used to crash or hang a multi-GPU run; the timeout turns a hang into a failure."""
    manifest = make_raster_manifest(tmp_path, n=14, val_every=7)  # validation rows k0 (rank 0) and k7 (rank 1)
    df = pd.read_parquet(manifest)
    df.loc[df.key.isin(["k2", "k5", "k9"]), "caption"] = None
    df.to_parquet(manifest)
    for bad in ("c3.wav", "c7.wav"):
        (tmp_path / bad).write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt not audio")
    run = tmp_path / "run"
    args = [*_args(manifest, run, steps=4, every=2), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args[args.index("--data.batch_size") + 1] = "3"
    proc = _psm_train_ddp(args, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load_training_state(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    metrics = pd.read_csv(next((run / "logs").glob("version_*/metrics.csv")))
    assert metrics["train/image_text/loss"].notna().any()  # the captioned rows kept their text loss
    assert metrics["val/i2s_r10"].notna().any()
    assert "bad samples" in proc.stdout


def test_a_validation_split_smaller_than_the_ranks_is_refused_up_front(tmp_path):
    manifest = make_raster_manifest(tmp_path, n=6, val_every=100)  # one validation row
    args = [*_args(manifest, tmp_path / "run", steps=2, every=2), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = _psm_train_ddp(args, timeout=300)
    assert proc.returncode != 0
    assert "validation split 'val' has 1 usable rows, fewer than the 2 ranks" in proc.stdout + proc.stderr


def test_init_from_starts_the_loss_scalars_from_the_checkpoint(tmp_path):
    """Fine-tuning from a checkpoint restarted PCME++'s learned a, b at their initial values."""
    from psm.models.checkpoint import save_checkpoint
    from psm.models.factory import create_model
    from psm.training.module import PSMTrainingModule

    model = create_model("psm-tiny", overrides={"image": {"imagery_source": "sentinel2"}})
    learned = {"loss.criterion.shift": torch.tensor(7.25), "loss.criterion.negative_scale": torch.tensor(11.5)}
    folder = save_checkpoint(model, tmp_path / "ckpt", extra_tensors=learned)
    same = dict(imagery_source="sentinel2", metadata_types=list(model.config.metadata.types))
    module = PSMTrainingModule(init_from=str(folder), init_shift="calibrated", **same)
    module.setup("fit")  # the calibrated start must not overwrite a restored b (and needs no datamodule then)
    assert float(module.loss_fn.criterion.shift) == 7.25
    assert float(module.loss_fn.criterion.negative_scale) == 11.5
    fresh = PSMTrainingModule(init_from=str(folder), init_from_loss_scalars=False, **same)
    assert float(fresh.loss_fn.criterion.shift) == 5.0  # the official initial b
