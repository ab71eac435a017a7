"""A one-image overview of a world (docs/world.png): land cover, imagery, a close-up, one truth layer at
two hours. Drawn with PIL only (no plotting library)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from psm.data.world.landcover import CLASSES, N_CODES

PANEL = 330
# A perceptually ordered ramp (dark blue → green → yellow), 5 stops, for probabilities 0..1.
_RAMP = np.array([(20, 20, 60), (40, 70, 140), (30, 140, 130), (120, 200, 80), (250, 230, 60)], dtype=np.float64)


def ramp(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] → RGB uint8 through :data:`_RAMP`."""
    x = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    f = (x - i)[..., None]
    return np.rint(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _region_box(world, n_px: int) -> tuple[float, float, float, float]:
    g = world.grid
    left, bottom, right, top = g.region_bounds
    rl, _, _, rt = g.raster_bounds
    s = n_px / g.total_m
    return ((left - rl) * s, (rt - top) * s, (right - rl) * s, (rt - bottom) * s)


def draw_picture(
    world,
    out: str | os.PathLike[str],
    event: str = "traffic",
    month: int = 5,
    hours: tuple[int, int] = (8, 22),
) -> Path:
    """Write the overview PNG of ``world`` (a World or its folder) and return its path."""
    import rasterio
    from rasterio.enums import Resampling

    from psm.data.world.world import World, load_world

    w = world if isinstance(world, World) else load_world(world)
    pal = np.zeros((N_CODES, 3), dtype=np.uint8)
    for c in CLASSES:
        pal[c.code] = c.colour
    with rasterio.open(w.landcover_path) as src:
        lc = src.read(1, out_shape=(PANEL, PANEL), resampling=Resampling.mode)
    with rasterio.open(w.mosaic_path) as src:
        img = src.read(out_shape=(3, PANEL, PANEL), resampling=Resampling.average).transpose(1, 2, 0)
        # Close-up: a zoom-3 footprint (768 px = 7.7 km) around the town centre.
        tx, ty = w.info["structures"]["town_centre_xy"]
        row, col = src.index(tx, ty)
        half = 384
        r0 = int(np.clip(row - half, 0, src.height - 2 * half))
        c0 = int(np.clip(col - half, 0, src.width - 2 * half))
        close = src.read(
            window=rasterio.windows.Window(c0, r0, 2 * half, 2 * half),
            out_shape=(3, PANEL, PANEL),
            resampling=Resampling.average,
        ).transpose(1, 2, 0)
    names = list(w.events)
    e = names.index(event)
    layers = [w.truth.layer(month, h)[e] for h in hours]
    vmax = max(float(np.max(layer)) for layer in layers) or 1.0

    def layer_img(a: np.ndarray) -> Image.Image:
        return Image.fromarray(ramp(a / vmax)).resize((PANEL, PANEL), Image.NEAREST)

    panels = [
        (Image.fromarray(pal[lc]), "land cover (10 m)"),
        (Image.fromarray(img), f"imagery, month {w.info['imagery']['reference_month']}"),
        (Image.fromarray(close), "close-up: town, 7.7 km"),
        (layer_img(layers[0]), f"P({event}) {hours[0]:02d} h, month {month}"),
        (layer_img(layers[1]), f"P({event}) {hours[1]:02d} h, month {month}"),
    ]
    pad, head, foot = 10, 26, 92
    width = len(panels) * PANEL + (len(panels) + 1) * pad
    height = head + PANEL + foot
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(12)
    box = _region_box(w, PANEL)
    for k, (im, title) in enumerate(panels):
        x0 = pad + k * (PANEL + pad)
        canvas.paste(im, (x0, head))
        draw.text((x0, 5), title, fill=(0, 0, 0), font=font)
        if k in (0, 1, 3, 4):  # the sampling region inside the raster margin
            draw.rectangle([x0 + box[0], head + box[1], x0 + box[2], head + box[3]], outline=(255, 255, 255))
        if k == 2:
            cx, cy = x0 + PANEL // 2, head + PANEL // 2
            h1 = PANEL / 6  # zoom-1 footprint (2.56 km) inside the zoom-3 close-up
            draw.rectangle([cx - h1, cy - h1, cx + h1, cy + h1], outline=(255, 255, 0))
    # Legend: classes, then the probability ramp.
    y = head + PANEL + 8
    x = pad
    for c in CLASSES:
        label = c.name.replace("_", " ")
        tw = draw.textlength(label, font=small)
        if x + 16 + tw > 3 * (PANEL + pad):
            x, y = pad, y + 18
        draw.rectangle([x, y + 2, x + 11, y + 13], fill=c.colour, outline=(80, 80, 80))
        draw.text((x + 15, y), label, fill=(0, 0, 0), font=small)
        x += int(15 + tw + 12)
    rx0 = pad + 3 * (PANEL + pad)
    bar = ramp(np.linspace(0, 1, 2 * PANEL + pad)[None, :].repeat(12, axis=0))
    canvas.paste(Image.fromarray(bar), (rx0, head + PANEL + 10))
    draw.text((rx0, head + PANEL + 26), "0", fill=(0, 0, 0), font=small)
    draw.text((rx0 + 2 * PANEL + pad - 30, head + PANEL + 26), f"{vmax:.2f}", fill=(0, 0, 0), font=small)
    g = w.grid
    draw.text(
        (pad, height - 22),
        f"psm world '{w.size}', seed {w.seed}: {g.extent_m / 1000:g} km region (white box) + {g.margin_m / 1000:g} km "
        f"margin around {g.centre_lat:.2f} N {g.centre_lon:.2f} E, {g.crs}; yellow box: zoom-1 footprint",
        fill=(60, 60, 60),
        font=small,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return out
