"""Audio decoding and CLAP fusion features: parity with transformers' ClapFeatureExtractor, batching, RNG."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from conftest import shared_data
from psm.data import audio
from psm.data.audio import (
    DEFAULT_SPEC,
    AudioDecodeError,
    ClapFeatureSpec,
    _resize_frames,
    _signals_gather,
    _signals_loop,
    clap_clip_mel,
    clap_fusion_features,
    clap_fusion_features_from_files,
    clap_fusion_from_mel,
    fusion_chunk_ranges,
    load_audio,
    mel_filterbank,
)

SR = 48_000
TOL_DB = 1e-3
ROBIN = "librosa/456440__inspectorj__bird-whistling-robin-single-13.hq.ogg"  # stereo 44.1 kHz OGG


# ----------------------------------------------------------------------------------------------------
# Reference extractor (built offline: the laion/clap-htsat-fused preprocessor_config values)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=48000,
        hop_length=480,
        max_length_s=10,
        fft_window_size=1024,
        padding_value=0.0,
        return_attention_mask=False,
        frequency_min=50,
        frequency_max=14000,
        top_db=None,
        truncation="fusion",
        padding="repeatpad",
    )


def run_reference(extractor, clips: list[np.ndarray], monkeypatch) -> tuple[np.ndarray, list[list[int]]]:
    """Extractor features (B, 4, 1001, 64) and the chunk starts it drew, three per long clip in order.

    ``_random_mel_fusion`` draws each start with ``np.random.choice(range)``; recording the values it
    returns lets us hand the very same starts to ours.
    """
    drawn: list[int] = []
    choice = np.random.choice

    def recording_choice(a, *args, **kwargs):
        value = choice(a, *args, **kwargs)
        drawn.append(int(value))
        return value

    state = np.random.get_state()
    monkeypatch.setattr(np.random, "choice", recording_choice)
    try:
        out = extractor(clips, sampling_rate=SR, return_tensors="np")
    finally:
        monkeypatch.undo()
        np.random.set_state(state)
    return np.asarray(out["input_features"]), [drawn[i : i + 3] for i in range(0, len(drawn), 3)]


def make_clip(n: int, seed: int = 0, kind: str = "mix") -> np.ndarray:
    """Deterministic synthetic clip of ``n`` samples: tones + chirp + noise ("mix") or a pure tone ("tone")."""
    t = np.arange(n) / SR
    if kind == "tone":
        return (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * 523.0 * t) + 0.2 * np.sin(2 * np.pi * (200 * t + 400 * t**2))
    x += 0.05 * rng.standard_normal(n) * (1.0 + np.sin(2 * np.pi * 0.5 * t))
    return x.astype(np.float32)


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ----------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------


def test_filterbank_matches_extractor(extractor):
    assert mel_filterbank().shape == (513, 64)
    assert max_err(mel_filterbank(), extractor.mel_filters) < 1e-12


@pytest.mark.parametrize(
    ("n_samples", "kind"),
    [
        (144_000, "mix"),  # 3 s: 3 copies + 1 s of zeros
        (120_000, "tone"),  # 2.5 s pure tone, 4 exact copies: needs float64-accurate FFT bins
        (480_000, "mix"),  # exactly 10 s: no padding
        (480_300, "mix"),  # 10 s + 300: the extractor's 1001-frame corner case (whole clip, not longer)
    ],
)
def test_parity_single_window(extractor, monkeypatch, n_samples, kind):
    clip = make_clip(n_samples, kind=kind)
    ref, drawn = run_reference(extractor, [clip], monkeypatch)
    ours, is_longer = clap_fusion_features(torch.from_numpy(clip))
    assert ours.shape == (1, 4, 1001, 64) and ours.dtype == torch.float32
    assert drawn == [] and is_longer.tolist() == [False]
    assert max_err(ours, ref) < TOL_DB
    assert torch.equal(ours[0, 0], ours[0, 3])


@pytest.mark.parametrize("n_samples", [480_480, 480_500, 1_200_000])  # 1002, 1002 and 2501 frames
def test_parity_long(extractor, monkeypatch, n_samples):
    clip = make_clip(n_samples, seed=1)
    ref, drawn = run_reference(extractor, [clip], monkeypatch)
    ours_default, is_longer = clap_fusion_features(torch.from_numpy(clip))
    assert is_longer.tolist() == [True]
    # The global view does not depend on the chunk starts.
    assert max_err(ours_default[0, 0], ref[0, 0]) < TOL_DB
    ours, _ = clap_fusion_features(torch.from_numpy(clip), chunk_starts=drawn)
    assert max_err(ours, ref) < TOL_DB
    ranges = fusion_chunk_ranges(n_samples // 480 + 1)
    assert all(lo <= s < hi for s, (lo, hi) in zip(drawn[0], ranges, strict=True))


def test_parity_mixed_batch_padded_and_list(extractor, monkeypatch):
    lengths = [144_000, 1_200_000, 480_300, 576_000]  # 3 s, 25 s, corner case, 12 s
    clips = [make_clip(n, seed=i) for i, n in enumerate(lengths)]
    ref, drawn = run_reference(extractor, clips, monkeypatch)
    starts = [[0, 0, 0]] * len(clips)
    starts[1], starts[3] = drawn
    padded = torch.zeros(len(clips), max(lengths))
    for i, c in enumerate(clips):
        padded[i, : len(c)] = torch.from_numpy(c)
    padded[0, lengths[0] :] = 7.0  # junk after a clip's length must not matter
    ours, is_longer = clap_fusion_features(padded, torch.tensor(lengths), chunk_starts=starts)
    assert is_longer.tolist() == [False, True, False, True]
    for b in range(len(clips)):
        assert max_err(ours[b], ref[b]) < TOL_DB, b
    # A list of 1-D arrays, processed in small groups, gives the same features.
    ours_list, _ = clap_fusion_features(clips, chunk_starts=starts, max_batch_samples=1)
    assert torch.equal(ours_list, ours)


def test_resize_matches_interpolate():
    mel = torch.randn(3, 3001, 64) * 30.0
    frames = torch.tensor([1002, 2501, 3001])
    ours = _resize_frames(mel, frames, 1001)
    for b, t in enumerate(frames.tolist()):
        ref = F.interpolate(mel[b : b + 1, None, :t], size=[1001, 64], mode="bilinear", align_corners=False)
        assert max_err(ours[b], ref[0, 0]) < 1e-4


# ----------------------------------------------------------------------------------------------------
# Chunk choice, determinism, is_longer
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_clip() -> torch.Tensor:
    return torch.from_numpy(make_clip(1_200_000, seed=3))


def test_seeded_generator_is_reproducible(long_clip):
    a, _ = clap_fusion_features(long_clip, generator=torch.Generator().manual_seed(1))
    b, _ = clap_fusion_features(long_clip, generator=torch.Generator().manual_seed(1))
    c, _ = clap_fusion_features(long_clip, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 1:], c[:, 1:])
    assert torch.equal(a[:, 0], c[:, 0])  # the global view is not random


@pytest.mark.parametrize("n_samples", [100_000, 480_000, 480_300, 1_200_000])
def test_fusion_from_a_kept_clip_mel_is_bit_identical(n_samples):
    """A dataset keeps a clip's whole mel and draws chunks from it each epoch: the same features and the
    same use of the generator as computing them from the waveform (short, 10 s, corner case, long)."""
    clip = torch.from_numpy(make_clip(n_samples, seed=5))
    mel = clap_clip_mel(clip)
    for seed in (None, 1, 2):
        g1 = torch.Generator().manual_seed(seed) if seed is not None else None
        g2 = torch.Generator().manual_seed(seed) if seed is not None else None
        expected, longer = clap_fusion_features([clip], generator=g1)
        got, got_longer = clap_fusion_from_mel(mel, generator=g2)
        assert torch.equal(got, expected[0]) and got_longer == bool(longer[0])
        if seed is not None:
            assert torch.equal(g1.get_state(), g2.get_state())


def test_default_starts_are_range_midpoints(long_clip):
    ranges = fusion_chunk_ranges(1_200_000 // 480 + 1)
    mids = [[lo + (hi - lo) // 2 for lo, hi in ranges]]
    default, _ = clap_fusion_features(long_clip)
    again, _ = clap_fusion_features(long_clip)
    explicit, _ = clap_fusion_features(long_clip, chunk_starts=mids)
    assert torch.equal(default, again) and torch.equal(default, explicit)


def test_chunk_starts_override(long_clip):
    last = 2501 - 1001
    out, _ = clap_fusion_features(
        long_clip, chunk_starts=torch.tensor([[0, 700, last]]), generator=torch.Generator().manual_seed(5)
    )
    swapped, _ = clap_fusion_features(long_clip, chunk_starts=[[last, 0, 700]])
    assert torch.equal(out[0, 1], swapped[0, 2])
    assert torch.equal(out[0, 2], swapped[0, 3])
    assert torch.equal(out[0, 3], swapped[0, 1])
    # Chunk k starting at s is the same 1001 frames shifted: compare overlapping parts of two chunks.
    shifted, _ = clap_fusion_features(long_clip, chunk_starts=[[10, 700, last]])
    assert torch.equal(out[0, 1, 10:], shifted[0, 1, :-10])
    with pytest.raises(ValueError, match="outside"):
        clap_fusion_features(long_clip, chunk_starts=[[0, 0, last + 1]])
    with pytest.raises(ValueError, match="shape"):
        clap_fusion_features(long_clip, chunk_starts=[[0, 0]])


def test_is_longer_is_per_clip():
    clips = [torch.zeros(n) + 0.1 for n in (48_000, 480_000, 480_479, 480_480)]
    _, is_longer = clap_fusion_features(clips)
    assert is_longer.tolist() == [False, False, False, True]
    # No forced True when no clip in the batch is long (unlike the extractor's batch rule).
    _, is_longer = clap_fusion_features(clips[:3])
    assert is_longer.tolist() == [False, False, False]


def test_chunk_ranges_follow_array_split():
    for total in (1002, 1003, 1004, 2501):
        n = total - 1001 + 1
        parts = np.array_split(np.arange(n), 3)
        expected = [(int(r[0]), int(r[-1]) + 1) if len(r) else (0, 1) for r in parts]
        assert fusion_chunk_ranges(total) == expected


def test_gather_and_loop_padding_agree():
    clips = [torch.randn(n) for n in (1, 1000, 144_000, 480_000, 480_300, 500_000)]
    eff = [max(c.numel(), DEFAULT_SPEC.max_samples) for c in clips]
    a = _signals_loop(clips, eff, DEFAULT_SPEC, torch.float64)
    b = _signals_gather(clips, eff, DEFAULT_SPEC, torch.float64)
    for i, e in enumerate(eff):  # compare each row over its own extent (after it: don't-care padding)
        assert torch.equal(a[i, : e + 1024], b[i, : e + 1024]), i
    # Repeat-pad rule: int(480000 / L) whole copies, then zeros; reflection about the clip's own ends.
    row = a[2, 512 : 512 + 480_000]
    assert torch.equal(row[: 3 * 144_000], clips[2].double().repeat(3))
    assert not row[3 * 144_000 :].any()
    assert torch.equal(a[4, :512], clips[4][1:513].double().flip(0))


def test_gpu_plan_matches_cpu_plan(monkeypatch):
    """The GPU code path (batched gather, one FFT pass, float64 matmul under TF32), run on CPU."""
    clips = [torch.from_numpy(make_clip(n, seed=i)) for i, n in enumerate((50_000, 700_000, 480_300))]
    starts = [[0, 0, 0], [5, 200, 458], [0, 0, 0]]
    cpu, cpu_long = clap_fusion_features(clips, chunk_starts=starts)
    monkeypatch.setattr(audio, "_device_plan", lambda device: (audio._signals_gather, None, 1 << 25))
    monkeypatch.setattr(audio, "_tf32_matmul_possible", lambda device: True)
    gpu_like, gpu_long = clap_fusion_features(clips, chunk_starts=starts)
    assert gpu_long.tolist() == cpu_long.tolist() == [False, True, False]
    assert max_err(gpu_like, cpu) < 1e-4


def test_input_validation():
    with pytest.raises(ValueError, match="zero-length"):
        clap_fusion_features([torch.zeros(10), torch.zeros(0)])
    with pytest.raises(ValueError, match="lengths"):
        clap_fusion_features(torch.zeros(2, 100), lengths=[100])
    with pytest.raises(ValueError, match="exceeds"):
        clap_fusion_features(torch.zeros(1, 100), lengths=[101])
    with pytest.raises(ValueError, match="fft_dtype"):
        ClapFeatureSpec(fft_dtype="float16")


def test_float32_fft_option_is_close_on_noise():
    clip = torch.from_numpy(np.random.default_rng(4).standard_normal(96_000).astype(np.float32) * 0.1)
    a, _ = clap_fusion_features(clip)
    b, _ = clap_fusion_features(clip, spec=ClapFeatureSpec(fft_dtype="float32"))
    assert max_err(a, b) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    clips = [torch.from_numpy(make_clip(n, seed=i)) for i, n in enumerate((144_000, 1_200_000, 480_300))]
    starts = [[0, 0, 0], [3, 800, 1400], [0, 0, 0]]
    cpu, cpu_long = clap_fusion_features(clips, chunk_starts=starts)
    gpu, gpu_long = clap_fusion_features([c.cuda() for c in clips], chunk_starts=starts)
    assert gpu.device.type == "cuda" and gpu_long.tolist() == cpu_long.tolist()
    assert max_err(gpu.cpu(), cpu) < TOL_DB


# ----------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize(
    ("rel", "native_sr", "native_frames", "channels"),
    [
        ("maad_forest_24h/S4A03895_20190522_120000.wav", 22_000, 220_000, 1),
        ("spinetail.wav", 44_100, 861_799, 1),
        (ROBIN, 44_100, 119_009, 2),
        ("librosa/glacier-bay-humpback.ogg", 22_050, 1_429_039, 1),
    ],
)
def test_decode_shared_files(rel, native_sr, native_frames, channels):
    path = shared_data("audio", rel)
    info = sf.info(str(path))
    assert (info.samplerate, info.frames, info.channels) == (native_sr, native_frames, channels)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and np.isfinite(y).all()
    assert abs(len(y) - native_frames * SR / native_sr) <= 1
    if channels == 2:  # downmix is the channel mean
        native = load_audio(path, target_sr=native_sr)
        data, _ = sf.read(str(path), dtype="float32", always_2d=True)
        np.testing.assert_allclose(native, data.mean(axis=1), atol=1e-7)


@pytest.mark.shared
def test_parity_real_audio(extractor, monkeypatch):
    """Real recordings (band-limited, quiet bins at -80..-100 dB) need the float64 FFT to stay in 1e-3 dB."""
    paths = [
        shared_data("audio", ROBIN),  # 2.7 s: short
        shared_data("audio", "spinetail.wav"),  # 19.5 s: long
    ]
    clips = [load_audio(p) for p in paths]
    ref, drawn = run_reference(extractor, clips, monkeypatch)
    ours, is_longer = clap_fusion_features(clips, chunk_starts=[[0, 0, 0], drawn[0]])
    assert is_longer.tolist() == [False, True]
    assert max_err(ours, ref) < TOL_DB


@pytest.mark.shared
def test_features_from_files():
    paths = [
        shared_data("audio", "spinetail.wav"),
        shared_data("audio", "maad_forest_24h/S4A03895_20190522_000000.wav"),
    ]
    feats, is_longer = clap_fusion_features_from_files(paths)
    assert feats.shape == (2, 4, 1001, 64) and is_longer.tolist() == [True, False]
    assert torch.isfinite(feats).all()


@pytest.mark.shared
def test_truncated_real_wav(tmp_path):
    raw = shared_data("audio", "maad_forest_24h/S4A03895_20190522_060000.wav").read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(AudioDecodeError, match=r"cut\.wav.*truncated"):
        load_audio(cut)


@pytest.mark.shared
def test_truncated_real_ogg(tmp_path):
    # libsndfile decodes the whole pages of a cut Ogg and reports only those as the length: without a
    # page check, 90 % of this file decoded "successfully" as a shorter clip.
    raw = shared_data("audio", "librosa", "glacier-bay-humpback.ogg").read_bytes()
    assert len(load_audio(shared_data("audio", "librosa", "glacier-bay-humpback.ogg"))) > 0
    for fraction in (0.5, 0.9, 0.999):
        cut = tmp_path / f"cut{fraction}.ogg"
        cut.write_bytes(raw[: int(len(raw) * fraction)])
        with pytest.raises(AudioDecodeError, match=rf"cut{fraction}\.ogg.*truncated Ogg"):
            load_audio(cut)
    # Cut exactly between two pages: every page is whole, but the stream never ends.
    second_last_page_end = raw.rfind(b"OggS")
    cut = tmp_path / "between_pages.ogg"
    cut.write_bytes(raw[:second_last_page_end])
    with pytest.raises(AudioDecodeError, match=r"between_pages\.ogg.*end-of-stream"):
        load_audio(cut)


@pytest.mark.parametrize(("fmt", "subtype"), [("FLAC", "PCM_16"), ("MP3", "MPEG_LAYER_III")])
def test_decode_written_flac_and_mp3(tmp_path, fmt, subtype):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot handle {fmt}")
    x = make_clip(22_050 * 2) * 0.5
    path = tmp_path / f"clip.{fmt.lower()}"
    try:
        sf.write(str(path), np.stack([x, -x], axis=1), 22_050, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:  # pragma: no cover - build without encoder
        pytest.skip(f"this libsndfile cannot write {fmt}: {e}")
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    if fmt == "FLAC":  # lossless: exact length, and the stereo [x, -x] mixes to (almost) silence
        assert abs(len(y) - 2 * SR) <= 1
        assert np.abs(y).max() < 1e-3
    else:  # MP3 may pad to whole frames (1152 samples at 22.05 kHz)
        assert abs(len(y) - 2 * SR) <= 1152 * SR // 22_050 + 1


def test_decode_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "noise_bytes.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioDecodeError, match=r"noise_bytes\.wav"):
        load_audio(corrupt)

    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioDecodeError, match=r"empty\.wav.*zero length"):
        load_audio(empty)

    zero_bytes = tmp_path / "zero_bytes.flac"
    zero_bytes.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match=r"zero_bytes\.flac"):
        load_audio(zero_bytes)

    whole = tmp_path / "whole.wav"
    sf.write(str(whole), make_clip(SR), SR, subtype="PCM_16")
    truncated = tmp_path / "half.wav"
    truncated.write_bytes(whole.read_bytes()[: 44 + SR])  # header + half of the 16-bit samples
    with pytest.raises(AudioDecodeError, match=r"half\.wav.*truncated"):
        load_audio(truncated)
    assert len(load_audio(whole)) == SR

    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.wav")
    assert issubclass(AudioDecodeError, ValueError)
