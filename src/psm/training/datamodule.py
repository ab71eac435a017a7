"""The LightningDataModule: train and validation loaders from a manifest, with a resumable sample order."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from torch.utils.data import DataLoader

from psm.data.dataset import ManifestDataset, make_collate
from psm.data.errors import OnError, SkipLog
from psm.data.manifest import read_manifest
from psm.data.text import build_bpe_tokenizer, load_tokenizer
from psm.training.sampler import StepSampler

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def _batches_run_in_epoch(trainer: L.Trainer) -> int:
    """Batches of the current epoch that a resumed fit already ran (Lightning counts them as fetched)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


class PSMDataModule(L.LightningDataModule):
    """Batches of one imagery source from a manifest's ``train`` and ``val`` splits, or from tar shards.

    Shards: ``shards`` is a folder of ``train-*.tar`` / ``val-*.tar`` written by ``psm data pack``
    (``shard_format="psm"``), or the authors' GeoSound/SoundingEarth shards (``shard_format="official"``,
    which needs ``allow_pickle=True``: their audio members are pickles). Shard training is epoch based
    (a resumed run restarts the interrupted epoch); manifest training resumes at the exact sample.

    ``tokenizer`` is a local folder (e.g. a saved CLAP/RoBERTa tokenizer) or ``"bpe"`` to train a small
    byte-level BPE on the training captions (tiny models, the offline world); it is saved in the run folder
    so evaluation and exported checkpoints use the same one. Skipped samples are written to
    ``<run>/skipped.*.jsonl`` and counted.

    ``cache=True`` (manifest training) keeps raster windows and each clip's log-mel in memory from
    one epoch to the next (:class:`ManifestDataset`), with persistent workers: for small datasets on a CPU.

    ``raster_bands`` / ``raster_scale``: which bands of a manifest's georeferenced rasters are R, G, B and, for
    values that are not uint8, the range mapped to 0–255 (e.g. ``[4, 3, 2]`` and ``[0, 3000]`` for a 13-band
    Sentinel-2 L2A GeoTIFF).
    """

    def __init__(
        self,
        manifest: str | None = None,
        imagery_source: str = "sentinel2",
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer: str | None = "bpe",
        max_length: int = 128,
        pad_to: str = "longest",
        train_split: str = "train",
        val_split: str = "val",
        val_zoom: int | None = None,
        seed: int = 0,
        on_error: OnError = "skip",
        shards: str | None = None,
        shard_format: str = "psm",
        allow_pickle: bool = False,
        official_dataset: str = "auto",
        features_in_workers: bool = False,
        cache: bool = False,
        raster_bands: tuple[int, int, int] = (1, 2, 3),
        raster_scale: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        from psm.data.imagery import RasterBands

        self.raster = RasterBands(raster_bands, raster_scale)  # checked now, not in a worker
        if (manifest is None) == (shards is None):
            raise ValueError("give exactly one of data.manifest and data.shards")
        if shards is not None and tokenizer == "bpe":
            raise ValueError("with shards, give data.tokenizer as a tokenizer folder ('bpe' reads a manifest)")
        if cache and shards is not None:
            raise ValueError("data.cache is for manifest training; shards stream and are not cached")
        if shard_format not in ("psm", "official"):
            raise ValueError(f"shard_format must be 'psm' or 'official', got {shard_format!r}")
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.train_set: ManifestDataset | None = None
        self.val_set: ManifestDataset | None = None
        self.skip_log: SkipLog | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir if self.trainer is not None else ".")

    def skipped_report(self) -> tuple[int, list[str]]:
        """Samples left out under ``on_error="skip"`` by every process so far, and the report files' patterns.

        Manifest loaders write ``<run>/skipped.<pid>.jsonl`` (psm.data.errors.SkipLog), shard loaders
        ``<run>/skipped-<split>.rank<r>.worker<w>.jsonl`` (psm.data.shards); top-ups of an uneven shard split
        are logged there too but are not skipped samples.
        """
        from psm.data.shards import read_error_logs

        found: list[tuple[int, str]] = []
        if self.skip_log is not None and self.skip_log.path is not None:
            found.append((len(SkipLog.read_all(self.skip_log.path)), f"{self.skip_log.path}.*.jsonl"))
        if self.hparams.shards is not None:
            for split in (self.hparams.train_split, self.hparams.val_split):
                log = self._shard_error_log(split)
                n = sum(entry.get("kind") != "fill" for entry in read_error_logs(log))
                found.append((n, str(log.with_name(f"{log.stem}.rank*.worker*{log.suffix}"))))
        return sum(n for n, _ in found), [where for n, where in found if n]

    def _shard_error_log(self, split: str) -> Path:
        """Base name of the shard loaders' per-rank/worker skip logs for ``split`` (psm.data.shards)."""
        return self.run_dir / f"skipped-{split}.jsonl"

    def _build_tokenizer(self, vocab_size: int) -> Any:
        spec = self.hparams.tokenizer
        saved = self.run_dir / TOKENIZER_DIR
        if spec is None:
            return None
        if spec != "bpe":
            tok = load_tokenizer(spec)
        elif saved.is_dir():  # a resumed run keeps the tokenizer it started with
            return load_tokenizer(saved)
        else:
            df = read_manifest(self.hparams.manifest)
            split = df["split"] if "split" in df.columns else pd.Series(["train"] * len(df))
            captions = df.loc[split == self.hparams.train_split, "caption"].dropna().astype(str).tolist()
            tok = build_bpe_tokenizer(captions, vocab_size=vocab_size)
        if self.trainer is None or self.trainer.is_global_zero:
            tmp = saved.with_name(saved.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_pretrained(tmp)
            shutil.rmtree(saved, ignore_errors=True)
            tmp.rename(saved)
        return tok

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module
        cfg = module.model.config
        hp = self.hparams
        self.spec = cfg.metadata
        vocab = cfg.text.hf_config.get("vocab_size", 50265) if cfg.text is not None else 0
        if cfg.text is not None and self.tokenizer is None:
            self.tokenizer = self._build_tokenizer(vocab)
        self.skip_log = SkipLog(self.run_dir / "skipped")
        common = dict(
            imagery_source=hp.imagery_source,
            spec=cfg.metadata,
            seed=hp.seed,
            input_size=cfg.image.img_size,
            on_error=hp.on_error,
            skip_log=self.skip_log,
            audio_features=hp.features_in_workers,
            cache=hp.cache,
            raster=self.raster,
        )
        if hp.shards is not None:
            self._setup_shards(stage, cfg.image.img_size)
            return
        if stage in (None, "fit"):
            self.train_set = ManifestDataset(hp.manifest, train=True, split=hp.train_split, **common)
        if stage in (None, "fit", "validate"):
            self.val_set = ManifestDataset(hp.manifest, train=False, split=hp.val_split, zoom=hp.val_zoom, **common)
        if hp.cache:
            # Filled now, with every core, the loader workers fork with the whole cache (see fill_cache).
            start = time.perf_counter()
            added = sum(ds.fill_cache() for ds in (self.train_set, self.val_set) if ds is not None)
            log.info("data.cache: %d raster windows and clips read in %.0f s", added, time.perf_counter() - start)

    def _setup_shards(self, stage: str | None, input_size: int) -> None:
        from psm.data.imagery import SatelliteView
        from psm.data.shards import OfficialShardDataset, ShardDataset, ShardDecoder

        hp, trainer = self.hparams, self.trainer
        for split, train in ((hp.train_split, True), (hp.val_split, False)):
            if stage == "validate" and train:
                continue
            # Validation draws each sample's zoom from its own generator (the same draw every validation), as
            # the official in-training validation drew them and as manifest validation does; or data.val_zoom.
            zoom = None if train else hp.val_zoom
            view = SatelliteView(hp.imagery_source, train=train, zoom=zoom, input_size=input_size, draw_zoom=not train)
            common = dict(
                prefix=split,
                seed=hp.seed,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                even="pad" if train else None,
                on_error=hp.on_error,
                error_log=self._shard_error_log(split),
            )
            if hp.shard_format == "official":
                ds = OfficialShardDataset(
                    hp.shards, view, dataset=hp.official_dataset, train=train, allow_pickle=hp.allow_pickle, **common
                )
            else:
                ds = ShardDataset(hp.shards, ShardDecoder(view=view), shuffle=train, **common)
            if train:
                self.train_set = ds
            else:
                self.val_set = ds

    def _collate(self):
        return make_collate(self.spec, self.tokenizer, pad_to=self.hparams.pad_to)

    def on_train_epoch_start_hook(self, epoch: int) -> None:
        """Shard datasets reshuffle per epoch (DataLoader workers are re-created each epoch)."""
        if hasattr(self.train_set, "set_epoch") and self.hparams.shards is not None:
            self.train_set.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.hparams.shards is not None:
            return DataLoader(
                self.train_set,
                batch_size=self.hparams.batch_size,
                collate_fn=self._collate(),
                num_workers=self.hparams.num_workers,
                persistent_workers=False,
            )
        accumulate = trainer.accumulate_grad_batches
        if trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError("psm training is step based: set trainer.max_steps")
        # The sampler starts where the (possibly resumed) run stands: same data order, same step count.
        # Lightning resumes an epoch by counting the batches it already ran toward the loader's length (it
        # expects a loader that resumes itself, as this one does): the length must include them, or the
        # resumed epoch ends early and the next one replays the data from the resume point.
        sampler = StepSampler(
            len(self.train_set),
            self.hparams.batch_size,
            seed=self.hparams.seed,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            start_step=trainer.global_step * accumulate,
            end_step=trainer.max_steps * accumulate,
            counted_steps=_batches_run_in_epoch(trainer),
        )
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=self._collate(),
            num_workers=self.hparams.num_workers,
            persistent_workers=self._persistent(),
        )

    def _persistent(self) -> bool:
        """Workers outlive an epoch (and a validation run) only when they hold a cache worth keeping."""
        return bool(self.hparams.cache and self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        if self.hparams.shards is not None:  # the shard reader splits by rank itself
            return DataLoader(
                self.val_set,
                batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
                collate_fn=self._collate(),
                num_workers=self.hparams.num_workers,
            )
        # Each rank takes a contiguous share; the module gathers the embeddings before ranking.
        n, rank, world = len(self.val_set), self.trainer.global_rank, self.trainer.world_size
        if n < world:  # Lightning stops a run when one rank's validation loader is empty
            raise ValueError(
                f"{self.hparams.manifest}: validation split {self.hparams.val_split!r} has {n} usable rows, fewer "
                f"than the {world} ranks; give it at least {world} rows or set trainer.limit_val_batches 0"
            )
        share = list(range(rank * n // world, (rank + 1) * n // world))
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
            sampler=share,
            collate_fn=self._collate(),
            num_workers=self.hparams.num_workers,
            persistent_workers=self._persistent(),
        )
