"""A clip: background + the sampled events at their levels, random gain, hiss, resampled and encoded.

Every random choice comes from generators seeded by (world seed, sample index[, event]), so a clip is the
same whether the world is written to disk or streamed, in any order, in any process; and no two clips are
alike. Encoding is byte-deterministic: libsndfile gives an Ogg stream a random serial number, which
:func:`encode` replaces by one derived from the sample (the page checksums are recomputed).
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import soundfile as sf

from psm.data.world.events import SYNTH_SR, background, set_noise_seed, synthesize, white_noise
from psm.data.world.rules import EVENT_NAMES

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
_AUDIO_STREAM = 7  # seed-sequence tag of audio randomness


def clip_rng(seed: int, index: int, event: int | None = None) -> np.random.Generator:
    """The generator of one clip (``event=None``: background, gain, hiss) or of one event in it."""
    key = [int(seed), _AUDIO_STREAM, int(index)] + ([] if event is None else [1 + int(event)])
    return np.random.default_rng(key)


def render_clip(
    seed: int,
    index: int,
    duration_s: float,
    sample_rate: int,
    snr_db: np.ndarray,
    peak_dbfs: float,
    ambience: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """float32 mono clip at ``sample_rate``: events with finite ``snr_db[e]`` mixed over the background
    (whose keynote sounds follow ``ambience`` = (urban, foliage, water), see events.background)."""
    set_noise_seed(seed)
    n = max(round(duration_s * SYNTH_SR), 1)
    rng = clip_rng(seed, index)
    mix = background(rng, n, ambience)
    for e in np.flatnonzero(np.isfinite(snr_db)):
        sig = synthesize(EVENT_NAMES[e], clip_rng(seed, index, int(e)), n)
        mix += sig * np.float32(10.0 ** (float(snr_db[e]) / 20.0))
    if sample_rate != SYNTH_SR:
        import soxr

        mix = soxr.resample(mix, SYNTH_SR, sample_rate, quality="HQ").astype(np.float32)
    peak = float(np.max(np.abs(mix))) or 1.0
    mix *= np.float32(10.0 ** (peak_dbfs / 20.0) / peak)
    # Recorder self-noise over the whole band of the stored rate, 74-84 dB below full scale.
    hiss = white_noise(rng, mix.shape[0], sample_rate)
    mix += hiss * np.float32(10.0 ** (float(rng.uniform(-84.0, -74.0)) / 20.0))
    np.clip(mix, -0.999, 0.999, out=mix)
    return mix


# ---------------------------------------------------------------------------------------------------------
# encoding


def _ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, init 0, no final xor), via zlib's reflected one."""
    rev = data.translate(_REVERSE_BITS)
    crc = zlib.crc32(rev, 0xFFFFFFFF) ^ 0xFFFFFFFF  # reflected CRC with init 0 and no final xor
    return int(f"{crc:032b}"[::-1], 2)


_REVERSE_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def fix_ogg_serial(data: bytes, serial: int) -> bytes:
    """Set the bitstream serial number of every Ogg page to ``serial`` and recompute the page checksums."""
    buf = bytearray(data)
    pos = 0
    serial_bytes = (serial & 0xFFFFFFFF).to_bytes(4, "little")
    while pos + 27 <= len(buf):
        if buf[pos : pos + 4] != b"OggS":
            raise ValueError(f"not an Ogg page at byte {pos}")
        nseg = buf[pos + 26]
        seg_table = buf[pos + 27 : pos + 27 + nseg]
        length = 27 + nseg + sum(seg_table)
        buf[pos + 14 : pos + 18] = serial_bytes
        buf[pos + 22 : pos + 26] = b"\0\0\0\0"
        buf[pos + 22 : pos + 26] = _ogg_crc(bytes(buf[pos : pos + length])).to_bytes(4, "little")
        pos += length
    return bytes(buf)


def encode(audio: np.ndarray, sample_rate: int, fmt: str, serial: int = 1) -> bytes:
    """Encode mono float audio as WAV (PCM 16), FLAC (16 bit) or Ogg Vorbis, byte-deterministically."""
    try:
        container, subtype = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown audio format {fmt!r}; known: {', '.join(FORMATS)}") from None
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format=container, subtype=subtype)
    data = buf.getvalue()
    if fmt == "ogg":
        data = fix_ogg_serial(data, serial)
    return data
