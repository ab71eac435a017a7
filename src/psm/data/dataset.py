"""Training straight from a manifest: a map-style Dataset of :class:`Sample` (good up to ~100k samples).

Randomness (zoom, crop, flip) comes from a generator seeded by (seed, epoch, index), so a sample looks the
same whichever worker loads it and a resumed run sees the same data. Bad rows and files follow the
``on_error`` policy: ``raise``, or ``skip`` — reported with file, row and reason and counted, never silent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from psm.data.batch import Batch, Sample, collate_samples
from psm.data.errors import DataError, DataProblem, OnError, SkipLog, check_on_error
from psm.data.imagery_sources import get_imagery_source
from psm.data.manifest import RASTER_SUFFIXES, ManifestRow, iter_rows, read_manifest
from psm.data.metadata import MetadataSpec

if TYPE_CHECKING:
    from psm.data.imagery import RasterBands


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator private to one (seed, epoch, sample): reproducible across workers, ranks and resumes."""
    # Large odd multipliers keep nearby (epoch, index) pairs from sharing a seed.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % 2**63)


class ManifestDataset(Dataset):
    """Samples of one split of a manifest, with images of one imagery source and 48 kHz waveforms."""

    def __init__(
        self,
        manifest: str | Path,
        *,
        imagery_source: str,
        train: bool,
        zoom: int | None = None,
        split: str | None = None,
        spec: MetadataSpec | None = None,
        seed: int = 0,
        input_size: int = 224,
        on_error: OnError = "skip",
        skip_log: SkipLog | None = None,
        time_missing_means_midnight: bool = True,
        audio_features: bool = False,
        cache: bool = False,
        raster: RasterBands | None = None,
    ) -> None:
        """``audio_features=True`` computes CLAP fusion features per sample here (in DataLoader workers,
        overlapping the model on CPU training); otherwise samples carry waveforms for the training device.

        ``cache=True`` keeps, in this process, what does not change between epochs: each raster window read
        (per zoom, before the random crop and flip) and each clip's whole log-mel (CLAP's fusion features of
        a clip up to 10 s are that mel; a longer clip's random chunks are slices of it). For small datasets
        trained for many epochs on a CPU (the offline world: ~1.5 GB for 2,222 samples): after the first
        epoch a sample costs its transforms and chunk draws only.
        Needs persistent DataLoader workers (or none) to survive from one epoch to the next.

        ``raster`` (:class:`psm.data.imagery.RasterBands`) says which bands of georeferenced rasters are RGB and
        how non-uint8 values map to 0–255 (default: bands 1, 2, 3 of a uint8 raster).
        """
        from psm.data.imagery import RasterBands

        self.raster = raster if raster is not None else RasterBands()
        self.path = Path(manifest)
        self._cache: dict[tuple, Any] | None = {} if cache else None
        self.audio_features = audio_features
        self.source = get_imagery_source(imagery_source)
        self.train = train
        # zoom=None draws a zoom per sample from its (seed, epoch, index) generator: random in training,
        # and still deterministic in evaluation (the official in-training validation drew random zooms).
        self.zoom = zoom
        self.seed = seed
        self.epoch = 0
        self.input_size = input_size
        self.on_error = check_on_error(on_error)
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        spec = spec or MetadataSpec()
        df = read_manifest(self.path)
        self.rows: list[ManifestRow] = []
        for row, problems in iter_rows(df, self.path, spec, time_missing_means_midnight, split=split):
            errors = [p for p in problems if p.severity == "error"]
            if row is None or errors:
                self._problem(errors[0] if errors else DataProblem("invalid row", file=str(self.path)))
                continue
            if self.source.name not in row.images:
                self._problem(
                    DataProblem(
                        f"no {self.source.name} image",
                        file=str(self.path),
                        row=row.row,
                        key=row.key,
                        column=f"image_{self.source.name}",
                    )
                )
                continue
            self.rows.append(row)

    def _problem(self, problem: DataProblem) -> None:
        if self.on_error == "raise":
            raise DataError(problem)
        self.skip_log.record(problem)

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws (zoom, crop, flip) for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, epoch: int | None = None) -> Sample:
        """Load sample ``index`` as drawn in ``epoch`` (default: the current one); raises on bad files."""
        from psm.data.audio import load_audio
        from psm.data.imagery import (
            EvalTransform,
            ImageryError,
            TrainTransform,
            load_image,
            prepare_image,
            to_float_tensor,
        )

        row = self.rows[index]
        g = sample_generator(self.seed, self.epoch if epoch is None else epoch, index)
        zoom = self.zoom
        if zoom is None:
            levels = self.source.zoom_levels
            zoom = int(levels[int(torch.randint(len(levels), (1,), generator=g))])
        path = row.images[self.source.name]
        if path.suffix.lower() in RASTER_SUFFIXES:
            tile = self._cached(("tile", index, zoom), lambda: self._read_tile(row, zoom))
            transform = TrainTransform(self.input_size) if self.train else EvalTransform(self.input_size)
            image = transform(to_float_tensor(tile, name=path), g)
            return self._sample(index, row, image, zoom, load_audio, g)
        else:
            raw = load_image(path)
            # Reject tiles too small for the largest zoom whatever zoom this draw picked: a sample must not
            # be usable in one epoch and fail in the next.
            need = max(self.source.zoom_levels) * self.source.tile_size
            if min(raw.shape[:2]) < need:
                raise ImageryError(
                    f"{path}: image is {raw.shape[1]}×{raw.shape[0]} px but zoom "
                    f"{max(self.source.zoom_levels)} needs {need}×{need} px"
                )
        image = prepare_image(raw, self.source, zoom, self.train, g, input_size=self.input_size, name=path)
        return self._sample(index, row, image, zoom, load_audio, g)

    def _read_tile(self, row: ManifestRow, zoom: int) -> Any:
        """The row's raster window at ``zoom``: the zoom's ground footprint resampled straight to the tile size
        (GDAL "average", overviews when present). The same footprint and size as the official centre crop +
        bicubic resize of a full-resolution tile, at a fraction of the cost (docs/faithfulness.md)."""
        from psm.data.imagery import read_raster_window

        return read_raster_window(
            row.images[self.source.name],
            row.metadata["latitude"],
            row.metadata["longitude"],
            size_px=self.source.tile_size,
            gsd_m=zoom * self.source.base_gsd_m,
            **self.raster.read_kwargs(),
        )

    def fill_cache(self, threads: int | None = None) -> int:
        """Read every raster window (each zoom a sample may draw) and every clip's log-mel into the cache now,
        with ``threads`` threads (default: one per core); returns the number of entries added.

        With ``cache=True`` a worker otherwise fills it during the first epochs, one sample at a time, while the
        model waits (on 2 cores: 25–75 samples/s then, 100–137 after). Filled before the DataLoader forks its
        workers, the cache is theirs too (copy-on-write). A row that fails is left out here: loading it
        later reports it under the data error policy, as before.
        """
        import os
        from concurrent.futures import ThreadPoolExecutor

        from psm.data.audio import clap_clip_mel, load_audio

        if self._cache is None:
            raise ValueError("fill_cache needs a dataset built with cache=True")
        zooms = [self.zoom] if self.zoom is not None else list(self.source.zoom_levels)
        jobs: list[tuple[tuple, Callable[[], Any]]] = []
        for i, row in enumerate(self.rows):
            if row.images[self.source.name].suffix.lower() in RASTER_SUFFIXES:
                jobs += [(("tile", i, z), lambda row=row, z=z: self._read_tile(row, z)) for z in zooms]
            if self.audio_features:
                jobs.append((("mel", i), lambda row=row: clap_clip_mel(load_audio(row.audio_path))))
        jobs = [(key, make) for key, make in jobs if key not in self._cache]

        def run(job: tuple[tuple, Callable[[], Any]]) -> bool:
            key, make = job
            try:
                self._cache[key] = make()  # (one dict assignment: atomic under the GIL)
            except Exception:  # reported when the sample is loaded, under the error policy
                return False
            return True

        # GDAL, the audio decoders and torch's log-mel release the GIL: threads use every core.
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            return sum(pool.map(run, jobs))

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        if self._cache is None:
            return make()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _sample(
        self, index: int, row: ManifestRow, image: torch.Tensor, zoom: int, load_audio: Callable, g: torch.Generator
    ) -> Sample:
        sample = Sample(key=row.key, image=image, zoom=zoom, metadata=dict(row.metadata), caption=row.caption)
        if not self.audio_features:
            sample.waveform = torch.from_numpy(load_audio(row.audio_path))
            return sample
        from psm.data.audio import clap_clip_mel, clap_fusion_from_mel

        # The clip's whole log-mel is deterministic: kept with data.cache, so that each epoch only draws new
        # chunks of a long clip (a short clip's four channels are its one mel).
        mel = self._cached(("mel", index), lambda: clap_clip_mel(load_audio(row.audio_path)))
        # Random chunks (from this sample's generator) in training, the fixed choice in evaluation.
        sample.audio_features, sample.is_longer = clap_fusion_from_mel(mel, generator=g if self.train else None)
        return sample

    def __getitem__(self, item: int | tuple[int, int]) -> Sample | None:
        """Sample ``item`` (an index, or ``(index, epoch)`` from a step sampler); None when it is bad and
        the policy is ``skip`` (the problem is logged)."""
        from psm.data.audio import AudioDecodeError
        from psm.data.imagery import ImageryError

        index, epoch = item if isinstance(item, tuple) else (item, None)
        try:
            return self.load(index, epoch)
        except (AudioDecodeError, ImageryError, OSError) as e:
            row = self.rows[index]
            problem = DataProblem(str(e), file=str(self.path), row=row.row, key=row.key)
            if self.on_error == "raise":
                raise DataError(problem) from e
            self.skip_log.record(problem)
            return None


def make_collate(
    spec: MetadataSpec, tokenizer: Any | None = None, pad_to: str = "longest"
) -> Callable[[Sequence[Sample | None]], Batch | None]:
    """A DataLoader ``collate_fn`` that drops skipped (None) samples and builds a :class:`Batch`."""

    def collate(samples: Sequence[Sample | None]) -> Batch | None:
        kept = [s for s in samples if s is not None]
        return collate_samples(kept, spec, tokenizer, pad_to=pad_to) if kept else None

    return collate
