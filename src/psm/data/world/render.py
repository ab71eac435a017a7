"""Sentinel-2-like true-colour imagery rendered from the land cover, for any month.

Each class has its colour and texture; structure comes from the land cover's auxiliary layers: field
parcels with one crop (and colour) each and hedges or tracks at their edges, roofs and gardens in towns,
halls in the industrial estate, runway and apron at the airport, shore → deep water shading, and a
coniferous / deciduous mix in the forest. Crops, grass and deciduous trees follow the season (green-up,
rapeseed bloom, harvest, autumn colours, bare winter fields).
"""

from __future__ import annotations

import numpy as np

from psm.data.world.landcover import CLASS_CODES, CROPS, N_CODES, LandWindow
from psm.data.world.noise import CoarseField, Texture, smooth_field

REFERENCE_MONTH = 6  # the month of the mosaic the manifest points to (a clear, leaf-on June scene)

# Leaf-on fraction of grass and deciduous trees, and autumn colouring, per month (index 0 = January).
_GREEN = np.array([0.12, 0.12, 0.25, 0.55, 0.9, 1.0, 1.0, 0.9, 0.7, 0.45, 0.22, 0.12])
_AUTUMN = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.35, 1.0, 0.55, 0.1])

# Crop colour through the year (RGB, January..December).
_CROP_COLOURS: dict[str, list[tuple[int, int, int]]] = {
    "wheat": [
        (88, 108, 72),
        (88, 108, 72),
        (90, 122, 70),
        (86, 140, 64),
        (80, 150, 60),
        (140, 158, 78),
        (204, 184, 116),
        (190, 170, 132),
        (150, 124, 94),
        (128, 106, 82),
        (92, 110, 72),
        (88, 106, 72),
    ],
    "barley": [
        (92, 110, 74),
        (92, 110, 74),
        (96, 128, 72),
        (92, 146, 68),
        (120, 158, 70),
        (196, 182, 110),
        (188, 168, 128),
        (160, 134, 100),
        (134, 110, 84),
        (110, 104, 80),
        (94, 110, 74),
        (92, 108, 74),
    ],
    "rapeseed": [
        (78, 112, 70),
        (78, 110, 70),
        (84, 130, 66),
        (200, 196, 70),
        (226, 212, 58),
        (110, 140, 64),
        (140, 128, 80),
        (166, 146, 108),
        (132, 110, 84),
        (86, 124, 66),
        (80, 116, 68),
        (78, 112, 70),
    ],
    "maize": [
        (128, 104, 84),
        (128, 104, 84),
        (132, 106, 84),
        (138, 110, 86),
        (134, 112, 86),
        (110, 140, 72),
        (60, 126, 52),
        (58, 120, 50),
        (98, 118, 62),
        (150, 126, 92),
        (132, 106, 84),
        (128, 104, 84),
    ],
    "beet": [
        (126, 102, 82),
        (126, 102, 82),
        (130, 104, 84),
        (136, 108, 86),
        (120, 120, 80),
        (70, 128, 60),
        (52, 122, 56),
        (52, 120, 56),
        (62, 120, 58),
        (92, 112, 66),
        (128, 104, 82),
        (126, 102, 82),
    ],
    "fallow": [
        (132, 124, 98),
        (132, 124, 98),
        (136, 128, 98),
        (130, 136, 92),
        (126, 146, 88),
        (138, 150, 90),
        (150, 150, 96),
        (156, 146, 100),
        (150, 138, 98),
        (142, 128, 96),
        (134, 124, 98),
        (132, 124, 98),
    ],
}


def _mix(a: tuple[float, float, float], b: tuple[float, float, float], t: float) -> np.ndarray:
    return (1.0 - t) * np.asarray(a, dtype=np.float32) + t * np.asarray(b, dtype=np.float32)


def class_colours(month: int) -> np.ndarray:
    """(N_CODES, 3) float32 base colour of each class in ``month`` (before structure and texture)."""
    g, au = float(_GREEN[month - 1]), float(_AUTUMN[month - 1])
    lut = np.zeros((N_CODES, 3), dtype=np.float32)
    grass = _mix((124, 122, 88), (104, 148, 70), g)
    lut[CLASS_CODES["water"]] = (24, 46, 70)
    lut[CLASS_CODES["beach"]] = (214, 200, 166)
    lut[CLASS_CODES["forest"]] = _mix((96, 86, 72), (44, 92, 42), g)  # deciduous; conifers mixed in below
    lut[CLASS_CODES["wetland"]] = _mix((140, 126, 92), (98, 116, 70), g)
    lut[CLASS_CODES["pasture"]] = grass
    lut[CLASS_CODES["cropland"]] = (130, 108, 86)
    lut[CLASS_CODES["residential"]] = _mix((118, 116, 98), (96, 128, 74), g)  # gardens
    lut[CLASS_CODES["urban_core"]] = (104, 102, 98)
    lut[CLASS_CODES["industrial"]] = (142, 140, 136)
    lut[CLASS_CODES["road"]] = (96, 96, 98)
    lut[CLASS_CODES["airport"]] = _mix((132, 134, 96), (122, 152, 86), g)
    if au > 0:
        lut[CLASS_CODES["forest"]] = _mix(tuple(lut[CLASS_CODES["forest"]]), (150, 98, 44), 0.7 * au)
    return lut


def crop_colours(month: int) -> np.ndarray:
    """(len(CROPS), 3) float32 colour of each crop (index 0, grass, is the pasture colour)."""
    out = np.zeros((len(CROPS), 3), dtype=np.float32)
    out[0] = class_colours(month)[CLASS_CODES["pasture"]]
    for i, name in enumerate(CROPS[1:], start=1):
        out[i] = _CROP_COLOURS[name][month - 1]
    return out


class Renderer:
    """Textures and haze drawn once from the seed; :meth:`render` turns a land-cover window into RGB."""

    def __init__(self, seed: int, size_px: int) -> None:
        rng = np.random.default_rng([seed, 202])
        self.fine = Texture(rng, 512, 0.6)
        self.canopy = Texture(rng, 512, 1.3)
        self.medium = Texture(rng, 512, 4.0)
        self.fine2 = Texture(rng, 512, 0.0)
        n = -(-size_px // 50)
        self.haze = CoarseField(smooth_field(rng, (n, n), 60.0), 50)  # 500 m cells, ~30 km blobs

    def render(self, lw: LandWindow, r0: int, c0: int, month: int = REFERENCE_MONTH) -> np.ndarray:
        """RGB uint8 (3, h, w) of the land-cover window whose top-left pixel is (r0, c0)."""
        if not 1 <= month <= 12:
            raise ValueError(f"month must be 1..12, got {month}")
        cls = lw.classes
        h, w = cls.shape
        r1, c1 = r0 + h, c0 + w
        palette, conifer_delta, deep_delta = _palette(month)
        amp = _TEXTURE_AMP

        # One material id per pixel: the class, or a crop, edge, roof, runway, ... (see _palette).
        mat = cls.copy()
        is_crop = lw.crop >= 0
        mat[is_crop] = _M_CROP + lw.crop[is_crop]
        mat[lw.edge] = _M_EDGE
        speckle = self.fine2.window(r0, r1, c0, c1)
        mat[(cls == CLASS_CODES["wetland"]) & (speckle > 1.3)] = _M_POOL
        roof_kind = np.minimum((lw.parcel * 4).astype(np.uint8), 3)
        bld = lw.building
        if bld.any():
            base = np.full(cls.shape, _M_ROOF, dtype=np.uint8)
            base[cls == CLASS_CODES["urban_core"]] = _M_CORE_ROOF
            base[cls == CLASS_CODES["industrial"]] = _M_HALL
            roof = base + roof_kind
            roof[cls == CLASS_CODES["airport"]] = _M_TERMINAL
            mat[bld] = roof[bld]
        if lw.runway.any():
            mat[lw.runway] = _M_RUNWAY
            mat[lw.runway & (speckle > 2.2)] = _M_MARKING
        mat[lw.main_road] = _M_MAIN_ROAD

        bright = self.canopy.window(r0, r1, c0, c1)
        bright *= 0.6
        bright += 0.4 * self.fine.window(r0, r1, c0, c1)
        bright *= np.take(amp, mat)
        bright += 1.0
        bright += 0.03 * self.medium.window(r0, r1, c0, c1)
        bright *= 1.0 + 0.04 * self.haze.window(r0, r1, c0, c1)
        if is_crop.any():
            bright *= np.where(is_crop, 0.93 + 0.14 * lw.parcel, 1.0)
        conifer = np.where(cls == CLASS_CODES["forest"], lw.conifer, 0.0).astype(np.float32)
        deep = (1.0 - np.exp(-lw.depth / 40.0)).astype(np.float32)
        out = np.empty((3, h, w), dtype=np.uint8)
        for ch in range(3):
            c = np.take(palette[:, ch], mat)
            c += conifer_delta[ch] * conifer
            c += deep_delta[ch] * deep
            c *= bright
            c += 1.2 * speckle
            c *= 0.92  # a faint blue haze, as in top-of-atmosphere true colour
            c += (14.0, 18.0, 26.0)[ch]
            np.clip(c, 0.0, 255.0, out=c)
            np.rint(c, out=c)
            out[ch] = c
        return out


# Material ids: 0..N_CODES-1 are the classes; then crops, parcel edges, pools, roofs, runway, main road.
_M_CROP = 16
_M_EDGE = 24
_M_POOL = 25
_M_ROOF = 32
_M_CORE_ROOF = 36
_M_HALL = 40
_M_TERMINAL = 44
_M_RUNWAY = 45
_M_MARKING = 46
_M_MAIN_ROAD = 47
_N_MATERIALS = 48

_TEXTURE_AMP = np.zeros(_N_MATERIALS, dtype=np.float32)
for _name, _a in (
    ("forest", 0.20),
    ("wetland", 0.12),
    ("pasture", 0.04),
    ("cropland", 0.035),
    ("residential", 0.10),
    ("urban_core", 0.08),
    ("industrial", 0.05),
    ("water", 0.02),
    ("beach", 0.04),
    ("road", 0.04),
    ("airport", 0.03),
):
    _TEXTURE_AMP[CLASS_CODES[_name]] = _a
_TEXTURE_AMP[_M_CROP : _M_CROP + len(CROPS)] = 0.035
_TEXTURE_AMP[_M_CROP] = 0.04
_TEXTURE_AMP[_M_EDGE] = 0.10
_TEXTURE_AMP[_M_POOL] = 0.05
_TEXTURE_AMP[_M_ROOF:_M_TERMINAL] = 0.05
_TEXTURE_AMP[_M_RUNWAY:] = 0.03


def _palette(month: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Material colours in ``month``, the conifer − deciduous and deep − shallow water colour offsets."""
    g = float(_GREEN[month - 1])
    pal = np.zeros((_N_MATERIALS, 3), dtype=np.float32)
    lut = class_colours(month)
    pal[:N_CODES] = lut
    shallow = np.asarray((46, 74 + 8 * g, 84), dtype=np.float32)
    pal[CLASS_CODES["water"]] = shallow
    pal[_M_CROP : _M_CROP + len(CROPS)] = crop_colours(month)
    pal[_M_EDGE] = _mix((96, 92, 76), (70, 96, 56), g)
    pal[_M_POOL] = (52, 66, 70)
    pal[_M_ROOF : _M_ROOF + 4] = [(168, 88, 72), (140, 76, 66), (128, 124, 122), (92, 88, 90)]
    pal[_M_CORE_ROOF : _M_CORE_ROOF + 4] = [(150, 128, 116), (122, 114, 108), (168, 146, 128), (104, 100, 98)]
    pal[_M_HALL : _M_HALL + 4] = [(206, 206, 204), (184, 188, 192), (160, 162, 166), (196, 190, 178)]
    pal[_M_TERMINAL] = (204, 204, 206)
    pal[_M_RUNWAY] = (80, 80, 84)
    pal[_M_MARKING] = (222, 222, 222)
    pal[_M_MAIN_ROAD] = (118, 116, 114)
    conifer_delta = np.asarray((34, 62, 38), dtype=np.float32) - lut[CLASS_CODES["forest"]]
    deep_delta = lut[CLASS_CODES["water"]] - shallow
    return pal, conifer_delta, deep_delta
