"""Satellite imagery: loading (image files, georeferenced rasters), zoom crops and the model's transforms.

The pipeline is the official one (PSM §3; official ``SatImage_transform.py``): a raw tile of
``zoom × tile_size`` pixels at the source's base GSD is centre-cropped and resized back to ``tile_size``
(:func:`zoom_crop`), then the train or eval transform brings it to the encoder's 224 px input. Differences
from the official code, all deliberate: a tile too small for its zoom raises :class:`ImageryError` instead of
being zero-padded by ``CenterCrop``; the zoom crop clamps bicubic overshoot to [0, 1]; and the random train
transform draws from an optional ``torch.Generator`` so a seeded pipeline is reproducible.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import rasterio
import torch
from affine import Affine
from PIL import Image, UnidentifiedImageError
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from psm.data.imagery_sources import ImagerySource, get_imagery_source

# ImageNet statistics used by the official ``sat_transform`` (the ViT encoder was pre-trained with them).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Encoder input size (ViT-B/16 at 224 px, 14 × 14 patches).
DEFAULT_INPUT_SIZE = 224

# torchvision's RandomResizedCrop defaults, as used by the official train transform.
RRC_SCALE: tuple[float, float] = (0.2, 1.0)
RRC_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

ImageLike = np.ndarray | Image.Image | Tensor
PathLike = str | os.PathLike[str]
# A raster path (file, VRT, /vsicurl/ URL of a COG) or a dataset the caller keeps open.
RasterLike = str | os.PathLike[str] | DatasetReader


class ImageryError(ValueError):
    """An image or raster cannot give what was asked of it (too small, outside, unreadable, wrong dtype)."""


# --------------------------------------------------------------------------------------------------------
# Conversion and the zoom crop
# --------------------------------------------------------------------------------------------------------


def _label(name: str | os.PathLike[str] | None) -> str:
    return f"image {str(name)!r} " if name is not None else "image "


def to_float_tensor(image: ImageLike, name: str | os.PathLike[str] | None = None) -> Tensor:
    """Convert an HWC numpy array, a PIL image or a CHW tensor to a float32 CHW RGB tensor in [0, 1].

    uint8 is divided by 255 (like ``ToTensor``); float input is taken to be in [0, 1] already; a single
    channel is repeated to RGB and a fourth (alpha) channel dropped, as PIL's ``convert("RGB")`` would.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ImageryError(f"{_label(name)}must be HW or HWC, got shape {image.shape}")
        # torch cannot wrap read-only arrays (e.g. np.asarray of a PIL image) without copying.
        image = np.ascontiguousarray(image) if image.flags.writeable else image.copy()
        tensor = torch.from_numpy(image).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        tensor = image[None] if image.ndim == 2 else image
        if tensor.ndim != 3:
            raise ImageryError(f"{_label(name)}must be a CHW or HW tensor, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"expected a numpy array, PIL image or tensor, got {type(image).__name__}")

    if tensor.dtype == torch.uint8:
        tensor = tensor.to(torch.float32) / 255.0
    elif tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    else:
        # uint16 reflectances etc. have no canonical mapping to [0, 1]; the raster reader's ``scale`` does it.
        raise ImageryError(f"{_label(name)}has dtype {tensor.dtype}; expected uint8 or float in [0, 1]")

    channels = tensor.shape[0]
    if channels == 1:
        tensor = tensor.expand(3, -1, -1)
    elif channels == 4:
        tensor = tensor[:3]
    elif channels != 3:
        raise ImageryError(f"{_label(name)}has {channels} channels; expected 1, 3 or 4")
    return tensor.contiguous()


def _check_positive_int(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ImageryError(f"{what} must be a positive integer, got {value!r}")


def zoom_crop(image: ImageLike, zoom: int, tile_size: int, *, name: str | os.PathLike[str] | None = None) -> Tensor:
    """The official zoom transform: centre-crop ``zoom × tile_size`` px, resize to ``tile_size`` (bicubic).

    Returns a float CHW tensor in [0, 1]. A larger zoom sees a wider ground footprint at the same tile size.
    Raises :class:`ImageryError` when the image is smaller than the crop (the official code zero-pads).
    """
    _check_positive_int(zoom, "zoom")
    _check_positive_int(tile_size, "tile_size")
    tensor = to_float_tensor(image, name)
    need = int(zoom) * int(tile_size)
    height, width = tensor.shape[-2:]
    if height < need or width < need:
        raise ImageryError(
            f"{_label(name)}is {width}×{height} px (W×H) but zoom {zoom} at tile size {tile_size} needs "
            f"at least {need}×{need} px"
        )
    return _zoom_crop_float(tensor, need, tile_size)


def _zoom_crop_float(tensor: Tensor, need: int, tile_size: int) -> Tensor:
    """Centre-crop ``need`` px and resize to ``tile_size`` (bicubic, antialias) of float (..., C, H, W)."""
    tensor = TF.center_crop(tensor, [need, need])
    tensor = TF.resize(tensor, [tile_size, tile_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    # Bicubic overshoots at hard edges; clamping keeps the [0, 1] contract (official code leaves it).
    return tensor.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# Train / eval transforms
# --------------------------------------------------------------------------------------------------------


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator).item())


def _randint(high_exclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high_exclusive, (1,), generator=generator).item())


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Draw ``(top, left, h, w)`` of a random area/aspect crop (RandomResizedCrop rule) from ``generator``.

    Same sampling rule as torchvision (10 tries, then a centred crop of clamped aspect), but the draws
    come from the given generator (or torch's global one) so the crop is reproducible.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(height - h + 1, generator), _randint(width - w + 1, generator), h, w
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class TrainTransform:
    """RandomResizedCrop(scale 0.2–1, bicubic, antialias) → random h-flip → ImageNet normalise (official).

    Randomness comes from the call's ``generator``, else the one given here, else torch's global RNG.
    """

    input_size: int = DEFAULT_INPUT_SIZE
    generator: torch.Generator | None = None
    scale: tuple[float, float] = RRC_SCALE
    ratio: tuple[float, float] = RRC_RATIO

    def __call__(self, image: ImageLike, generator: torch.Generator | None = None) -> Tensor:
        """Transform one image (any :data:`ImageLike`) to a normalised float tensor [3, size, size]."""
        gen = generator if generator is not None else self.generator
        tensor = to_float_tensor(image)
        top, left, h, w = random_resized_crop_params(tensor.shape[-2], tensor.shape[-1], self.scale, self.ratio, gen)
        size = [self.input_size, self.input_size]
        tensor = TF.resized_crop(tensor, top, left, h, w, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        if float(torch.rand(1, generator=gen).item()) < 0.5:
            tensor = TF.horizontal_flip(tensor)
        return TF.normalize(tensor, list(IMAGENET_MEAN), list(IMAGENET_STD))


@dataclass
class EvalTransform:
    """Resize(shorter side, bicubic, antialias) → CenterCrop → ImageNet normalise (official eval)."""

    input_size: int = DEFAULT_INPUT_SIZE

    def __call__(self, image: ImageLike, generator: torch.Generator | None = None) -> Tensor:
        """Transform one image to a normalised float tensor [3, size, size]; ``generator`` is ignored."""
        del generator  # same signature as TrainTransform so callers need not branch
        return _eval_float(to_float_tensor(image), self.input_size)


def _eval_float(tensor: Tensor, input_size: int) -> Tensor:
    """The eval transform of float (..., C, H, W) in [0, 1]: one body for single images and batches."""
    tensor = TF.resize(tensor, [input_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    tensor = TF.center_crop(tensor, [input_size, input_size])
    return TF.normalize(tensor, list(IMAGENET_MEAN), list(IMAGENET_STD))


def train_transform(input_size: int = DEFAULT_INPUT_SIZE, generator: torch.Generator | None = None) -> TrainTransform:
    """The official training transform; pass a seeded ``generator`` (here or per call) for reproducibility."""
    return TrainTransform(input_size=input_size, generator=generator)


def eval_transform(input_size: int = DEFAULT_INPUT_SIZE) -> EvalTransform:
    """The official evaluation transform (deterministic)."""
    return EvalTransform(input_size=input_size)


# --------------------------------------------------------------------------------------------------------
# Zoom levels and the full view of one imagery source
# --------------------------------------------------------------------------------------------------------


def _resolve_source(source: ImagerySource | str) -> ImagerySource:
    return source if isinstance(source, ImagerySource) else get_imagery_source(source)


def _check_zoom(source: ImagerySource, zoom: int) -> None:
    # The GSD embedding was only trained at the source's zoom levels; the official README's
    # ``--test_zoom_level 0`` shows how easily an invalid one slips through.
    if zoom not in source.zoom_levels:
        raise ImageryError(
            f"zoom {zoom!r} is not a zoom level of imagery source {source.name!r} "
            f"(valid: {', '.join(map(str, source.zoom_levels))})"
        )


def sample_zoom(source: ImagerySource | str, generator: torch.Generator | None = None) -> int:
    """Draw a zoom level uniformly from the source's levels (training and validation, official loader)."""
    levels = _resolve_source(source).zoom_levels
    return int(levels[_randint(len(levels), generator)])


def prepare_image(
    image: ImageLike,
    source: ImagerySource | str,
    zoom: int,
    train: bool,
    generator: torch.Generator | None = None,
    *,
    input_size: int = DEFAULT_INPUT_SIZE,
    name: str | os.PathLike[str] | None = None,
) -> Tensor:
    """Zoom-crop a raw tile of ``source`` and apply the train or eval transform → normalised [3, 224, 224]."""
    src = _resolve_source(source)
    _check_zoom(src, zoom)
    tile = zoom_crop(image, zoom, src.tile_size, name=name)
    transform = TrainTransform(input_size) if train else EvalTransform(input_size)
    return transform(tile, generator)


def prepare_eval_batch(
    raw: Tensor, source: ImagerySource | str, zoom: int, *, input_size: int = DEFAULT_INPUT_SIZE
) -> Tensor:
    """:func:`prepare_image` (eval) of a batch of raw uint8 tiles (B, 3, H, W) on any device → (B, 3, S, S).

    The same operations as one image at a time (bit-identical on CPU), run as batched kernels where the
    tensor lives: the map index moves raw footprints to the GPU and transforms them there, because the
    zoom-5 resize is the most expensive CPU step of reading a tile.
    """
    src = _resolve_source(source)
    _check_zoom(src, zoom)
    if raw.ndim != 4 or raw.shape[1] != 3 or raw.dtype != torch.uint8:
        raise ImageryError(f"expected a uint8 (B, 3, H, W) batch, got {raw.dtype} {tuple(raw.shape)}")
    need = int(zoom) * src.tile_size
    height, width = raw.shape[2:]
    if height < need or width < need:
        raise ImageryError(f"tiles are {width}×{height} px (W×H) but zoom {zoom} needs at least {need}×{need} px")
    # Crop the uint8 first (a view): converting the whole zoom-5 footprint to float would cost 25× the memory.
    top, left = round((height - need) / 2.0), round((width - need) / 2.0)
    crop = raw[:, :, top : top + need, left : left + need]
    tensor = (crop.to(torch.float32) / 255.0).contiguous()
    return _eval_float(_zoom_crop_float(tensor, need, src.tile_size), input_size)


@dataclass(frozen=True)
class SatelliteView:
    """How the model sees raw tiles of one imagery source: zoom choice, zoom crop and transform.

    Training with ``zoom=None`` samples a zoom per image; evaluation needs a fixed ``zoom`` (official
    ``--test_zoom_level``), or ``draw_zoom=True``: a zoom per image from the caller's per-sample generator
    with the evaluation transform, as the official in-training validation drew them. Calls return the
    image and the zoom used (the GSD embedding needs it).
    """

    source: ImagerySource
    train: bool = False
    zoom: int | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    draw_zoom: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _resolve_source(self.source))
        if self.zoom is not None:
            _check_zoom(self.source, self.zoom)
        elif not self.train and not self.draw_zoom:
            if len(self.source.zoom_levels) != 1:
                raise ImageryError(
                    f"evaluation view of {self.source.name!r} needs a fixed zoom "
                    f"(one of {', '.join(map(str, self.source.zoom_levels))})"
                )
            object.__setattr__(self, "zoom", self.source.zoom_levels[0])

    def gsd_m(self, zoom: int) -> float:
        """Ground sample distance of the raw pixels behind a zoom level (the GSD embedding's ``res``)."""
        return zoom * self.source.base_gsd_m

    def __call__(
        self,
        image: ImageLike,
        generator: torch.Generator | None = None,
        *,
        name: str | os.PathLike[str] | None = None,
    ) -> tuple[Tensor, int]:
        """Prepare one raw tile: returns the normalised [3, size, size] tensor and the zoom level used."""
        if self.zoom is None and not self.train and generator is None:
            raise ImageryError("an evaluation view that draws its zoom needs each sample's generator")
        zoom = self.zoom if self.zoom is not None else sample_zoom(self.source, generator)
        image_t = prepare_image(image, self.source, zoom, self.train, generator, input_size=self.input_size, name=name)
        return image_t, zoom


# --------------------------------------------------------------------------------------------------------
# Loading: plain image files
# --------------------------------------------------------------------------------------------------------


# PIL modes of more than 8 bits per pixel value (16-bit PNG/TIFF, 32-bit int, float): convert("RGB")
# clips them to 0..255, which silently saturates e.g. reflectances stored as 16-bit grey.
_WIDE_PIL_MODES: tuple[str, ...] = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def pil_to_rgb(img: Image.Image, name: str | os.PathLike[str]) -> np.ndarray:
    """Decode an open PIL image to RGB HWC uint8; refuses wide (16-bit, 32-bit, float) modes it would clip."""
    if img.mode in _WIDE_PIL_MODES:
        raise ImageryError(
            f"{_label(name)}has PIL mode {img.mode!r} (more than 8 bits per value): converting it to 8-bit RGB "
            f"would clip its values; save it as 8-bit, or give a georeferenced raster and use scale=(lo, hi)"
        )
    # convert() forces the full decode, so truncated files fail here and not later in a worker.
    return np.array(img.convert("RGB"))


def load_image(path: PathLike) -> np.ndarray:
    """Read a JPEG/PNG (anything PIL reads) as an RGB HWC uint8 array; corrupt files raise ImageryError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return pil_to_rgb(img, path)
    except ImageryError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageryError(f"cannot read image file {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------------------
# Loading: georeferenced rasters
# --------------------------------------------------------------------------------------------------------


def _open_raster(path: PathLike) -> DatasetReader:
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise ImageryError(f"cannot open raster {os.fspath(path)}: {exc}") from exc


@dataclass(frozen=True)
class RasterBands:
    """How a georeferenced raster becomes an RGB tile: which bands are R, G, B (1-based), and for values that are
    not uint8 the range ``scale=(lo, hi)`` mapped linearly to 0–255 (e.g. (0, 3000) for Sentinel-2 L2A
    reflectance × 10,000 in bands (4, 3, 2) of a 13-band file)."""

    bands: tuple[int, ...] = (1, 2, 3)
    scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
        if len(self.bands) != 3:
            raise ValueError(f"raster bands must name 3 bands (R G B), got {list(self.bands)}")
        if min(self.bands) < 1:
            raise ValueError(f"raster bands are 1-based band numbers, got {list(self.bands)}")
        if self.scale is not None:
            lo, hi = (float(v) for v in self.scale)
            if not hi > lo:
                raise ValueError(f"raster scale must be (lo, hi) with hi > lo, got {self.scale!r}")
            object.__setattr__(self, "scale", (lo, hi))

    def read_kwargs(self) -> dict[str, object]:
        """Keyword arguments of :func:`read_raster_window` and :func:`read_tile_for_zoom`."""
        return {"bands": self.bands, "scale": self.scale}


def _check_bands_and_dtype(
    src: DatasetReader, name: str, bands: Sequence[int], scale: tuple[float, float] | None
) -> None:
    if not bands:
        raise ImageryError(f"{name}: no bands requested")
    bad = [b for b in bands if not 1 <= b <= src.count]
    if bad:
        raise ImageryError(
            f"{name} has {src.count} band(s); bands {bad} do not exist (bands are 1-based; "
            f"pass e.g. bands=(1,) for a single-band raster)"
        )
    dtypes = {src.dtypes[b - 1] for b in bands}
    if scale is None and dtypes != {"uint8"}:
        raise ImageryError(
            f"{name} has dtype {'/'.join(sorted(dtypes))}; pass scale=(lo, hi) to map values "
            f"linearly to 0–255 (e.g. scale=(0, 3000) for Sentinel-2 L1C/L2A reflectance × 10000)"
        )
    if scale is not None and not scale[1] > scale[0]:
        raise ImageryError(f"scale must be (lo, hi) with hi > lo, got {scale!r}")


def _raster_name(path: RasterLike) -> str:
    return str(path.name) if isinstance(path, DatasetReader) else os.fspath(path)


# A projected raster whose pixels on the ground differ from their size in CRS units by more than this is read
# like a geographic one, each footprint warped to a local metric grid. UTM (≤ 0.1 %) and national grids are
# read in place; Web Mercator (1/cos(lat): 5 % at 18°, 64 % at 52°) is warped.
MAX_GROUND_SCALE_ERROR = 0.05
_READS_IN_PLACE: dict[tuple, bool] = {}


def _north_up(t: Affine) -> bool:
    return t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0


def _ground_steps(src: DatasetReader, col: float, row: float) -> tuple[float, float]:
    """Ground length in metres of one pixel step along columns and along rows at pixel (col, row), measured in
    a local metric grid: for any CRS, rotated or flipped grids included."""
    t = src.transform
    xs, ys = zip(t @ (col, row), t @ (col + 1, row), t @ (col, row + 1), strict=True)
    lon, lat = warp_transform(src.crs, "EPSG:4326", [xs[0]], [ys[0]])
    mx, my = warp_transform(src.crs, _local_metric_crs(lat[0], lon[0]), list(xs), list(ys))
    return math.hypot(mx[1] - mx[0], my[1] - my[0]), math.hypot(mx[2] - mx[0], my[2] - my[0])


def ground_scale_error(src: DatasetReader) -> float:
    """Largest relative difference between a pixel's ground size and its size in CRS units × metres per unit,
    over a 3×3 spread of places in the raster."""
    t, unit_to_m = src.transform, src.crs.linear_units_factor[1]
    steps = (math.hypot(t.a, t.d) * unit_to_m, math.hypot(t.b, t.e) * unit_to_m)
    worst = 0.0
    for col in (0.5, 0.5 * src.width, src.width - 0.5):
        for row in (0.5, 0.5 * src.height, src.height - 0.5):
            for ground, step in zip(_ground_steps(src, col, row), steps, strict=True):
                worst = max(worst, abs(ground / step - 1.0))
    return worst


def reads_in_place(src: DatasetReader) -> bool:
    """Whether footprints are cut from the raster's own pixel grid: projected, north-up, and CRS units that
    are ground metres (within :data:`MAX_GROUND_SCALE_ERROR`). Other rasters are warped per footprint."""
    if src.crs.is_geographic or not _north_up(src.transform):
        return False
    key = (src.name, tuple(src.transform), src.crs.to_wkt(), src.width, src.height)
    if key not in _READS_IN_PLACE:
        _READS_IN_PLACE[key] = ground_scale_error(src) <= MAX_GROUND_SCALE_ERROR
    return _READS_IN_PLACE[key]


def ground_pixel_m(src: DatasetReader, x: float | None = None, y: float | None = None) -> float:
    """Ground size in metres of one pixel at CRS position (x, y) (default: the raster's centre), mean of both
    axes; for any CRS, rotated or flipped grids included."""
    col, row = (0.5 * src.width, 0.5 * src.height) if x is None or y is None else ~src.transform @ (x, y)
    return 0.5 * sum(_ground_steps(src, col, row))


def native_gsd_m(src: DatasetReader) -> float | None:
    """Pixel size in metres of a raster read in place (mean of x and y), None for any other (warped) raster."""
    if not reads_in_place(src):
        return None
    _, unit_to_m = src.crs.linear_units_factor
    return 0.5 * (abs(src.res[0]) + abs(src.res[1])) * unit_to_m


def _local_metric_crs(lat: float, lon: float) -> CRS:
    # A transverse Mercator centred on the point: metres, north-up, negligible scale error over a tile,
    # and no UTM-zone edge cases.
    return CRS.from_proj4(
        f"+proj=tmerc +lat_0={lat!r} +lon_0={lon!r} +k=1 +x_0=0 +y_0=0 +datum=WGS84 +units=m +no_defs"
    )


def _scaled_uint8(data: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    """Raster values as uint8: as they are, or ``scale=(lo, hi)`` mapped linearly to 0–255 and clipped."""
    if scale is None:
        return data
    lo, hi = scale
    out = (data.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.clip(out, 0.0, 255.0, out=out)).astype(np.uint8)


def _to_uint8_hwc(data: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    # Readers fill pixel-interleaved buffers (see _read_interleaved): this transpose is then a free view.
    return np.ascontiguousarray(_scaled_uint8(data, scale).transpose(1, 2, 0))


def _read_interleaved(reader: DatasetReader, bands: list[int], height: int, width: int, **kwargs: object) -> np.ndarray:
    """``reader.read(bands, **kwargs)`` as a (C, H, W) view of a pixel-interleaved (H, W, C) array.

    GDAL writes the interleaved layout directly (a 1,280² RGB read: 7 ms instead of 2 ms + a 13 ms numpy
    transpose, and GDAL does it without holding the GIL, so map decode threads scale).
    """
    dtype = np.result_type(*(reader.dtypes[b - 1] for b in bands))
    view = np.empty((height, width, len(bands)), dtype=dtype).transpose(2, 0, 1)
    reader.read(bands, out=view, **kwargs)
    return view


def read_pixel_window(
    src: DatasetReader,
    col0: int,
    row0: int,
    width: int,
    height: int,
    bands: Sequence[int],
    scale: tuple[float, float] | None,
    *,
    channels_first: bool = False,
) -> np.ndarray:
    """HWC (or CHW) uint8 of the ``width × height`` pixels from (row0, col0), which must lie inside the raster.

    The bare read behind :func:`read_raster_window`'s native-resolution path (same values), for callers
    that placed many windows at once and want no per-window checks. ``channels_first`` returns the bands as
    GDAL stores them, without the interleaving (a 1,280² RGB read: ~2 instead of ~7 ms).
    """
    window = Window(col0, row0, width, height)
    if channels_first:
        return np.ascontiguousarray(_scaled_uint8(src.read(list(bands), window=window), scale))
    return _to_uint8_hwc(_read_interleaved(src, list(bands), height, width, window=window), scale)


def _read_native(
    src: DatasetReader,
    name: str,
    x: float,
    y: float,
    size_px: int,
    bands: list[int],
    boundless: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``size_px`` raster pixels around (x, y) with no resampling; the point's pixel lands at size//2."""
    col_f, row_f = ~src.transform @ (x, y)
    col0 = math.floor(col_f) - size_px // 2
    row0 = math.floor(row_f) - size_px // 2
    col1, row1 = col0 + size_px, row0 + size_px
    inside = col0 >= 0 and row0 >= 0 and col1 <= src.width and row1 <= src.height
    if inside and not boundless:
        return _read_interleaved(src, bands, size_px, size_px, window=Window(col0, row0, size_px, size_px)), None
    if not inside and not boundless:
        raise ImageryError(
            f"{name}: a {size_px}×{size_px} px window at rows {row0}:{row1}, cols {col0}:{col1} "
            f"is partly outside the raster ({src.height} rows × {src.width} cols); "
            f"pass boundless=True to fill the outside with 0"
        )
    # Boundless: read only the overlap and paste it into a zero canvas.
    data = np.zeros((size_px, size_px, len(bands)), dtype=src.dtypes[bands[0] - 1]).transpose(2, 0, 1)
    valid = np.zeros((size_px, size_px), dtype=bool)
    r0, r1 = max(row0, 0), min(row1, src.height)
    c0, c1 = max(col0, 0), min(col1, src.width)
    if r1 > r0 and c1 > c0:
        window = Window(c0, r0, c1 - c0, r1 - r0)
        dst = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
        src.read(bands, window=window, out=data[(slice(None), *dst)])
        valid[dst] = (src.read_masks(bands, window=window) > 0).all(axis=0)
    return data, valid


def _read_resampled(
    src: DatasetReader,
    name: str,
    lat: float,
    lon: float,
    x: float,
    y: float,
    size_px: int,
    gsd_m: float,
    bands: list[int],
    boundless: bool,
    resampling: Resampling | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Warp the ground square of ``size_px × gsd_m`` metres centred on the point onto a size_px grid."""
    if not reads_in_place(src):
        # Degrees, CRS units that are not ground metres (Web Mercator), or a flipped or rotated grid: warp to a
        # local metric grid centred on the point, so the footprint is gsd_m metres per pixel on the ground.
        dst_crs, cx, cy, step = _local_metric_crs(lat, lon), 0.0, 0.0, gsd_m
    else:
        _, unit_to_m = src.crs.linear_units_factor
        dst_crs, cx, cy, step = src.crs, x, y, gsd_m / unit_to_m
    half = 0.5 * size_px * step
    dst_transform = Affine(step, 0.0, cx - half, 0.0, -step, cy + half)

    # Is the footprint inside the raster? Check in source pixel space so rotated grids work too.
    left, bottom, right, top = transform_bounds(dst_crs, src.crs, cx - half, cy - half, cx + half, cy + half)
    corners_px = [~src.transform @ (cx_, cy_) for cx_ in (left, right) for cy_ in (bottom, top)]
    cols, rows = zip(*corners_px, strict=True)
    tol = 1e-3  # source pixels; absorbs round-off of an exactly fitting footprint
    inside = min(cols) >= -tol and min(rows) >= -tol and max(cols) <= src.width + tol and max(rows) <= src.height + tol
    if not inside and not boundless:
        raise ImageryError(
            f"{name}: the {size_px * gsd_m:g} m ground square ({size_px} px at {gsd_m:g} m) "
            f"around lat={lat}, lon={lon} is partly outside the raster (source rows "
            f"{min(rows):.1f}..{max(rows):.1f}, cols {min(cols):.1f}..{max(cols):.1f} of "
            f"{src.height}×{src.width}); "
            f"pass boundless=True to fill the outside with 0"
        )

    if resampling is None:
        native = native_gsd_m(src)
        if native is None:  # a warped raster: its pixel's ground size at the point
            native = ground_pixel_m(src, x, y)
        # Averaging when shrinking avoids aliasing; bilinear when enlarging avoids blockiness.
        resampling = Resampling.average if gsd_m > native else Resampling.bilinear

    t = src.transform
    if not boundless and dst_crs == src.crs and t.b == 0 and t.d == 0:
        # Same CRS, north-up: a decimated windowed read gives the same grid without a warper and lets GDAL
        # use the raster's overviews (several times faster for large zooms).
        window = from_bounds(cx - half, cy - half, cx + half, cy + half, transform=t)
        return _read_interleaved(src, bands, size_px, size_px, window=window, resampling=resampling), None

    # The VRT only defines the output grid; GDAL then reads just the source blocks under it.
    with WarpedVRT(
        src,
        crs=dst_crs,
        transform=dst_transform,
        width=size_px,
        height=size_px,
        resampling=resampling,
        add_alpha=boundless,  # an alpha band marks what the source covered, with or without nodata
    ) as vrt:
        data = _read_interleaved(vrt, bands, size_px, size_px)
        valid = vrt.dataset_mask() > 0 if boundless else None
    return data, valid


@overload
def read_raster_window(
    path: RasterLike,
    lat: float,
    lon: float,
    size_px: int,
    gsd_m: float | None = ...,
    bands: Sequence[int] = ...,
    *,
    boundless: Literal[False] = ...,
    scale: tuple[float, float] | None = ...,
    resampling: Resampling | None = ...,
) -> np.ndarray: ...


@overload
def read_raster_window(
    path: RasterLike,
    lat: float,
    lon: float,
    size_px: int,
    gsd_m: float | None = ...,
    bands: Sequence[int] = ...,
    *,
    boundless: Literal[True],
    scale: tuple[float, float] | None = ...,
    resampling: Resampling | None = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


def read_raster_window(
    path: RasterLike,
    lat: float,
    lon: float,
    size_px: int,
    gsd_m: float | None = None,
    bands: Sequence[int] = (1, 2, 3),
    *,
    boundless: bool = False,
    scale: tuple[float, float] | None = None,
    resampling: Resampling | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Read a square ``size_px`` window centred on (lat, lon) from a GeoTIFF/COG/VRT/JP2 as HWC uint8.

    ``path`` is a file or GDAL path (e.g. ``/vsicurl/`` COG) or an open rasterio dataset, which is left
    open. Only the window is read, never the whole raster. Geometry:

    * ``gsd_m=None`` (or equal to the raster's pixel size): raster pixels as they are; the pixel
      containing the point is at ``[size_px // 2, size_px // 2]``.
    * otherwise the ground square of ``size_px × gsd_m`` metres centred on the point is resampled to
      ``size_px`` pixels (``average`` when shrinking, ``bilinear`` when enlarging, or ``resampling``);
      geographic (degree) rasters are warped to a local metric grid so the footprint is in metres.

    Values: uint8 bands are returned as they are; other dtypes need ``scale=(lo, hi)``, mapped linearly to
    0–255 and clipped (no automatic percentile stretch, which would differ tile to tile).

    Errors (:class:`ImageryError`, naming the file): point outside the raster; window partly outside
    unless ``boundless=True``, which fills the outside with 0 and returns ``(image, valid)`` where
    ``valid`` is a bool [size_px, size_px] mask (False outside the raster or on nodata).
    """
    _check_positive_int(size_px, "size_px")
    if gsd_m is not None and not gsd_m > 0:
        raise ImageryError(f"gsd_m must be positive, got {gsd_m!r}")
    bands = [int(b) for b in bands]
    name = _raster_name(path)
    # An already open dataset stays open: a map grid reads many windows from one raster.
    context = contextlib.nullcontext(path) if isinstance(path, DatasetReader) else _open_raster(path)
    with context as src:
        _check_bands_and_dtype(src, name, bands, scale)
        if src.crs is None:
            raise ImageryError(f"{name} has no CRS; cannot place lat/lon in it")
        xs, ys = warp_transform("EPSG:4326", src.crs, [lon], [lat])
        x, y = xs[0], ys[0]
        col_f, row_f = ~src.transform @ (x, y)
        if not (0 <= col_f < src.width and 0 <= row_f < src.height and math.isfinite(x) and math.isfinite(y)):
            west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
            raise ImageryError(
                f"{name}: point lat={lat}, lon={lon} is outside the raster "
                f"(covers lat {south:.5f}..{north:.5f}, lon {west:.5f}..{east:.5f})"
            )
        native = native_gsd_m(src)
        if gsd_m is None and not _north_up(src.transform):
            raise ImageryError(
                f"{name} is not north-up (transform {tuple(src.transform)[:6]}): its pixels as stored would come "
                "out turned; give gsd_m to read a north-up footprint warped from it"
            )
        if gsd_m is None or (native is not None and math.isclose(gsd_m, native, rel_tol=1e-6)):
            data, valid = _read_native(src, name, x, y, size_px, bands, boundless)
        else:
            data, valid = _read_resampled(src, name, lat, lon, x, y, size_px, gsd_m, bands, boundless, resampling)
    image = _to_uint8_hwc(data, scale)
    if valid is None:
        return image
    image[~valid] = 0  # one fill value whatever the raster's nodata, so outside looks the same everywhere
    return image, valid


@overload
def read_tile_for_zoom(
    path: RasterLike,
    lat: float,
    lon: float,
    source: ImagerySource | str,
    zoom: int,
    *,
    bands: Sequence[int] = ...,
    scale: tuple[float, float] | None = ...,
    boundless: Literal[False] = ...,
) -> Tensor: ...


@overload
def read_tile_for_zoom(
    path: RasterLike,
    lat: float,
    lon: float,
    source: ImagerySource | str,
    zoom: int,
    *,
    bands: Sequence[int] = ...,
    scale: tuple[float, float] | None = ...,
    boundless: Literal[True],
) -> tuple[Tensor, np.ndarray]: ...


def read_tile_for_zoom(
    path: RasterLike,
    lat: float,
    lon: float,
    source: ImagerySource | str,
    zoom: int,
    *,
    bands: Sequence[int] = (1, 2, 3),
    scale: tuple[float, float] | None = None,
    boundless: bool = False,
) -> Tensor | tuple[Tensor, np.ndarray]:
    """Read the ground footprint of one zoom level around (lat, lon) and return its zoom crop [3, tile, tile].

    Reads ``zoom × tile_size`` pixels at the source's base GSD (resampling if the raster's differs), so the
    result equals the official zoom crop of a raw tile centred on the point. With ``boundless=True`` also
    returns the raw-footprint validity mask (see :func:`read_raster_window`).
    """
    src = _resolve_source(source)
    _check_zoom(src, zoom)
    size = zoom * src.tile_size
    if boundless:
        raw, valid = read_raster_window(path, lat, lon, size, src.base_gsd_m, bands, boundless=True, scale=scale)
        return zoom_crop(raw, zoom, src.tile_size, name=_raster_name(path)), valid
    raw = read_raster_window(path, lat, lon, size, src.base_gsd_m, bands, scale=scale)
    return zoom_crop(raw, zoom, src.tile_size, name=_raster_name(path))
