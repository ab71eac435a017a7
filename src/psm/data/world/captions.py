"""Captions from varied templates; the caption source (GeoSound's three) sets the template family.

* ``meta``: terse metadata text as the platform would hold it: a video title with tags (yfcc), the observed
  species (iNat), a field recordist's place note (aporee), a sound-effect title with tags (freesound);
* ``qwen``: one fluent descriptive sentence (an LLM rewrite of the metadata);
* ``pengi``: a short "generate metadata"-style phrase from an audio captioner.

Captions name most, not all, audible events (loud ones more often than background ones) and add noise:
generic words ("ambience", "outdoor"), place and time words that are sometimes wrong, and, for ``pengi``,
occasional confusions between similar sounds (wind/rain/waves, birds/insects). So text helps, but it is no
copy of the labels.
"""

from __future__ import annotations

import numpy as np

from psm.data.world.rules import EVENT_NAMES, EVENTS

_PLACE = {
    "water": ("by the lake", "on the lake shore", "at the water's edge"),
    "beach": ("on the beach", "at a lakeside beach", "on the sandy shore"),
    "forest": ("in the forest", "in the woods", "on a woodland path"),
    "wetland": ("in the marsh", "by the reed beds", "in a wetland"),
    "pasture": ("in a meadow", "on a pasture", "by a grazing field"),
    "cropland": ("by the fields", "in farmland", "next to a wheat field"),
    "residential": ("in a residential street", "in the village", "in a quiet neighbourhood"),
    "urban_core": ("in the town centre", "on the market square", "in a busy street"),
    "industrial": ("near an industrial estate", "by a factory", "at a building site"),
    "road": ("by the road", "next to a main road", "at a crossroads"),
    "airport": ("near the airport", "by the airfield", "next to a runway"),
}
_PLACE_TAG = {
    "water": "lake",
    "beach": "beach",
    "forest": "forest",
    "wetland": "wetland",
    "pasture": "meadow",
    "cropland": "farmland",
    "residential": "village",
    "urban_core": "city",
    "industrial": "industrial",
    "road": "road",
    "airport": "airport",
}
_GENERIC = ("ambience", "outdoor", "nature", "soundscape", "field recording", "background noise", "atmosphere")
_CONFUSE = {
    "wind": "rain",
    "rain": "wind",
    "waves": "rain",
    "bird_song": "insects",
    "insects": "bird_song",
    "traffic": "wind",
    "dawn_chorus": "bird_song",
    "siren": "car_horn",
    "frogs": "dog_bark",
}
_SPECIES = {
    "bird_song": (
        "Eurasian Blackbird (Turdus merula)",
        "Common Chaffinch (Fringilla coelebs)",
        "Great Tit (Parus major)",
        "European Robin (Erithacus rubecula)",
        "Common Nightingale (Luscinia megarhynchos)",
        "Eurasian Skylark (Alauda arvensis)",
    ),
    "dawn_chorus": (
        "Eurasian Blackbird (Turdus merula)",
        "Song Thrush (Turdus philomelos)",
        "European Robin (Erithacus rubecula)",
        "Eurasian Wren (Troglodytes troglodytes)",
    ),
    "woodpecker": ("Great Spotted Woodpecker (Dendrocopos major)", "Black Woodpecker (Dryocopus martius)"),
    "insects": (
        "Field Cricket (Gryllus campestris)",
        "Roesel's Bush-cricket (Roeseliana roeselii)",
        "Great Green Bush-cricket (Tettigonia viridissima)",
    ),
    "frogs": (
        "European Tree Frog (Hyla arborea)",
        "Edible Frog (Pelophylax esculentus)",
        "Fire-bellied Toad (Bombina bombina)",
    ),
    "cattle": ("Domestic Cattle (Bos taurus)",),
    "rooster": ("Domestic Chicken (Gallus gallus domesticus)",),
    "dog_bark": ("Domestic Dog (Canis familiaris)",),
}
_WORD_SALIENCE = {e.name: (0.55 if e.family == "geophony" else 0.85) for e in EVENTS}
_WORD_SALIENCE.update({"traffic": 0.7, "insects": 0.75, "dawn_chorus": 0.8})


def _time_phrase(hour: int) -> str:
    if 4 <= hour <= 7:
        return "at dawn"
    if 8 <= hour <= 11:
        return "in the morning"
    if 12 <= hour <= 16:
        return "in the afternoon"
    if 17 <= hour <= 20:
        return "in the evening"
    return "at night"


def _join(words: list[str]) -> str:
    if not words:
        return ""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _named_events(rng: np.random.Generator, present: list[str], snr: dict[str, float], family: str) -> list[str]:
    """Events the caption mentions: loudest first, each kept with its salience; pengi confuses some."""
    order = sorted(present, key=lambda e: -snr.get(e, 0.0))
    named = [e for e in order if rng.random() < _WORD_SALIENCE[e]]
    if family == "pengi":
        named = named[:2]
        named = [(_CONFUSE[e] if e in _CONFUSE and rng.random() < 0.15 else e) for e in named]
    return list(dict.fromkeys(named))


def _word(rng: np.random.Generator, event: str) -> str:
    words = EVENTS[EVENT_NAMES.index(event)].words
    # The first (most specific) word most often, synonyms otherwise.
    return words[0] if rng.random() < 0.5 else _pick(rng, words)


def make_caption(
    rng: np.random.Generator,
    family: str,
    platform: str,
    present: list[str],
    snr: dict[str, float],
    place_class: str,
    hour: int,
    month: int,
) -> str:
    """One caption for a clip with events ``present`` (names), recorded at a ``place_class`` place."""
    named = _named_events(rng, present, snr, family)
    words = [_word(rng, e) for e in named]
    # Place words are sometimes for a neighbouring kind of place (noise).
    place_key = place_class if rng.random() > 0.1 else _pick(rng, list(_PLACE))
    place = _pick(rng, _PLACE[place_key])
    when = _time_phrase(hour)
    if family == "meta":
        return _meta(rng, platform, named, words, place_key, place, when, month)
    if family == "qwen":
        return _qwen(rng, words, place, when)
    return _pengi(rng, words)


def _meta(
    rng, platform: str, named: list[str], words: list[str], place_key: str, place: str, when: str, month: int
) -> str:
    season = (
        "winter",
        "winter",
        "spring",
        "spring",
        "spring",
        "summer",
        "summer",
        "summer",
        "autumn",
        "autumn",
        "autumn",
        "winter",
    )[month - 1]
    tags = [w.replace(" ", "") if rng.random() < 0.3 else w for w in words]
    tags += [_PLACE_TAG[place_key]] + ([season] if rng.random() < 0.5 else [])
    tags += [g for g in _GENERIC if rng.random() < 0.12]
    if platform == "iNat":
        animals = [e for e in named if e in _SPECIES]
        if animals:
            return "; ".join(_pick(rng, _SPECIES[e]) for e in animals[:2])
        return _pick(rng, ("Sound recording", "Unknown sound", "Audio observation")) + f" ({season})"
    if platform == "yfcc":
        title = _pick(
            rng,
            (
                f"{place.capitalize()} {when}",
                f"IMG_{int(rng.integers(1000, 9999))}.MOV",
                f"{season.capitalize()} trip",
                f"Video {when}",
                f"Walk {place}",
            ),
        )
        return f"{title} | tags: {', '.join(tags)}"
    if platform == "aporee":
        what = _join(words) if words else "quiet ambience"
        return f"{place}, {when}: {what}"
    # freesound
    name = "_".join((words[0] if words else "ambience").split()) + f"_{_PLACE_TAG[place_key]}"
    return f"{name}.wav — {', '.join(['field-recording', *tags])}"


def _qwen(rng, words: list[str], place: str, when: str) -> str:
    if not words:
        return _pick(
            rng,
            (
                f"A quiet outdoor ambience {place} {when}, with only faint background noise.",
                f"Soft, indistinct background sounds are heard {place} {when}.",
            ),
        )
    first, rest = words[0], words[1:]
    templates = [
        f"The sound of {first}{' with ' + _join(rest) if rest else ''} {place} {when}.",
        f"A recording {place} where {first} can be heard{', along with ' + _join(rest) if rest else ''}.",
        f"{_join(words).capitalize()} fill the air {when}.",
        f"In this audio, {first} is heard {when}{', with ' + _join(rest) + ' in the background' if rest else ''}.",
        f"An outdoor scene {place}: {_join(words)}.",
    ]
    return _pick(rng, templates)


def _pengi(rng, words: list[str]) -> str:
    if not words:
        return _pick(rng, ("outdoor ambience", "background noise", "an ambient sound", "silence with noise"))
    templates = [_join(words), f"{words[0]} is heard", f"{_join(words)} with background noise", f"a {words[0]} sound"]
    return _pick(rng, templates)
