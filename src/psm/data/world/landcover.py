"""Procedural land cover: smooth random fields thresholded, plus structure (river, lakes and shores, a town
with an urban core → residential gradient and street grid, villages, industry, an airport, a road network
and field parcels).

The whole map is defined by a few coarse fields and analytic shapes drawn once from the seed
(:class:`LandCoverModel`), and evaluated at any 10 m window (:meth:`LandCoverModel.window`), so the
5000-10000² px rasters are made strip by strip in bounded memory, with no per-pixel Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from psm.data.world.grid import WorldGrid
from psm.data.world.noise import CoarseField, hash32, smooth_1d, smooth_field


@dataclass(frozen=True)
class LandClass:
    code: int
    name: str
    colour: tuple[int, int, int]  # legend / colormap colour (not the rendered imagery colour)
    description: str


CLASSES: tuple[LandClass, ...] = (
    LandClass(1, "water", (38, 92, 168), "lakes and the river"),
    LandClass(2, "beach", (236, 214, 160), "sandy lake shore"),
    LandClass(3, "forest", (24, 110, 44), "deciduous and coniferous woodland"),
    LandClass(4, "wetland", (110, 160, 140), "reed beds and wet meadows by water and in hollows"),
    LandClass(5, "pasture", (150, 206, 96), "grazed grassland parcels"),
    LandClass(6, "cropland", (226, 196, 92), "arable parcels (wheat, barley, rapeseed, maize, beet, fallow)"),
    LandClass(7, "residential", (232, 140, 120), "houses and gardens, town edge and villages"),
    LandClass(8, "urban_core", (180, 30, 40), "dense town and village centres"),
    LandClass(9, "industrial", (150, 110, 170), "industrial estate: halls and yards"),
    LandClass(10, "road", (70, 70, 70), "main, secondary and town roads"),
    LandClass(11, "airport", (200, 200, 220), "airfield: runway, taxiways, apron, grass"),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
CLASS_CODES: dict[str, int] = {c.name: c.code for c in CLASSES}
N_CODES = max(c.code for c in CLASSES) + 1  # codes 0..11; 0 is nodata (never written inside the raster)

# Crops of the field parcels (render colours per month live in render.py).
CROPS: tuple[str, ...] = ("grass", "wheat", "barley", "rapeseed", "maize", "beet", "fallow")
_CROP_CDF = np.cumsum([0.30, 0.15, 0.15, 0.20, 0.10, 0.10])  # wheat, barley, rapeseed, maize, beet, fallow

COARSE_FACTOR = 5  # coarse field cells of 5 × 10 m = 50 m
_UI_OFFSET = 512  # parcel strips are indexed -512..511 along each zone's axis (±80 km at 160 m strips)


@dataclass
class LandWindow:
    """Land cover of a raster window and what the renderer needs to draw it."""

    classes: np.ndarray  # uint8 class codes
    crop: np.ndarray  # int8 crop index (CROPS) on parcels, -1 elsewhere
    parcel: np.ndarray  # float32 in [0, 1): per-parcel / per-building random value
    edge: np.ndarray  # bool: hedge or track at a parcel edge
    building: np.ndarray  # bool: roof pixel in residential / urban / industrial / airport areas
    conifer: np.ndarray  # float32 0..1 share of conifers (forest colour)
    depth: np.ndarray  # float32 metres from the shore into water (0 on land)
    main_road: np.ndarray  # bool: main road (wider, brighter)
    runway: np.ndarray  # bool: runway / taxiway pavement


def _cell_hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) float32 per integer cell (a, b) (floats holding integers, |a|, |b| < 32768)."""
    key = (a.astype(np.int32) & 0xFFFF).astype(np.uint32) << np.uint32(16)
    key |= (b.astype(np.int32) & 0xFFFF).astype(np.uint32)
    key ^= np.uint32(salt & 0xFFFFFFFF)
    return (hash32(key) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _rot(theta: float) -> tuple[float, float]:
    return math.cos(theta), math.sin(theta)


class LandCoverModel:
    """Everything random about the land cover, drawn once from ``seed``; evaluate with :meth:`window`."""

    def __init__(self, grid: WorldGrid, seed: int) -> None:
        self.grid = grid
        rng = np.random.default_rng([seed, 101])
        n = grid.size_px
        self.size = n
        cshape = (math.ceil(n / COARSE_FACTOR), math.ceil(n / COARSE_FACTOR))
        cell = grid.gsd_m * COARSE_FACTOR  # 50 m

        def field(*parts: tuple[float, float]) -> np.ndarray:
            out = sum(w * smooth_field(rng, cshape, sigma_m / cell) for w, sigma_m in parts)
            out = out - out.mean()
            return (out / out.std()).astype(np.float32)

        elev = field((0.75, 4000.0), (0.45, 1200.0), (0.15, 300.0))
        forest = field((0.8, 2000.0), (0.5, 600.0), (0.25, 150.0))
        moist = 0.7 * field((1.0, 1500.0), (0.3, 300.0)) - 0.5 * elev
        beach = field((1.0, 500.0))
        zone = field((1.0, 3000.0))
        village_noise = field((1.0, 250.0), (0.4, 80.0))
        warp_x, warp_y = field((1.0, 1200.0)), field((1.0, 1200.0))
        # Lakes: the lowest ground; distance to the shore ≈ (E − t) / |∇E| (first order).
        self.lake_level = float(np.quantile(elev, 0.075))
        gy, gx = np.gradient(elev.astype(np.float64), cell)
        grad = np.maximum(np.hypot(gx, gy), 1e-5).astype(np.float32)
        self.f_elev = CoarseField(elev, COARSE_FACTOR)
        self.f_grad = CoarseField(grad, COARSE_FACTOR)
        self.f_forest = CoarseField(forest, COARSE_FACTOR)
        self.forest_level = float(np.quantile(forest, 0.60))
        self.f_moist = CoarseField(moist / moist.std(), COARSE_FACTOR)
        self.f_beach = CoarseField(beach, COARSE_FACTOR)
        self.f_conifer = CoarseField(field((1.0, 1500.0), (0.5, 200.0)), COARSE_FACTOR)
        self.f_village = CoarseField(village_noise, COARSE_FACTOR)
        self.f_warp = (CoarseField(warp_x, COARSE_FACTOR), CoarseField(warp_y, COARSE_FACTOR))
        qs = np.quantile(zone, [0.25, 0.5, 0.75])
        self.f_zone = CoarseField(zone, COARSE_FACTOR)
        self.zone_levels = [float(q) for q in qs]
        self.zone_angle = [float(a) for a in rng.uniform(0, math.pi, 4)]
        self.zone_strip = [float(s) for s in rng.uniform(160, 340, 4)]
        # Per strip: parcel length (200-720 m) and the offset of its first field boundary.
        lengths = rng.uniform(200.0, 720.0, (4, 2 * _UI_OFFSET))
        self.strip_inv_len = (1.0 / lengths).astype(np.float32)
        self.strip_offset = rng.uniform(0.0, 1.0, (4, 2 * _UI_OFFSET)).astype(np.float32)
        self.salt = int(rng.integers(1 << 31))

        half = grid.total_m / 2.0
        region_half = grid.extent_m / 2.0
        scale = min(1.0, grid.extent_m / 40_000.0)

        def elev_at(x: float | np.ndarray, y: float | np.ndarray) -> np.ndarray:
            row = (half - np.asarray(y)) / grid.gsd_m
            col = (np.asarray(x) + half) / grid.gsd_m
            return self.f_elev.at(row, col)

        # --- river: a meandering line across the whole raster, x/y relative to the centre -----------
        self.river_angle = float(rng.uniform(0, math.pi))
        step = 100.0
        self.river_u = np.arange(-1.5 * half, 1.5 * half + step, step)
        meander = (
            smooth_1d(rng, self.river_u.size, 1800.0 / step) * 900.0
            + smooth_1d(rng, self.river_u.size, 400.0 / step) * 120.0
        )
        self.river_v = meander + float(rng.uniform(-0.25, 0.25)) * region_half
        self.river_slope = np.gradient(self.river_v, step)
        self.river_width = np.clip(30.0 + 10.0 * smooth_1d(rng, self.river_u.size, 3000.0 / step), 16.0, 50.0)
        ys_c = half - (np.arange(cshape[0]) + 0.5) * cell
        xs_c = -half + (np.arange(cshape[1]) + 0.5) * cell
        self.f_river = CoarseField(self._river_distance(xs_c[None, :], ys_c[:, None]).astype(np.float32), COARSE_FACTOR)

        # --- town: beside the river, near the region centre, on dry ground ---------------------------
        c, s = _rot(self.river_angle)
        self.town_sigma = 2200.0 * max(scale, 0.7)
        town = None
        for _ in range(200):
            u = float(rng.uniform(-0.3, 0.3)) * region_half
            off = float(rng.choice([-1.0, 1.0]) * rng.uniform(350.0, 900.0))
            v = float(np.interp(u, self.river_u, self.river_v)) + off
            x, y = u * c - v * s, u * s + v * c
            if float(elev_at(x, y)) > self.lake_level + 0.35:
                town = (x, y)
                break
        self.town = town if town is not None else (0.0, 0.0)
        self.town_angle = float(rng.uniform(0, math.pi / 2))

        # --- main roads: through the town, across the raster; secondary roads through villages -------
        self.roads: list[dict] = []
        base = float(rng.uniform(0, math.pi))
        for k in range(4):
            ang = base + k * math.pi / 4 + float(rng.uniform(-0.2, 0.2))
            prof = smooth_1d(rng, self.river_u.size, 2500.0 / step) * 700.0
            self.roads.append(
                {
                    "x0": self.town[0],
                    "y0": self.town[1],
                    "angle": ang,
                    "profile": prof,
                    "anchor": 2500.0,
                    "width": 18.0,
                    "main": True,
                }
            )

        # --- villages in open country, away from the town and each other ---------------------------------
        n_vill = max(2, round((grid.total_m / 1000.0) ** 2 / 220.0))
        self.villages: list[tuple[float, float, float]] = []
        tries = 0
        while len(self.villages) < n_vill and tries < 2000:
            tries += 1
            x, y = (float(v) for v in rng.uniform(-half * 0.95, half * 0.95, 2))
            if float(elev_at(x, y)) < self.lake_level + 0.4:
                continue
            if math.hypot(x - self.town[0], y - self.town[1]) < self.town_sigma * 2.2:
                continue
            if any(math.hypot(x - vx, y - vy) < 2800.0 for vx, vy, _ in self.villages):
                continue
            self.villages.append((x, y, float(rng.uniform(260.0, 520.0))))
        self.village_params = [(x, y, vs, float(rng.uniform(0, math.pi / 2))) for x, y, vs in self.villages]
        for vx, vy, _ in self.villages[: max(3, n_vill // 2)]:
            ang = float(rng.uniform(0, math.pi))
            prof = smooth_1d(rng, self.river_u.size, 2000.0 / step) * 500.0
            self.roads.append(
                {"x0": vx, "y0": vy, "angle": ang, "profile": prof, "anchor": 800.0, "width": 11.0, "main": False}
            )

        # --- industrial estate: beside the town along a main road ----------------------------------------
        road = self.roads[int(rng.integers(4))]
        d = self.town_sigma * float(rng.uniform(1.05, 1.35)) * float(rng.choice([-1.0, 1.0]))
        cr, sr = _rot(road["angle"])
        self.industrial = (
            self.town[0] + d * cr,
            self.town[1] + d * sr,
            road["angle"],
            900.0 * max(scale, 0.7),
            480.0 * max(scale, 0.7),
        )

        # --- airport: a rectangle on dry land inside the region, away from town and lakes ----------------
        self.airport = None
        length, width = 3200.0, 1100.0
        lim = region_half - 0.5 * length - 300.0
        for _ in range(400):
            x, y = (float(v) for v in rng.uniform(-lim, lim, 2))
            dist = math.hypot(x - self.town[0], y - self.town[1])
            if dist < self.town_sigma * 1.6 + 1800.0:
                continue
            if any(math.hypot(x - vx, y - vy) < 2000.0 for vx, vy, _ in self.villages):
                continue
            ang = float(rng.uniform(0, math.pi))
            ca, sa = _rot(ang)
            us, vs = np.meshgrid(np.linspace(-0.6, 0.6, 9) * length, np.linspace(-0.6, 0.6, 5) * width)
            px, py = x + us * ca - vs * sa, y + us * sa + vs * ca
            if float(elev_at(px, py).min()) < self.lake_level + 0.15:
                continue
            if float(np.abs(self._river_distance(px, py)).min()) < 200.0:
                continue
            self.airport = (x, y, ang, length, width)
            break
        self._rasterise_lines()

    # ----------------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """The structures' parameters (world.json), in projected metres."""
        g = self.grid

        def abs_xy(x: float, y: float) -> list[float]:
            return [round(g.cx + x, 1), round(g.cy + y, 1)]

        out = {
            "lake_coverage_quantile": 0.075,
            "forest_quantile": 0.60,
            "town_centre_xy": abs_xy(*self.town),
            "town_sigma_m": round(self.town_sigma, 1),
            "villages_xy": [abs_xy(x, y) for x, y, _ in self.villages],
            "industrial_centre_xy": abs_xy(self.industrial[0], self.industrial[1]),
            "river_angle_deg": round(math.degrees(self.river_angle), 2),
            "main_roads": sum(r["main"] for r in self.roads),
            "secondary_roads": sum(not r["main"] for r in self.roads),
        }
        if self.airport is not None:
            x, y, ang, length, width = self.airport
            out["airport"] = {
                "centre_xy": abs_xy(x, y),
                "angle_deg": round(math.degrees(ang), 2),
                "length_m": length,
                "width_m": width,
            }
        return out

    # ----------------------------------------------------------------------------------------------------
    def _river_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance (m) to the river bank: negative in the water (x, y relative to the centre)."""
        c, s = _rot(self.river_angle)
        u = x * c + y * s
        v = -x * s + y * c
        vr = np.interp(u, self.river_u, self.river_v)
        slope = np.interp(u, self.river_u, self.river_slope)
        w = np.interp(u, self.river_u, self.river_width)
        return np.abs(v - vr) / np.sqrt(1.0 + slope * slope) - 0.5 * w

    def _stamp(self, x: np.ndarray, y: np.ndarray, half_width: np.ndarray) -> np.ndarray:
        """Sorted flat indices of the raster pixels whose centres lie within ``half_width`` of a point."""
        g = self.grid
        half = g.total_m / 2.0
        n = self.size
        col_f = (x + half) / g.gsd_m - 0.5
        row_f = (half - y) / g.gsd_m - 0.5
        reach = math.ceil(float(np.max(half_width)) / g.gsd_m) + 1
        r_c, c_c = np.rint(row_f).astype(np.int64), np.rint(col_f).astype(np.int64)
        keep = (r_c > -reach) & (r_c < n + reach) & (c_c > -reach) & (c_c < n + reach)
        r_c, c_c, row_f, col_f, hw = r_c[keep], c_c[keep], row_f[keep], col_f[keep], half_width[keep]
        out = []
        for dr in range(-reach, reach + 1):
            for dc in range(-reach, reach + 1):
                rr, cc = r_c + dr, c_c + dc
                d2 = ((rr - row_f) ** 2 + (cc - col_f) ** 2) * g.gsd_m**2
                ok = (d2 <= hw * hw) & (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
                out.append(rr[ok] * n + cc[ok])
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def _rasterise_lines(self) -> None:
        step = 3.0
        u = np.arange(self.river_u[0], self.river_u[-1], step)
        c, s = _rot(self.river_angle)
        v = np.interp(u, self.river_u, self.river_v)
        w = np.interp(u, self.river_u, self.river_width)
        self.px_river = self._stamp(u * c - v * s, u * s + v * c, 0.5 * w)
        main, minor = [], []
        for r in self.roads:
            cr, sr = _rot(r["angle"])
            prof = np.interp(u, self.river_u, r["profile"]) * (1.0 - np.exp(-((u / r["anchor"]) ** 2)))
            px = self._stamp(
                r["x0"] + u * cr - prof * sr, r["y0"] + u * sr + prof * cr, np.full(u.shape, r["width"] / 2)
            )
            (main if r["main"] else minor).append(px)
        self.px_main = np.unique(np.concatenate(main)) if main else np.zeros(0, np.int64)
        self.px_minor = np.unique(np.concatenate(minor)) if minor else np.zeros(0, np.int64)

    def _mask(self, flat: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        n = self.size
        lo, hi = np.searchsorted(flat, [r0 * n, r1 * n])
        sel = flat[lo:hi]
        rows, cols = sel // n - r0, sel % n
        ok = (cols >= c0) & (cols < c1)
        mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        mask[rows[ok], cols[ok] - c0] = True
        return mask

    def _box(self, x: float, y: float, radius: float, r0: int, r1: int, c0: int, c1: int):
        """Window-relative slices of the pixels within ``radius`` (a square) of (x, y), or None."""
        g = self.grid
        half = g.total_m / 2.0
        cr0 = max(r0, int((half - y - radius) / g.gsd_m))
        cr1 = min(r1, math.ceil((half - y + radius) / g.gsd_m))
        cc0 = max(c0, int((x + half - radius) / g.gsd_m))
        cc1 = min(c1, math.ceil((x + half + radius) / g.gsd_m))
        if cr1 <= cr0 or cc1 <= cc0:
            return None
        return (slice(cr0 - r0, cr1 - r0), slice(cc0 - c0, cc1 - c0)), (cr0, cr1, cc0, cc1)

    # ----------------------------------------------------------------------------------------------------
    def window(self, r0: int, r1: int, c0: int, c1: int) -> LandWindow:
        """Land cover of raster rows ``r0:r1`` and columns ``c0:c1``."""
        g = self.grid
        half = g.total_m / 2.0
        shape = (r1 - r0, c1 - c0)
        xs = (-half + (np.arange(c0, c1, dtype=np.float64) + 0.5) * g.gsd_m).astype(np.float32)
        ys = (half - (np.arange(r0, r1, dtype=np.float64) + 0.5) * g.gsd_m).astype(np.float32)
        x = xs[None, :]
        y = ys[:, None]

        elev = self.f_elev.window(r0, r1, c0, c1)
        elev -= np.float32(self.lake_level)  # height above the lake level (field units)
        shore = elev / self.f_grad.window(r0, r1, c0, c1)  # m from the lake shore, + on land
        river_d = self.f_river.window(r0, r1, c0, c1)
        moist = self.f_moist.window(r0, r1, c0, c1)

        # --- parcels (base layer): strips of parcels in four zones of different orientation -------------
        zv = self.f_zone.window(r0, r1, c0, c1)
        zone = (zv > self.zone_levels[0]).astype(np.int32)
        zone += zv > self.zone_levels[1]
        zone += zv > self.zone_levels[2]
        del zv
        cos_z = np.cos(np.asarray(self.zone_angle, np.float32))
        sin_z = np.sin(np.asarray(self.zone_angle, np.float32))
        inv_strip = 1.0 / np.asarray(self.zone_strip, np.float32)
        u = x * cos_z[zone]
        u += y * sin_z[zone]
        u *= inv_strip[zone]
        ui = np.floor(u)
        fu = u - ui
        ui_i = ui.astype(np.int32) + _UI_OFFSET
        np.clip(ui_i, 0, 2 * _UI_OFFSET - 1, out=ui_i)
        tab = zone * (2 * _UI_OFFSET) + ui_i
        inv_len = self.strip_inv_len.ravel()[tab]
        v = y * cos_z[zone]
        v -= x * sin_z[zone]
        v *= inv_len
        v += self.strip_offset.ravel()[tab]
        vj = np.floor(v)
        fv = v - vj
        del v, u, ui
        key = tab.astype(np.uint32) * np.uint32(4096) + (vj.astype(np.int32) + 2048).astype(np.uint32)
        key ^= np.uint32(self.salt)
        h = hash32(key)
        del key, vj
        pid = (h >> np.uint32(16)).astype(np.float32) * np.float32(1.0 / 65536.0)
        crop_u = (h & np.uint32(0xFFFF)).astype(np.float32) * np.float32(1.0 / 65536.0)
        del h
        strip_m = np.asarray(self.zone_strip, np.float32)[zone]
        edge = (fu * strip_m < 9.0) | (fv < 9.0 * inv_len)
        del fu, fv, strip_m, inv_len, tab, zone, ui_i
        grass_p = np.clip(moist, -1.0, 1.0)
        grass_p *= 0.15
        grass_p += 0.33
        grass_p += 0.25 * (river_d < 600.0)
        kind = np.searchsorted(_CROP_CDF.astype(np.float32), crop_u, side="right")
        np.minimum(kind, len(_CROP_CDF) - 1, out=kind)
        crop = np.where(pid < grass_p, 0, kind + 1).astype(np.int8)
        del kind, crop_u, grass_p
        classes = np.where(crop == 0, np.uint8(CLASS_CODES["pasture"]), np.uint8(CLASS_CODES["cropland"]))

        # --- forest, wetland --------------------------------------------------------------------------
        classes[self.f_forest.window(r0, r1, c0, c1) > self.forest_level] = CLASS_CODES["forest"]
        m2 = np.clip(moist, 0.0, 2.0)
        wet = (shore > 0) & (shore < 120.0 + 180.0 * m2) & (moist > 0.1)
        wet |= (elev < 0.25) & (moist > 0.9)
        wet |= (river_d > 0) & (river_d < 60.0 + 80.0 * m2) & (moist > 0.4)
        classes[wet] = CLASS_CODES["wetland"]
        del wet, m2

        parcel = pid
        building = np.zeros(shape, dtype=bool)
        street = np.zeros(shape, dtype=bool)
        in_airport = np.zeros(shape, dtype=bool)
        runway = np.zeros(shape, dtype=bool)

        # --- settlements: town (with street grid) and villages -----------------------------------------
        settlements = [(self.town[0], self.town[1], self.town_sigma, 1.0, self.town_angle, True)]
        settlements += [(vx, vy, vs, (vs / 520.0) ** 0.5, va, False) for vx, vy, vs, va in self.village_params]
        for sx, sy, sigma, amp, angle, grid_streets in settlements:
            warp = 500.0 if grid_streets else 200.0
            box = self._box(sx, sy, 1.8 * sigma + 3.5 * warp, r0, r1, c0, c1)
            if box is None:
                continue
            sl, (br0, br1, bc0, bc1) = box
            X = x[:, sl[1]]
            Y = y[sl[0], :]
            wx = self.f_warp[0].window(br0, br1, bc0, bc1) * warp
            wy = self.f_warp[1].window(br0, br1, bc0, bc1) * warp
            dx, dy = X - sx + wx, Y - sy + wy
            urban = np.exp(-(dx * dx + dy * dy) / (2.0 * sigma * sigma)) * amp
            vnoise = self.f_village.window(br0, br1, bc0, bc1)
            core = urban > 0.85
            resid = (urban + 0.12 * vnoise > 0.33) & ~core & (urban > 0.2)
            ct, st = _rot(angle)
            tu = (X - sx) * ct + (Y - sy) * st
            tv = (Y - sy) * ct - (X - sx) * st
            fu_, fv_ = np.floor(tu * np.float32(1 / 26.0)), np.floor(tv * np.float32(1 / 22.0))
            hu, hv = tu - fu_ * np.float32(26.0), tv - fv_ * np.float32(22.0)
            house_id = _cell_hash(fu_, fv_, self.salt + 7)
            house = (hu >= 4.0) & (hu < 17.0) & (hv >= 3.0) & (hv < 14.0) & (house_id < 0.75)
            sub = classes[sl]
            sub[resid] = CLASS_CODES["residential"]
            sub[core] = CLASS_CODES["urban_core"]
            bld = resid & house
            if grid_streets:
                bu = tu - np.floor(tu * np.float32(1 / 170.0)) * np.float32(170.0)
                bv = tv - np.floor(tv * np.float32(1 / 140.0)) * np.float32(140.0)
                street[sl] |= ((bu < 10.0) | (bv < 10.0)) & (resid | core)
                perim = np.minimum(np.minimum(bu - 10.0, 170.0 - bu), np.minimum(bv - 10.0, 140.0 - bv)) < 26.0
                bld |= core & perim
            else:
                bld |= core & (house_id < 0.9)
            building[sl] |= bld
            parcel[sl] = np.where(resid | core, house_id, parcel[sl])

        # --- industrial estate: halls and yards ------------------------------------------------------------
        ix, iy, iang, ia, ib = self.industrial
        box = self._box(ix, iy, max(ia, ib) * 1.3 + 300.0, r0, r1, c0, c1)
        if box is not None:
            sl, (br0, br1, bc0, bc1) = box
            wx = self.f_warp[0].window(br0, br1, bc0, bc1) * 150.0
            wy = self.f_warp[1].window(br0, br1, bc0, bc1) * 150.0
            ci, si = _rot(iang)
            X, Y = x[:, sl[1]] - ix + wx, y[sl[0], :] - iy + wy
            du, dv = X * ci + Y * si, Y * ci - X * si
            vnoise = self.f_village.window(br0, br1, bc0, bc1)
            indus = (du / ia) ** 2 + (dv / ib) ** 2 + 0.15 * vnoise < 1.0
            classes[sl][indus] = CLASS_CODES["industrial"]
            cu, cv = np.floor(du / 150.0), np.floor(dv / 110.0)
            hall_a = 40.0 + 90.0 * _cell_hash(cu, cv, self.salt + 11)
            hall_b = 30.0 + 60.0 * _cell_hash(cu, cv, self.salt + 12)
            mu, mv = np.mod(du, 150.0), np.mod(dv, 110.0)
            hall = (mu > 12.0) & (mu < 12.0 + hall_a) & (mv > 12.0) & (mv < 12.0 + hall_b)
            building[sl] |= indus & hall
            parcel[sl] = np.where(indus, _cell_hash(cu, cv, self.salt + 13), parcel[sl])

        # --- airport: runway, parallel taxiway and links, apron, terminal ------------------------------------
        if self.airport is not None:
            ax, ay, aang, alen, awid = self.airport
            box = self._box(ax, ay, 0.5 * math.hypot(alen, awid) + 20.0, r0, r1, c0, c1)
            if box is not None:
                sl, _ = box
                c2, s2 = _rot(aang)
                X, Y = x[:, sl[1]] - ax, y[sl[0], :] - ay
                au, av = X * c2 + Y * s2, Y * c2 - X * s2
                inside = (np.abs(au) < alen / 2) & (np.abs(av) < awid / 2)
                rw = (np.abs(au) < alen / 2 - 150.0) & (np.abs(av + 120.0) < 24.0)
                rw |= (np.abs(au) < alen / 2 - 250.0) & (np.abs(av - 60.0) < 10.0)
                rw |= (
                    (np.abs(au) < alen / 2 - 250.0)
                    & (np.abs(np.mod(au, 600.0) - 300.0) < 8.0)
                    & (av > -120.0)
                    & (av < 60.0)
                )
                rw |= (av > 200.0) & (av < 420.0) & (np.abs(au) < 500.0)
                in_airport[sl] = inside
                runway[sl] = inside & rw
                building[sl] |= inside & (av >= 420.0) & (np.abs(au) < 350.0)
                classes[sl][inside] = CLASS_CODES["airport"]

        # --- water and shores ---------------------------------------------------------------------------
        lake = shore <= 0.0
        river = self._mask(self.px_river, r0, r1, c0, c1)
        water = lake | river
        classes[water] = CLASS_CODES["water"]
        beach_f = self.f_beach.window(r0, r1, c0, c1)
        is_beach = (shore > 0) & (shore < 18.0 + 20.0 * np.clip(beach_f - 0.3, 0, 1)) & (beach_f > 0.3) & ~in_airport
        classes[is_beach] = CLASS_CODES["beach"]
        depth = np.where(lake, -shore, 0.0).astype(np.float32)
        depth[river & ~lake] = 2.0

        # --- roads (bridges over the river, none across lakes or through the airport) -----------------------
        main = self._mask(self.px_main, r0, r1, c0, c1)
        road = main | self._mask(self.px_minor, r0, r1, c0, c1) | (street & ~river)
        road &= ~lake & ~in_airport
        main &= road
        classes[road] = CLASS_CODES["road"]
        building &= ~road & ~water

        crop[(classes != CLASS_CODES["cropland"]) & (classes != CLASS_CODES["pasture"])] = -1
        edge &= crop >= 0
        conifer = self.f_conifer.window(r0, r1, c0, c1)
        conifer *= 0.6
        conifer += 0.5
        np.clip(conifer, 0.0, 1.0, out=conifer)
        return LandWindow(
            classes=classes,
            crop=crop,
            parcel=parcel,
            edge=edge,
            building=building,
            conifer=conifer,
            depth=depth,
            main_road=main,
            runway=runway,
        )
