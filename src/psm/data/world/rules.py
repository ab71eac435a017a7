"""The truth: when and where each sound event is audible, and how each recording platform is biased.

An event class has one or more *sources* (e.g. voices in town, voices on the beach). Source ``s`` makes
its event audible at place ``x``, hour ``h`` and month ``m`` with probability

    q_s(x, h, m) = p_max_s · S_s(x) · H_s[h] · M_s[m]

where ``S_s(x) = 1 − exp(−gain_s · max(0, Σ_c a_sc · F_c(x; r_s)))`` is a saturating function of the
land-cover fractions ``F_c`` around ``x`` weighted by a Gaussian of σ = ``r_s`` (the hearing radius; an
empty affinity means ``S_s = 1`` everywhere), and ``H_s`` (24 values) and ``M_s`` (12 values) are the
diel and seasonal profiles. Sources combine as independent causes (noisy-OR):

    p_e(x, h, m) = 1 − Π_s (1 − q_s(x, h, m)).

That is the probability for a neutral recorder (the truth layers, and the ``aporee`` field-recording
archive). A platform ``k`` records with its own bias: it multiplies the odds by ``ODDS[k][e]``,

    p_e,k = ODDS·p / (1 − p + ODDS·p),

so a platform can favour or avoid an event but never hear one that is not there (p = 0 stays 0). The
generator draws each event of each clip independently from exactly this probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HOURS = np.arange(24)
MONTHS = np.arange(1, 13)


def _circ(d: np.ndarray, period: float) -> np.ndarray:
    d = np.abs(d) % period
    return np.minimum(d, period - d)


def hour_profile(*bumps: tuple[float, float, float], floor: float = 0.0) -> np.ndarray:
    """24 values: the max of Gaussian bumps (centre h, σ h, height) on the circular day, at least ``floor``."""
    out = np.full(24, floor, dtype=np.float64)
    for c, w, a in bumps:
        out = np.maximum(out, a * np.exp(-0.5 * (_circ(HOURS - c, 24.0) / w) ** 2))
    return np.clip(out, 0.0, 1.0)


def hour_window(start: int, end: int, inside: float = 1.0, outside: float = 0.0, edge: float = 0.5) -> np.ndarray:
    """24 values: ``inside`` for hours start..end (inclusive, may wrap midnight), ``edge`` just outside."""
    out = np.full(24, outside, dtype=np.float64)
    hours = [(start + i) % 24 for i in range(((end - start) % 24) + 1)]
    out[hours] = inside
    out[(start - 1) % 24] = max(out[(start - 1) % 24], edge * inside)
    out[(end + 1) % 24] = max(out[(end + 1) % 24], edge * inside)
    return out


def month_profile(*bumps: tuple[float, float, float], floor: float = 0.0) -> np.ndarray:
    """12 values (January first): the max of Gaussian bumps (centre month, σ months, height), ≥ ``floor``."""
    out = np.full(12, floor, dtype=np.float64)
    for c, w, a in bumps:
        out = np.maximum(out, a * np.exp(-0.5 * (_circ(MONTHS - c, 12.0) / w) ** 2))
    return np.clip(out, 0.0, 1.0)


FLAT_HOURS = np.ones(24)
FLAT_MONTHS = np.ones(12)


@dataclass(frozen=True)
class Source:
    """One way an event becomes audible (see the module docstring for the formula)."""

    name: str
    p_max: float
    affinity: tuple[tuple[str, float], ...]  # (land-cover class, weight); () = everywhere
    radius_m: float
    gain: float
    hours: np.ndarray
    months: np.ndarray

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "p_max": self.p_max,
            "affinity": dict(self.affinity),
            "radius_m": self.radius_m,
            "gain": self.gain,
            "hours": [round(float(v), 4) for v in self.hours],
            "months": [round(float(v), 4) for v in self.months],
        }


@dataclass(frozen=True)
class EventClass:
    """A sound-event class: its words, its family, the band where its energy lies, and its sources."""

    name: str
    words: tuple[str, ...]  # caption vocabulary, most specific first
    family: str  # "animal", "human", "machine" or "geophony"
    band_hz: tuple[float, float]
    sources: tuple[Source, ...]
    description: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "band_hz": list(self.band_hz),
            "words": list(self.words),
            "sources": [s.to_dict() for s in self.sources],
        }


def _src(
    name: str, p: float, aff: dict[str, float], r: float, gain: float, hours=FLAT_HOURS, months=FLAT_MONTHS
) -> Source:
    return Source(name, p, tuple(aff.items()), r, gain, np.asarray(hours, float), np.asarray(months, float))


SPRING_SUMMER = month_profile((5.5, 2.2, 1.0), floor=0.3)
DAYTIME = hour_profile((8.0, 3.5, 1.0), (17.0, 4.0, 0.8), floor=0.15) * hour_window(4, 21, 1.0, 0.1, 0.5)
RUSH = np.clip(hour_window(6, 21, 0.55, 0.08, 0.6) + hour_profile((8.0, 1.0, 0.45), (17.5, 1.2, 0.45)), 0.0, 1.0)

EVENTS: tuple[EventClass, ...] = (
    EventClass(
        "bird_song",
        ("bird song", "birds singing", "songbird", "birdsong", "birds chirping"),
        "animal",
        (2500.0, 6500.0),
        (
            _src(
                "woodland",
                0.85,
                {
                    "forest": 1.0,
                    "wetland": 0.8,
                    "residential": 0.4,
                    "pasture": 0.15,
                    "cropland": 0.05,
                    "beach": 0.1,
                    "urban_core": 0.05,
                },
                250.0,
                3.0,
                DAYTIME,
                SPRING_SUMMER,
            ),
        ),
        "songbirds by day, mostly in spring and early summer, in woods, wetlands and gardens",
    ),
    EventClass(
        "dawn_chorus",
        ("dawn chorus", "many birds singing at dawn", "morning birdsong", "birds"),
        "animal",
        (2000.0, 7000.0),
        (
            _src(
                "woodland",
                0.9,
                {"forest": 1.0, "wetland": 0.8, "residential": 0.6, "pasture": 0.3},
                400.0,
                3.0,
                hour_profile((5.5, 1.3, 1.0)),
                month_profile((4.8, 1.3, 1.0)),
            ),
        ),
        "the dense chorus at 4-8 h in April-June near trees",
    ),
    EventClass(
        "woodpecker",
        ("woodpecker drumming", "woodpecker", "knocking on wood"),
        "animal",
        (800.0, 2200.0),
        (
            _src(
                "forest",
                0.45,
                {"forest": 1.0},
                300.0,
                2.5,
                hour_profile((9.0, 3.0, 1.0), floor=0.02),
                month_profile((3.8, 1.2, 1.0), floor=0.2),
            ),
        ),
        "drumming in woodland, by day, most in late winter and spring",
    ),
    EventClass(
        "insects",
        ("crickets chirping", "insects buzzing", "crickets", "grasshoppers", "cicadas"),
        "animal",
        (3500.0, 7500.0),
        (
            _src(
                "meadow",
                0.85,
                {
                    "pasture": 1.0,
                    "cropland": 0.7,
                    "wetland": 0.6,
                    "forest": 0.1,
                    "residential": 0.2,
                    "beach": 0.3,
                    "airport": 0.6,
                },
                150.0,
                2.5,
                hour_profile((22.5, 3.5, 1.0), floor=0.35),
                month_profile((7.5, 1.4, 1.0), floor=0.03),
            ),
        ),
        "crickets and bush-crickets on summer evenings and nights in grass and fields",
    ),
    EventClass(
        "frogs",
        ("frogs croaking", "frog chorus", "toads", "frogs"),
        "animal",
        (300.0, 1600.0),
        (
            _src(
                "wetland",
                0.9,
                {"wetland": 1.0, "water": 0.5},
                400.0,
                5.0,
                hour_profile((22.0, 3.0, 1.0), floor=0.15),
                month_profile((4.8, 1.3, 1.0)),
            ),
        ),
        "spring nights by wetlands and shallow water",
    ),
    EventClass(
        "cattle",
        ("cows mooing", "cattle", "cow", "mooing"),
        "animal",
        (150.0, 1200.0),
        (
            _src(
                "pasture",
                0.6,
                {"pasture": 1.0},
                300.0,
                3.0,
                hour_window(6, 20, 1.0, 0.05, 0.4),
                month_profile((7.0, 2.0, 1.0), floor=0.1),
            ),
        ),
        "cattle on pasture, by day, from spring to autumn (in barns in winter)",
    ),
    EventClass(
        "rooster",
        ("rooster crowing", "cockerel", "rooster", "chickens"),
        "animal",
        (500.0, 3000.0),
        (
            _src(
                "farmyard",
                0.8,
                {"residential": 1.0, "pasture": 0.3, "cropland": 0.2, "urban_core": -2.0, "industrial": -1.0},
                400.0,
                3.0,
                hour_profile((6.0, 1.2, 1.0), floor=0.12) * hour_window(4, 20, 1.0, 0.0, 0.3),
                month_profile((6.0, 4.0, 1.0), floor=0.85),
            ),
        ),
        "roosters in villages and at the town edge, mostly around 6 h",
    ),
    EventClass(
        "dog_bark",
        ("dog barking", "dogs", "barking"),
        "animal",
        (400.0, 3000.0),
        (
            _src(
                "houses",
                0.55,
                {"residential": 1.0, "urban_core": 0.4, "pasture": 0.1},
                250.0,
                3.0,
                hour_profile((18.0, 4.0, 1.0), floor=0.15),
            ),
        ),
        "dogs in residential areas, more in the evening",
    ),
    EventClass(
        "voices",
        ("people talking", "voices", "crowd chatter", "conversation", "children playing"),
        "human",
        (200.0, 3500.0),
        (
            _src(
                "town",
                0.75,
                {"urban_core": 1.0, "residential": 0.3, "industrial": 0.2, "road": 0.5},
                150.0,
                3.0,
                hour_profile((15.0, 4.0, 1.0), floor=0.05) * hour_window(7, 23, 1.0, 0.2, 0.5),
                month_profile((7.0, 3.0, 1.0), floor=0.7),
            ),
            _src(
                "beach",
                0.8,
                {"beach": 1.0},
                150.0,
                12.0,
                hour_profile((15.0, 2.5, 1.0)),
                month_profile((7.5, 1.0, 1.0)),
            ),
        ),
        "people in the town centre by day and evening, and on beaches on summer afternoons",
    ),
    EventClass(
        "traffic",
        ("traffic", "cars passing", "road noise", "vehicles", "street noise"),
        "machine",
        (30.0, 1500.0),
        (
            _src(
                "roads",
                0.9,
                {"road": 1.0, "urban_core": 0.6, "residential": 0.3, "industrial": 0.4, "airport": 0.3},
                500.0,
                15.0,
                RUSH,
            ),
        ),
        "road traffic near roads and in town, peaking at the morning and evening rush hours",
    ),
    EventClass(
        "car_horn",
        ("car horn", "honking", "horns"),
        "machine",
        (350.0, 2500.0),
        (
            _src(
                "streets", 0.5, {"urban_core": 1.0, "road": 2.0}, 150.0, 4.0, RUSH * hour_window(7, 20, 1.0, 0.05, 0.5)
            ),
        ),
        "horns in town streets and on main roads, by day",
    ),
    EventClass(
        "siren",
        ("siren", "ambulance siren", "police siren", "emergency vehicle"),
        "machine",
        (550.0, 1800.0),
        (
            _src(
                "town",
                0.25,
                {"urban_core": 1.0, "residential": 0.3, "industrial": 0.5, "road": 0.6},
                1200.0,
                3.0,
                hour_profile((14.0, 6.0, 1.0), floor=0.45),
            ),
        ),
        "emergency sirens, audible far across town, at any hour",
    ),
    EventClass(
        "construction",
        ("construction work", "hammering", "drilling", "building site", "jackhammer"),
        "machine",
        (1800.0, 5500.0),
        (
            _src(
                "works",
                0.7,
                {"industrial": 1.0, "urban_core": 0.6, "residential": 0.2},
                400.0,
                4.0,
                hour_window(7, 17, 1.0, 0.0, 0.3),
                month_profile((7.0, 3.0, 1.0), floor=0.35),
            ),
        ),
        "building work in the industrial estate and town, working hours, less in winter",
    ),
    EventClass(
        "aircraft",
        ("airplane", "aircraft flying over", "jet", "plane overhead", "aeroplane"),
        "machine",
        (80.0, 1600.0),
        (
            _src(
                "airport",
                0.9,
                {"airport": 1.0},
                2000.0,
                8.0,
                hour_window(6, 22, 1.0, 0.05, 0.4),
                month_profile((7.0, 3.0, 1.0), floor=0.7),
            ),
            _src("overflight", 0.06, {}, 0.0, 0.0, hour_window(7, 21, 1.0, 0.1, 0.5)),
        ),
        "take-offs and landings within a few km of the airport; rare overflights everywhere",
    ),
    EventClass(
        "church_bells",
        ("church bells", "bells ringing", "bell tower", "chimes"),
        "human",
        (250.0, 2000.0),
        (_src("centre", 0.6, {"urban_core": 1.0}, 600.0, 4.0, hour_window(7, 20, 1.0, 0.0, 0.4)),),
        "bells of town and village centres, striking the hours from 7 to 20 h",
    ),
    EventClass(
        "waves",
        ("waves lapping", "water", "waves", "lake shore", "water splashing"),
        "geophony",
        (150.0, 2500.0),
        (
            _src(
                "shore",
                0.85,
                {"water": 1.0, "beach": 2.0},
                150.0,
                3.0,
                hour_profile((15.0, 5.0, 1.0), floor=0.6),
                month_profile((12.5, 2.5, 1.0), floor=0.55),
            ),
        ),
        "waves on lake shores, stronger in the windy season",
    ),
    EventClass(
        "wind",
        ("wind", "wind blowing", "gusts", "windy", "wind noise"),
        "geophony",
        (20.0, 400.0),
        (
            _src(
                "open",
                0.6,
                {
                    "cropland": 1.0,
                    "pasture": 1.0,
                    "water": 1.0,
                    "beach": 1.0,
                    "airport": 1.0,
                    "wetland": 0.8,
                    "road": 0.6,
                    "forest": 0.15,
                    "residential": 0.3,
                    "industrial": 0.3,
                    "urban_core": 0.15,
                },
                300.0,
                2.0,
                hour_profile((14.5, 4.0, 1.0), floor=0.6),
                month_profile((1.0, 2.5, 1.0), floor=0.5),
            ),
        ),
        "wind everywhere, most in open country, in the afternoon and in winter",
    ),
    EventClass(
        "rain",
        ("rain", "rainfall", "raindrops", "rain on leaves"),
        "geophony",
        (1500.0, 7500.0),
        (
            _src(
                "weather", 0.09, {}, 0.0, 0.0, FLAT_HOURS, month_profile((7.0, 1.2, 1.0), (11.0, 1.5, 0.95), floor=0.55)
            ),
        ),
        "rain showers anywhere, most in July and in November",
    ),
)
EVENT_NAMES: tuple[str, ...] = tuple(e.name for e in EVENTS)
EVENT_INDEX: dict[str, int] = {n: i for i, n in enumerate(EVENT_NAMES)}

# GeoSound's vocabularies, in the official id order (psm.data.metadata.OFFICIAL_*_SOURCES; not imported here
# because that module loads torch, and generating a world needs none): the paper's configs apply unchanged.
PLATFORMS: tuple[str, ...] = ("yfcc", "iNat", "aporee", "freesound")
CAPTION_SOURCES: tuple[str, ...] = ("meta", "qwen", "pengi")

PLATFORM_DESCRIPTIONS: dict[str, str] = {
    "yfcc": "video-sharing platform: records people, traffic and town life; sound from video (OGG/FLAC)",
    "iNat": "naturalist platform: records animals (birds, insects, frogs) in nature, by day, spring-summer",
    "aporee": "field-recording archive: whole soundscapes anywhere, unbiased over events (the truth's view)",
    "freesound": "sound-effects site: distinct events (sirens, horns, bells, roosters, rain); date has no time",
}
PLATFORM_SHARE: dict[str, float] = {"yfcc": 0.30, "iNat": 0.40, "aporee": 0.12, "freesound": 0.18}

_ANIMAL_WILD = ("bird_song", "dawn_chorus", "woodpecker", "insects", "frogs")
_HUMAN = ("voices", "traffic", "car_horn", "siren", "construction", "church_bells")
PLATFORM_ODDS: dict[str, dict[str, float]] = {
    "iNat": {
        **dict.fromkeys(_ANIMAL_WILD, 3.0),
        "cattle": 1.0,
        "rooster": 1.0,
        "dog_bark": 0.5,
        **dict.fromkeys(_HUMAN, 0.3),
        "aircraft": 0.5,
        "waves": 0.8,
        "wind": 0.7,
        "rain": 0.7,
    },
    "yfcc": {
        **dict.fromkeys(_ANIMAL_WILD, 0.5),
        "dog_bark": 1.5,
        "voices": 4.0,
        "traffic": 2.0,
        "car_horn": 2.0,
        "siren": 2.0,
        "construction": 1.5,
        "aircraft": 1.5,
        "church_bells": 2.0,
        "waves": 1.5,
        "wind": 2.0,
    },
    "aporee": {},
    "freesound": {
        "siren": 3.0,
        "car_horn": 3.0,
        "church_bells": 3.0,
        "construction": 2.0,
        "aircraft": 2.0,
        "rooster": 2.0,
        "dog_bark": 2.0,
        "rain": 2.5,
        "frogs": 1.5,
        "cattle": 1.5,
        "waves": 1.5,
        "wind": 0.6,
    },
}

# Where each platform records: weight of each land-cover class in the density of recording places.
PLATFORM_PLACES: dict[str, dict[str, float]] = {
    "iNat": {
        "forest": 1.0,
        "wetland": 4.0,
        "water": 0.5,
        "beach": 0.8,
        "pasture": 0.6,
        "cropland": 0.08,
        "residential": 0.4,
        "urban_core": 0.1,
        "industrial": 0.02,
        "road": 0.1,
        "airport": 0.02,
    },
    "yfcc": {
        "urban_core": 300.0,
        "residential": 80.0,
        "beach": 150.0,
        "road": 20.0,
        "industrial": 10.0,
        "airport": 20.0,
        "water": 3.0,
        "forest": 1.0,
        "pasture": 1.0,
        "cropland": 0.5,
        "wetland": 0.5,
    },
    "aporee": {
        "urban_core": 10.0,
        "residential": 4.0,
        "forest": 1.5,
        "wetland": 3.0,
        "water": 1.0,
        "beach": 5.0,
        "pasture": 1.0,
        "cropland": 0.7,
        "industrial": 5.0,
        "road": 2.0,
        "airport": 3.0,
    },
    "freesound": {
        "urban_core": 40.0,
        "residential": 10.0,
        "forest": 1.0,
        "wetland": 2.0,
        "beach": 10.0,
        "pasture": 1.0,
        "cropland": 0.6,
        "industrial": 10.0,
        "airport": 5.0,
        "road": 4.0,
        "water": 1.0,
    },
}
# When each platform records (true time; freesound's date string has no time of day).
PLATFORM_HOURS: dict[str, np.ndarray] = {
    "iNat": hour_profile((7.0, 2.0, 1.0), (12.0, 4.0, 0.9), (22.0, 1.5, 0.3), floor=0.04),
    "yfcc": hour_profile((15.0, 4.5, 1.0), floor=0.05),
    "aporee": hour_profile((12.0, 6.0, 1.0), floor=0.25),
    "freesound": hour_profile((13.0, 5.5, 1.0), floor=0.15),
}
# When people record at each kind of place (multiplies the platform's hours): dawn in woods, nights by
# wetlands (frogs) and in town, afternoons on the shore, working hours in fields and industry.
PLACE_HOURS: dict[str, np.ndarray] = {
    "forest": hour_profile((6.0, 1.5, 1.0), floor=0.25),
    "wetland": hour_profile((6.0, 1.5, 1.0), (22.5, 2.0, 1.0), floor=0.15),
    "water": hour_profile((15.0, 3.0, 1.0), floor=0.2),
    "beach": hour_profile((15.0, 2.5, 1.0), floor=0.1),
    "pasture": hour_window(9, 17, 1.0, 0.1, 0.5),
    "cropland": hour_window(9, 17, 1.0, 0.1, 0.5),
    "residential": hour_profile((19.0, 2.5, 1.0), floor=0.3),
    "urban_core": hour_profile((21.5, 2.0, 1.0), (13.0, 3.0, 0.7), floor=0.2),
    "industrial": hour_window(7, 16, 1.0, 0.1, 0.5),
    "road": hour_window(7, 19, 1.0, 0.2, 0.6),
    "airport": hour_window(7, 20, 1.0, 0.2, 0.5),
}
PLATFORM_MONTHS: dict[str, np.ndarray] = {
    "iNat": month_profile((6.0, 1.8, 1.0), floor=0.15),
    "yfcc": month_profile((7.0, 2.5, 1.0), floor=0.45),
    "aporee": month_profile((6.0, 3.0, 1.0), floor=0.6),
    "freesound": month_profile((6.0, 3.0, 1.0), floor=0.6),
}
# Caption family by platform (GeoSound: metadata text, or a Qwen / Pengi generated caption).
PLATFORM_CAPTIONS: dict[str, dict[str, float]] = {
    "iNat": {"meta": 0.3, "qwen": 0.4, "pengi": 0.3},
    "yfcc": {"meta": 0.6, "qwen": 0.25, "pengi": 0.15},
    "aporee": {"meta": 0.5, "qwen": 0.3, "pengi": 0.2},
    "freesound": {"meta": 0.6, "qwen": 0.2, "pengi": 0.2},
}
# Storage: (format, sample rate, weight) per platform; WAV only for clips up to 10 s (see plan.py).
PLATFORM_FORMATS: dict[str, tuple[tuple[str, int, float], ...]] = {
    "iNat": (
        ("ogg", 16000, 0.20),
        ("ogg", 22050, 0.15),
        ("ogg", 44100, 0.03),
        ("flac", 16000, 0.30),
        ("flac", 22050, 0.12),
        ("flac", 44100, 0.02),
        ("wav", 16000, 0.15),
        ("wav", 22050, 0.03),
    ),
    "yfcc": (
        ("ogg", 16000, 0.20),
        ("ogg", 22050, 0.10),
        ("ogg", 44100, 0.04),
        ("ogg", 48000, 0.03),
        ("flac", 16000, 0.35),
        ("flac", 44100, 0.03),
        ("flac", 48000, 0.05),
        ("wav", 16000, 0.20),
    ),
    "aporee": (
        ("ogg", 22050, 0.30),
        ("ogg", 44100, 0.05),
        ("flac", 16000, 0.10),
        ("flac", 22050, 0.35),
        ("flac", 44100, 0.15),
        ("flac", 48000, 0.05),
    ),
    "freesound": (
        ("ogg", 22050, 0.20),
        ("ogg", 44100, 0.03),
        ("flac", 16000, 0.30),
        ("flac", 22050, 0.15),
        ("flac", 44100, 0.07),
        ("wav", 16000, 0.20),
        ("wav", 22050, 0.05),
    ),
}

# Event levels above the background (dB of the event's active RMS over the background RMS).
EVENT_SNR_DB: dict[str, tuple[float, float]] = {
    "bird_song": (2.0, 16.0),
    "dawn_chorus": (4.0, 16.0),
    "woodpecker": (4.0, 18.0),
    "insects": (0.0, 14.0),
    "frogs": (2.0, 16.0),
    "cattle": (4.0, 18.0),
    "rooster": (6.0, 20.0),
    "dog_bark": (4.0, 18.0),
    "voices": (2.0, 14.0),
    "traffic": (0.0, 14.0),
    "car_horn": (6.0, 20.0),
    "siren": (4.0, 18.0),
    "construction": (6.0, 20.0),
    "aircraft": (2.0, 16.0),
    "church_bells": (4.0, 18.0),
    "waves": (0.0, 12.0),
    "wind": (0.0, 12.0),
    "rain": (0.0, 10.0),
}


def odds_factors(platform: str | None) -> np.ndarray:
    """(E,) odds multipliers of a platform (all 1 for ``None``, the neutral recorder)."""
    out = np.ones(len(EVENTS), dtype=np.float64)
    if platform is None:
        return out
    if platform not in PLATFORM_ODDS:
        raise ValueError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}")
    for name, k in PLATFORM_ODDS[platform].items():
        out[EVENT_INDEX[name]] = k
    return out


def apply_odds(p: np.ndarray, k: np.ndarray) -> np.ndarray:
    """p' = k·p / (1 − p + k·p), elementwise (k broadcast)."""
    kp = k * p
    denom = 1.0 - p + kp
    return np.where(denom > 0, kp / np.where(denom > 0, denom, 1.0), 0.0)


def describe() -> dict:
    """The whole rule set as JSON (world.json ``rules``)."""
    return {
        "formula": "p_e(x,h,m) = 1 - prod_s(1 - p_max_s * S_s(x) * H_s[h] * M_s[m]); "
        "S_s(x) = 1 - exp(-gain_s * max(0, sum_c a_sc * F_c(x; sigma=radius_s))) (1 when affinity is empty); "
        "platform k: odds multiplied by ODDS[k][e]",
        "events": [e.to_dict() for e in EVENTS],
        "platforms": {
            p: {
                "description": PLATFORM_DESCRIPTIONS[p],
                "share": PLATFORM_SHARE[p],
                "odds": PLATFORM_ODDS[p],
                "places": PLATFORM_PLACES[p],
                "hours": [round(float(v), 4) for v in PLATFORM_HOURS[p]],
                "hours_by_place": "platform hours × place_hours[dominant land cover]",
                "months": [round(float(v), 4) for v in PLATFORM_MONTHS[p]],
                "captions": PLATFORM_CAPTIONS[p],
                "formats": [list(f) for f in PLATFORM_FORMATS[p]],
            }
            for p in PLATFORMS
        },
        "snr_db": {k: list(v) for k, v in EVENT_SNR_DB.items()},
        "place_hours": {k: [round(float(x), 4) for x in v] for k, v in PLACE_HOURS.items()},
    }
