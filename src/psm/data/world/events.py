"""Sound-event synthesis: one numpy generator per event class, each with its own spectro-temporal signature.

Every generator returns a mono float32 signal of exactly ``n`` samples at :data:`SYNTH_SR` whose active
part has unit RMS, so that the mixer sets each event's level relative to the background in dB. All
content lies below 7.8 kHz (the Nyquist frequency of the lowest storage rate, 16 kHz), so every stored
file holds every labelled event whatever its sample rate. The signatures:

==============  ====================================================================================
bird_song       phrases of 3-12 FM chirp syllables (2-6.5 kHz) repeated every few seconds
dawn_chorus     dense, continuous overlap of many chirping birds of several species (1.8-7.5 kHz)
woodpecker      drum rolls: 10-25 damped ~1-2 kHz knocks at 12-22 per second
insects         cricket trills: 3.5-7 kHz carriers pulsed at 20-60 Hz, in chirps or continuous
frogs           croaks: pulse trains (60-160 Hz) through 400-1500 Hz resonances, a small chorus
cattle          moos: 1-2.5 s harmonic stacks, f0 90-160 Hz, slow rise-fall contour
rooster         crows: 4-part harmonic contour, f0 450-750 Hz
dog_bark        groups of 2-5 short harmonic barks (f0 320-700 Hz) with a noisy onset
voices          babble: 2-6 talkers, voiced harmonic stacks (f0 90-260 Hz) with syllabic 3-6 Hz gating
traffic         continuous low-frequency rumble with passing-vehicle swells and engine hum
car_horn        1-3 honks: two-tone square-ish harmonic stacks (350-520 Hz)
siren           wail or hi-lo two-tone FM (550-1500 Hz) with harmonics, rising and falling
construction    metallic hammer strikes (2-5 kHz ringing) and jackhammer / drill bursts
aircraft        a flyover: broadband 80-1500 Hz roar rising and falling over 6-25 s, a gliding whine
church_bells    strikes every 1.2-3 s: inharmonic bell partials with long decays
waves           washes every 3-8 s: 150-2500 Hz noise with slow attack and long decay
wind            low-passed gusting noise (< 400 Hz) with rustle in gusts
rain            broadband hiss (1.5-7.5 kHz) with dense droplet clicks
==============  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SYNTH_SR = 16_000


def expit(x: np.ndarray) -> np.ndarray:
    """The logistic function, overflow-free."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


TWO_PI = 2.0 * np.pi


# ------------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------------


def _fast_len(n: int) -> int:
    from scipy.fft import next_fast_len

    return next_fast_len(n, real=True)


_BANK_SECONDS = 16
_BANK_VARIANTS = 2
_bank: dict[tuple, np.ndarray] = {}
_bank_seed = [0]


def set_noise_seed(seed: int) -> None:
    """Seed the stock of noise signals (a world's seed); clears the stock if the seed changes."""
    if _bank_seed[0] != seed:
        _bank.clear()
        _bank_seed[0] = seed


def _quantise(f: float) -> float:
    # 1/3-octave grid: few distinct stock signals, and still a spread of bands.
    return float(np.round(2.0 ** (np.round(np.log2(max(f, 1.0)) * 3.0) / 3.0), 1))


def _stock(lo: float, hi: float, tilt: float, variant: int) -> np.ndarray:
    key = (lo, hi, tilt, variant)
    out = _bank.get(key)
    if out is None:
        import scipy.fft as sfft

        rng = np.random.default_rng([_bank_seed[0], 303, int(lo * 10), int(hi * 10), int(tilt * 10 + 100), variant])
        m = _BANK_SECONDS * SYNTH_SR
        spec = sfft.rfft(rng.standard_normal(m, dtype=np.float32))
        f = np.fft.rfftfreq(m, 1.0 / SYNTH_SR).astype(np.float32)
        width_lo, width_hi = max(lo * 0.15, 10.0), max(hi * 0.08, 20.0)
        gain = expit((f - lo) / width_lo) * expit((hi - f) / width_hi)
        if tilt:
            gain = gain * np.power(np.maximum(f, 20.0) / 1000.0, tilt / 2.0)
        out = _unit(sfft.irfft(spec * gain.astype(np.float32), n=m).astype(np.float32))
        _bank[key] = out
    return out


def white_noise(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    """Unit-variance white noise of ``n`` samples, cut from a stock (recorder hiss at the storage rate)."""
    key = ("white", sample_rate)
    stock = _bank.get(key)
    if stock is None:
        stock = np.random.default_rng([_bank_seed[0], 304, sample_rate]).standard_normal(
            _BANK_SECONDS * sample_rate, dtype=np.float32
        )
        _bank[key] = stock
    m = stock.shape[0]
    if n > m:
        return np.resize(np.roll(stock, int(rng.integers(m))), n)
    start = int(rng.integers(0, m - n + 1))
    return stock[start : start + n] * np.float32(rng.choice([-1.0, 1.0]))


def band_noise(rng: np.random.Generator, n: int, lo: float, hi: float, tilt: float = 0.0) -> np.ndarray:
    """Gaussian noise with a flat (or ``f^tilt`` power) spectrum between lo and hi Hz, smooth edges, unit RMS.

    Cut at a random offset from a stock of long noise signals (bands on a 1/6-octave grid, a few variants
    each), so a clip costs a slice instead of an FFT; random polarity and direction add variety.
    """
    lo_q, hi_q = _quantise(lo), min(_quantise(hi), 7700.0)
    stock = _stock(lo_q, hi_q, float(np.round(tilt * 2) / 2), int(rng.integers(_BANK_VARIANTS)))
    m = stock.shape[0]
    if n > m:  # longer than the stock: join slices of both variants with random offsets
        parts, have = [], 0
        while have < n:
            other = _stock(lo_q, hi_q, float(np.round(tilt * 2) / 2), int(rng.integers(_BANK_VARIANTS)))
            take = min(n - have, m // 2)
            start = int(rng.integers(0, m - take + 1))
            parts.append(other[start : start + take])
            have += take
        return _unit(np.concatenate(parts) * np.float32(rng.choice([-1.0, 1.0])))
    start = int(rng.integers(0, m - n + 1))
    seg = stock[start : start + n]
    if rng.random() < 0.5:
        seg = seg[::-1]
    return _unit(seg * np.float32(rng.choice([-1.0, 1.0])))


def _unit(x: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return (x / rms).astype(np.float32) if rms > 0 else x.astype(np.float32)


def _phase(freq: np.ndarray) -> np.ndarray:
    return np.cumsum(freq * (TWO_PI / SYNTH_SR), dtype=np.float64)


def harmonic_stack(f0: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """Sum of harmonics k·f0(t) with amplitudes ``amps[k-1]`` (harmonics above 7.6 kHz are faded out)."""
    ph = np.mod(_phase(f0), TWO_PI).astype(np.float32)
    out = np.zeros(f0.shape, dtype=np.float32)
    f_max = float(np.max(f0)) if f0.size else 0.0
    for k, a in enumerate(amps, start=1):
        if a == 0:
            continue
        if k * f_max > 7000.0:
            fade = np.clip((7600.0 - k * f0) / 600.0, 0.0, 1.0).astype(np.float32)
            if not fade.any():
                break
            out += np.float32(a) * fade * np.sin(np.float32(k) * ph)
        else:
            out += np.float32(a) * np.sin(np.float32(k) * ph)
    return out


def pulse_train(f0: np.ndarray) -> np.ndarray:
    """Unit impulses once per period of the (time-varying) fundamental ``f0`` — a glottal-like source."""
    cycles = np.floor(np.cumsum(f0 / SYNTH_SR, dtype=np.float64))
    out = np.zeros(f0.shape, dtype=np.float32)
    out[1:][np.diff(cycles) > 0] = 1.0
    return out


def envelope(n: int, attack: int, release: int) -> np.ndarray:
    """Linear attack, flat, exponential-ish release over ``n`` samples."""
    env = np.ones(n, dtype=np.float32)
    a = min(max(attack, 1), n)
    env[:a] = np.linspace(0.0, 1.0, a, dtype=np.float32)
    r = min(max(release, 1), n - a) if n > a else 0
    if r > 0:
        env[n - r :] *= np.linspace(1.0, 0.0, r, dtype=np.float32) ** 2
    return env


def add_at(out: np.ndarray, seg: np.ndarray, start: int) -> None:
    """Add ``seg`` into ``out`` from sample ``start`` (either may be cut at the ends)."""
    n = out.shape[0]
    if start >= n or start + seg.shape[0] <= 0:
        return
    s0 = max(0, -start)
    e = min(seg.shape[0], n - start)
    out[start + s0 : start + e] += seg[s0:e]


def smooth_random(rng: np.random.Generator, n: int, rate_hz: float) -> np.ndarray:
    """A smooth random curve (std ≈ 1) varying at about ``rate_hz``: random knots, linearly interpolated
    at a 1 kHz control rate and held for 16 samples."""
    hold = 16
    nc = -(-n // hold)
    step = max(SYNTH_SR / hold / max(rate_hz, 1e-3), 1.0)
    knots = rng.standard_normal(int(nc / step) + 3)
    ctl = np.interp(np.arange(nc) / step, np.arange(knots.size), knots).astype(np.float32)
    return np.repeat(ctl, hold)[:n]


def iir_filter(x: np.ndarray, b: list[float], a: list[float], tail: int = 4096) -> np.ndarray:
    """Apply the rational filter b/a (a short-memory IIR) by multiplying spectra.

    Equal to direct-form filtering when the impulse response dies out within ``tail`` samples (all the
    resonators here decay in milliseconds); one FFT pair, and no scipy.signal import (a second at start-up).
    """
    import scipy.fft as sfft

    n = x.shape[0]
    m = sfft.next_fast_len(n + tail, real=True)
    w = np.exp(-1j * np.pi * np.arange(m // 2 + 1) / (m / 2))  # e^{-jω}
    num = sum(bk * w**k for k, bk in enumerate(b))
    den = sum(ak * w**k for k, ak in enumerate(a))
    return sfft.irfft(sfft.rfft(x, n=m) * (num / den), n=m)[:n].astype(np.float32)


def _bandpass(f: float, q: float) -> tuple[list[float], list[float]]:
    w0 = TWO_PI * f / SYNTH_SR
    alpha = np.sin(w0) / (2.0 * q)
    return [alpha, 0.0, -alpha], [1.0 + alpha, -2.0 * np.cos(w0), 1.0 - alpha]


def resonator_bank(x: np.ndarray, freqs: list[float], q: float = 8.0) -> np.ndarray:
    """Sum of second-order band-pass resonators (formants) applied to ``x``."""
    import scipy.fft as sfft

    n = x.shape[0]
    m = sfft.next_fast_len(n + 4096, real=True)
    w = np.exp(-1j * np.pi * np.arange(m // 2 + 1) / (m / 2))
    response = np.zeros(m // 2 + 1, dtype=np.complex128)
    for f in freqs:
        b, a = _bandpass(f, q)
        response += (b[0] + b[1] * w + b[2] * w * w) / (a[0] + a[1] * w + a[2] * w * w)
    return sfft.irfft(sfft.rfft(x, n=m) * response, n=m)[:n].astype(np.float32)


def _chirp(rng: np.random.Generator, dur: float, f0: float, f1: float, wobble: float = 0.0) -> np.ndarray:
    m = max(int(dur * SYNTH_SR), 8)
    t = np.linspace(0.0, 1.0, m, dtype=np.float32)
    shape = float(rng.uniform(0.5, 2.0))
    f = f0 + (f1 - f0) * t**shape
    if wobble:
        f = f + wobble * np.sin(TWO_PI * float(rng.uniform(20, 60)) * t * dur)
    f = np.clip(f, 200.0, 7500.0)
    ph = _phase(f)
    env = np.sin(np.pi * t) ** 2
    return (env * (np.sin(ph) + 0.25 * np.sin(2 * ph) * (f < 3700))).astype(np.float32)


# ------------------------------------------------------------------------------------------------------
# event generators: (rng, n) → float32[n], active part at unit RMS
# ------------------------------------------------------------------------------------------------------


def _active_unit(out: np.ndarray) -> np.ndarray:
    """Scale so that the RMS over the samples where the event is active (above 1% of peak) is 1."""
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    if peak == 0:
        return out
    active = np.abs(out) > 0.01 * peak
    # Smear the activity mask a little so oscillating signals count their zero crossings as active.
    rms = float(np.sqrt(np.mean(np.square(out[active], dtype=np.float64)))) if active.any() else 1.0
    return (out / rms).astype(np.float32)


def bird_song(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    base = float(rng.uniform(2200, 5200))
    span = float(rng.uniform(-1500, 1500))
    syl_dur = float(rng.uniform(0.04, 0.15))
    n_syl = int(rng.integers(3, 13))
    gap = float(rng.uniform(0.02, 0.08))
    phrase = []
    for k in range(n_syl):
        f0 = base * float(rng.uniform(0.85, 1.15))
        phrase.append(_chirp(rng, syl_dur * float(rng.uniform(0.7, 1.3)), f0, np.clip(f0 + span, 1800, 6500), 80.0))
        phrase.append(np.zeros(int(gap * SYNTH_SR), np.float32))
        if k == n_syl - 1 and rng.random() < 0.5:  # a terminal flourish
            phrase.append(_chirp(rng, 0.12, base * 1.3, base * 0.8, 200.0))
    seg = np.concatenate(phrase)
    t = int(rng.uniform(0.0, 1.0) * SYNTH_SR)
    while t < n:
        add_at(out, seg * float(rng.uniform(0.6, 1.0)), t)
        t += seg.shape[0] + int(rng.uniform(1.0, 4.0) * SYNTH_SR)
    if not out.any():
        add_at(out, seg, 0)
    return _active_unit(out)


def dawn_chorus(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    templates = []
    for _ in range(int(rng.integers(4, 9))):  # species, each with a few syllable variants
        f0, span, dur = float(rng.uniform(1800, 6500)), float(rng.uniform(-1200, 1200)), float(rng.uniform(0.03, 0.2))
        for _ in range(3):
            g = f0 * float(rng.uniform(0.9, 1.1))
            templates.append(_chirp(rng, dur, g, float(np.clip(g + span, 1800, 7500)), 120.0))
    rate = float(rng.uniform(6, 14))  # syllables per second, all birds together
    count = int(rate * n / SYNTH_SR) + 1
    starts = rng.integers(0, n, count)
    kinds = rng.integers(0, len(templates), count)
    amps = rng.uniform(0.2, 1.0, count)
    for s, k, a in zip(starts, kinds, amps, strict=True):
        add_at(out, templates[k] * np.float32(a), int(s))
    out += 0.05 * band_noise(rng, n, 2000, 6000) * (np.abs(out).max() or 1.0)
    return _active_unit(out)


def woodpecker(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    f_res = float(rng.uniform(900, 2000))
    m = int(0.03 * SYNTH_SR)
    t = np.arange(m, dtype=np.float32) / SYNTH_SR
    knock = (np.sin(TWO_PI * f_res * t) + 0.5 * np.sin(TWO_PI * 2.3 * f_res * t)) * np.exp(-t / 0.006)
    knock[:3] += rng.standard_normal(3).astype(np.float32)
    rate = float(rng.uniform(12, 22))
    n_rolls = max(1, int(rng.integers(1, 4)) if n > 2 * SYNTH_SR else 1)
    for _ in range(n_rolls):
        start = int(rng.uniform(0, max(n - SYNTH_SR, 1)))
        hits = int(rng.integers(10, 26))
        for h in range(hits):
            amp = 1.0 - 0.5 * h / hits
            add_at(out, (knock * amp).astype(np.float32), start + int(h * SYNTH_SR / rate))
    return _active_unit(out)


def insects(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    t = np.arange(n, dtype=np.float32) / SYNTH_SR
    for _ in range(int(rng.integers(1, 4))):
        fc = float(rng.uniform(3500, 7000))
        pulse = float(rng.uniform(20, 60))
        carrier = np.sin(TWO_PI * fc * t + float(rng.uniform(0, 6.28)))
        am = np.clip(np.sin(TWO_PI * pulse * t + float(rng.uniform(0, 6.28))), 0.0, None) ** 2
        if rng.random() < 0.6:  # chirps: groups of pulses, 1-3 per second
            chirp_rate = float(rng.uniform(1.0, 3.0))
            duty = float(rng.uniform(0.25, 0.6))
            gate = (np.mod(t * chirp_rate + float(rng.uniform(0, 1)), 1.0) < duty).astype(np.float32)
            am = am * gate
        out += (carrier * am * float(rng.uniform(0.4, 1.0))).astype(np.float32)
    return _active_unit(out)


def frogs(rng: np.random.Generator, n: int) -> np.ndarray:
    source = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(1, 5))):
        f0 = float(rng.uniform(60, 160))
        dur = float(rng.uniform(0.15, 0.6))
        m = int(dur * SYNTH_SR)
        croak = pulse_train(np.full(m, f0, np.float32)) * envelope(m, m // 6, m // 3)
        period = float(rng.uniform(0.5, 2.0))
        tt = float(rng.uniform(0, period))
        while tt * SYNTH_SR < n:
            add_at(source, croak * float(rng.uniform(0.6, 1.0)), int(tt * SYNTH_SR))
            tt += period * float(rng.uniform(0.8, 1.2))
    out = resonator_bank(source, [float(rng.uniform(400, 800)), float(rng.uniform(900, 1500))], q=6.0)
    return _active_unit(out)


def cattle(rng: np.random.Generator, n: int) -> np.ndarray:
    source = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        dur = float(rng.uniform(1.0, 2.5))
        m = int(dur * SYNTH_SR)
        t = np.linspace(0, 1, m, dtype=np.float32)
        f0 = float(rng.uniform(90, 160)) * (1.0 + 0.35 * np.clip(np.sin(np.pi * t), 0, 1) ** 1.5 - 0.1 * t)
        add_at(source, pulse_train(f0) * envelope(m, m // 5, m // 3), int(rng.uniform(0, max(n - m // 2, 1))))
    # An open-mouthed "mm-oo": nasal low resonance, first and second formants.
    out = resonator_bank(
        source, [float(rng.uniform(180, 260)), float(rng.uniform(350, 550)), float(rng.uniform(800, 1100))], q=5.0
    )
    return _active_unit(out)


def rooster(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(1, 3))):
        base = float(rng.uniform(450, 750))
        parts, levels = [0.18, 0.16, 0.22, 0.7], [1.0, 1.15, 1.3, 1.05]
        segs = []
        for d, lv in zip(parts, levels, strict=True):
            m = int(d * float(rng.uniform(0.85, 1.2)) * SYNTH_SR)
            t = np.linspace(0, 1, m, dtype=np.float32)
            f0 = base * lv * (1.0 + 0.08 * np.sin(np.pi * t))
            seg = harmonic_stack(f0, np.array([1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12]))
            seg = seg + 0.15 * band_noise(rng, m, 800, 4000)
            segs.append(seg * envelope(m, m // 10, m // 4))
            segs.append(np.zeros(int(0.03 * SYNTH_SR), np.float32))
        crow = np.concatenate(segs)
        add_at(out, crow, int(rng.uniform(0, max(n - crow.shape[0], 1))))
    return _active_unit(out)


def dog_bark(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    f0_dog = float(rng.uniform(320, 700))
    for _ in range(int(rng.integers(1, 4))):
        start = int(rng.uniform(0, max(n - SYNTH_SR, 1)))
        for b in range(int(rng.integers(2, 6))):
            m = int(rng.uniform(0.1, 0.25) * SYNTH_SR)
            t = np.linspace(0, 1, m, dtype=np.float32)
            f0 = f0_dog * (1.15 - 0.3 * t)
            seg = harmonic_stack(f0, np.array([1.0, 0.8, 0.6, 0.5, 0.35, 0.25, 0.15]))
            seg = seg + 0.6 * band_noise(rng, m, 400, 3500) * np.exp(-t * 8)
            add_at(out, seg * envelope(m, m // 20, m // 2), start + int(b * rng.uniform(0.3, 0.55) * SYNTH_SR))
    return _active_unit(out)


def voices(rng: np.random.Generator, n: int) -> np.ndarray:
    source = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(2, 7))):
        f0 = float(rng.uniform(90, 260)) * (1.0 + 0.12 * smooth_random(rng, n, 3.0))
        syll = np.clip(smooth_random(rng, n, float(rng.uniform(3.0, 6.0))) + 0.3, 0.0, None)
        talk = np.clip(smooth_random(rng, n, 0.4) + 0.8, 0.0, 1.0)  # turns and pauses
        source += pulse_train(f0) * syll * talk * float(rng.uniform(0.4, 1.0))
    # Vowel-like formants shared by the crowd (a babble, not words), plus breath noise.
    out = resonator_bank(
        source, [float(rng.uniform(450, 750)), float(rng.uniform(1000, 1500)), float(rng.uniform(2200, 2800))], q=4.0
    )
    out += 0.05 * band_noise(rng, n, 300, 3500) * np.sqrt(np.mean(out**2))
    return _active_unit(out)


def traffic(rng: np.random.Generator, n: int) -> np.ndarray:
    rumble = band_noise(rng, n, 30, float(rng.uniform(600, 1400)), tilt=-1.5)
    tyres = band_noise(rng, n, 400, 2000)
    t = np.arange(n, dtype=np.float32) / SYNTH_SR
    swell = np.full(n, 0.3, dtype=np.float32)
    for _ in range(max(1, int(n / SYNTH_SR * rng.uniform(0.2, 1.0)))):
        c = float(rng.uniform(-2, n / SYNTH_SR + 2))
        w = float(rng.uniform(1.0, 3.0))
        swell += np.exp(-0.5 * ((t - c) / w) ** 2).astype(np.float32)
    hum = np.sin(TWO_PI * float(rng.uniform(35, 110)) * t * (1.0 + 0.05 * smooth_random(rng, n, 0.3)))
    out = (rumble + 0.4 * tyres * swell + 0.3 * hum) * swell
    return _active_unit(out.astype(np.float32))


def car_horn(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    f1 = float(rng.uniform(350, 440))
    f2 = f1 * float(rng.uniform(1.12, 1.26))
    amps = np.array([1.0, 0.5, 0.33, 0.25, 0.2, 0.16, 0.14, 0.12])
    for _ in range(int(rng.integers(1, 4))):
        m = int(rng.uniform(0.25, 1.0) * SYNTH_SR)
        seg = harmonic_stack(np.full(m, f1, np.float32), amps) + harmonic_stack(np.full(m, f2, np.float32), amps)
        add_at(out, seg * envelope(m, 80, 400), int(rng.uniform(0, max(n - m, 1))))
    return _active_unit(out)


def siren(rng: np.random.Generator, n: int) -> np.ndarray:
    dur = min(n / SYNTH_SR, float(rng.uniform(3.0, 9.0)))
    m = max(int(dur * SYNTH_SR), 16)
    t = np.arange(m, dtype=np.float32) / SYNTH_SR
    if rng.random() < 0.5:  # wail
        f = float(rng.uniform(800, 1100)) + float(rng.uniform(250, 450)) * np.sin(
            TWO_PI * float(rng.uniform(0.15, 0.5)) * t
        )
    else:  # hi-lo
        lo = float(rng.uniform(550, 750))
        f = np.where(np.mod(t, 1.0) < 0.5, lo, lo * float(rng.uniform(1.25, 1.45))).astype(np.float32)
    f = f * (1.0 + 0.03 * (1.0 - 2.0 * t / max(dur, 1e-3)))  # a little Doppler
    seg = harmonic_stack(f.astype(np.float32), np.array([1.0, 0.45, 0.25, 0.12]))
    rise = np.exp(-0.5 * ((t - dur / 2) / (dur / 2.5)) ** 2).astype(np.float32)
    out = np.zeros(n, dtype=np.float32)
    add_at(out, seg * rise, int(rng.uniform(0, max(n - m, 1))))
    return _active_unit(out)


def construction(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    m = int(0.12 * SYNTH_SR)
    t = np.arange(m, dtype=np.float32) / SYNTH_SR
    partials = [float(rng.uniform(2000, 3000)), float(rng.uniform(3200, 4200)), float(rng.uniform(4400, 5200))]
    strike = sum(np.sin(TWO_PI * f * t) * np.exp(-t / 0.03) for f in partials).astype(np.float32)
    strike[:20] += rng.standard_normal(20).astype(np.float32) * 2.0
    period = float(rng.uniform(0.35, 0.9))
    tt = float(rng.uniform(0, period))
    while tt * SYNTH_SR < n:
        add_at(out, strike * float(rng.uniform(0.6, 1.0)), int(tt * SYNTH_SR))
        tt += period * float(rng.uniform(0.85, 1.15))
    # A machine for much of the clip: an angle grinder / saw (whine + 2-6 kHz noise) or a jackhammer.
    k = int(min(n, rng.uniform(0.4, 0.8) * n + 0.5 * SYNTH_SR))
    tk = np.arange(k, dtype=np.float32) / SYNTH_SR
    if rng.random() < 0.5:
        whine = np.sin(
            _phase(np.full(k, float(rng.uniform(2800, 4200)), np.float32) * (1.0 + 0.02 * smooth_random(rng, k, 1.0)))
        )
        machine = band_noise(rng, k, 2000, 6000) + 0.8 * whine.astype(np.float32)
    else:
        machine = band_noise(rng, k, 600, 5000) * (
            0.55 + 0.45 * np.sign(np.sin(TWO_PI * float(rng.uniform(18, 30)) * tk))
        )
    add_at(out, machine * envelope(k, 400, 1600), int(rng.uniform(0, max(n - k, 1))))
    return _active_unit(out)


def aircraft(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float32) / SYNTH_SR
    dur = n / SYNTH_SR
    centre = float(rng.uniform(0.2, 0.8)) * dur
    width = float(rng.uniform(3.0, 10.0))
    env = np.exp(-0.5 * ((t - centre) / width) ** 2).astype(np.float32)
    roar = band_noise(rng, n, 80, float(rng.uniform(900, 1600)), tilt=-1.0)
    f_whine = float(rng.uniform(2200, 3800)) * (1.0 + 0.06 * np.tanh(-(t - centre) / width * 2))
    whine = np.sin(_phase(f_whine)).astype(np.float32)
    return _active_unit(((roar + 0.25 * whine * (rng.random() < 0.7)) * env).astype(np.float32))


def church_bells(rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    f0 = float(rng.uniform(300, 800))
    ratios = [0.5, 1.0, 1.19, 1.5, 2.0, 2.51, 2.66, 3.01]
    decays = [3.0, 2.2, 1.8, 1.4, 1.1, 0.8, 0.7, 0.5]
    m = int(min(3.5, n / SYNTH_SR + 0.1) * SYNTH_SR)
    t = np.arange(m, dtype=np.float32) / SYNTH_SR
    strike = np.zeros(m, dtype=np.float32)
    for r, d in zip(ratios, decays, strict=True):
        f = f0 * r
        if f < 7500:
            strike += (np.sin(TWO_PI * f * t) * np.exp(-t / d) * (1.0 / (1.0 + 0.3 * r))).astype(np.float32)
    strike *= envelope(m, 20, 1)
    period = float(rng.uniform(1.2, 3.0))
    tt = float(rng.uniform(0, min(period, 0.5 * n / SYNTH_SR)))
    while tt * SYNTH_SR < n:
        add_at(out, strike * float(rng.uniform(0.7, 1.0)), int(tt * SYNTH_SR))
        tt += period
    return _active_unit(out)


def waves(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float32) / SYNTH_SR
    env = np.full(n, 0.15, dtype=np.float32)
    tt = float(rng.uniform(-2, 2))
    while tt < n / SYNTH_SR:
        rise, fall = float(rng.uniform(0.5, 1.5)), float(rng.uniform(1.5, 3.5))
        x = t - tt
        env += np.where(x < 0, np.exp(-0.5 * (x / rise) ** 2), np.exp(-x / fall)).astype(np.float32) * float(
            rng.uniform(0.5, 1.0)
        )
        tt += float(rng.uniform(3.0, 8.0))
    wash = band_noise(rng, n, 150, float(rng.uniform(1800, 3000)), tilt=-0.5)
    return _active_unit((wash * env).astype(np.float32))


def wind(rng: np.random.Generator, n: int) -> np.ndarray:
    gust = np.clip(0.6 + 0.5 * smooth_random(rng, n, float(rng.uniform(0.1, 0.5))), 0.05, None)
    low = band_noise(rng, n, 20, float(rng.uniform(200, 400)), tilt=-1.0)
    rustle = band_noise(rng, n, 800, 4000)
    out = low * gust + 0.12 * rustle * gust**2
    return _active_unit(out.astype(np.float32))


def rain(rng: np.random.Generator, n: int) -> np.ndarray:
    out = band_noise(rng, n, 1500, 7500) * 0.6
    drops = np.zeros(n, dtype=np.float32)
    count = int(n / SYNTH_SR * rng.uniform(60, 200))
    drops[rng.integers(0, n, count)] = rng.uniform(0.5, 3.0, count).astype(np.float32)
    f = float(rng.uniform(2500, 5500))
    w0 = TWO_PI * f / SYNTH_SR
    r = 0.97
    drops = iir_filter(drops, [1.0], [1.0, -2 * r * np.cos(w0), r * r])
    return _active_unit(out + 0.1 * drops / (np.abs(drops).max() or 1.0) * 5)


GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "bird_song": bird_song,
    "dawn_chorus": dawn_chorus,
    "woodpecker": woodpecker,
    "insects": insects,
    "frogs": frogs,
    "cattle": cattle,
    "rooster": rooster,
    "dog_bark": dog_bark,
    "voices": voices,
    "traffic": traffic,
    "car_horn": car_horn,
    "siren": siren,
    "construction": construction,
    "aircraft": aircraft,
    "church_bells": church_bells,
    "waves": waves,
    "wind": wind,
    "rain": rain,
}


def background(rng: np.random.Generator, n: int, ambience: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Ambient background (unit RMS): pink-to-brown noise of random tilt with a slow level drift, plus the
    place's keynote sounds, each in [0, 1]: ``ambience = (urban, foliage, water)`` — a distant low rumble
    of town (25-350 Hz), leaves rustling (1.5-6.5 kHz) and water lapping (0.2-1.5 kHz). They are not
    events (no label): the steady character of a place that lies under whatever happens there. At full
    strength they stand 22 / 2 / 14 dB over the base noise, whose tilt varies only within pink-ish limits:
    with a wider tilt range and keynotes 4-18 dB quieter they drowned in it; a louder rustle would in turn
    mask construction, which shares its band (tests/test_world.py)."""
    tilt = float(rng.uniform(-1.6, -1.0))
    out = band_noise(rng, n, 25, 7600, tilt=tilt)
    out *= 1.0 + 0.2 * smooth_random(rng, n, 0.2)
    urban, foliage, water = (float(np.clip(v, 0.0, 1.0)) for v in ambience)
    if urban > 0.02:
        out += band_noise(rng, n, 25, 350, tilt=-1.0) * np.float32(10.0 ** ((2.0 + 20.0 * urban) / 20.0))
    if foliage > 0.02:
        am = np.clip(0.7 + 0.4 * smooth_random(rng, n, 0.3), 0.1, None)
        out += band_noise(rng, n, 1500, 6500) * am * np.float32(10.0 ** ((-12.0 + 14.0 * foliage) / 20.0))
    if water > 0.02:
        am = np.clip(0.6 + 0.5 * smooth_random(rng, n, 0.5), 0.05, None)
        out += band_noise(rng, n, 200, 1500) * am * np.float32(10.0 ** ((0.0 + 14.0 * water) / 20.0))
    return _unit(out)


def synthesize(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """One event of class ``name``: ``n`` samples at :data:`SYNTH_SR`, active part at unit RMS."""
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown event {name!r}; known: {', '.join(GENERATORS)}") from None
    out = gen(rng, n)
    if out.shape[0] != n:  # defensive: every generator writes exactly n samples
        out = np.resize(out, n)
    return np.nan_to_num(out, copy=False)
