"""Tests for psm.losses: CSD, PCME++ (hand cases + an independent NumPy reference), VIB, InfoNCE, combiner."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import psm.losses.pcmepp as pcmepp_module
from psm.losses import (
    DEFAULT_PAIR_WEIGHTS,
    GeoCLAPInfoNCECriterion,
    InfoNCECriterion,
    PCMEPPCriterion,
    TriModalLoss,
    all_gather_with_grad,
    csd,
    infonce_pair_loss,
    pcmepp_pair_loss,
    pcmepp_pair_terms,
    vib_kl,
)

f64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=f64)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def gaussians(n: int, d: int, seed: int, lv_mean: float = -1.0, lv_std: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(n, d, generator=g, dtype=f64), dim=-1)
    lv = lv_mean + lv_std * torch.randn(n, d, generator=g, dtype=f64)
    return mu, lv


# ----------------------------------------------------------------------------------------------
# Independent float64 NumPy reference of the official criterion (naver-ai/pcmepp, as used by PSM).


def np_bce(logits: np.ndarray, target: np.ndarray) -> float:
    # BCE with logits per entry: softplus(ℓ) − t·ℓ, averaged over all entries.
    return float(np.mean(np.logaddexp(0.0, logits) - target * logits))


def np_pseudo(logits: np.ndarray, matched: np.ndarray) -> tuple[np.ndarray, int]:
    rows = np.arange(matched.shape[0])
    gt = np.argmax(matched, axis=1)  # first index on ties
    label = matched[rows, gt]
    sel = logits >= logits[rows, gt][:, None]
    target = matched.copy()
    for i, j in zip(*np.nonzero(sel), strict=True):
        target[i, j] = label[i]
    return target, int(sel.sum()) - matched.shape[0]


def np_kl(mu: np.ndarray, lv: np.ndarray) -> float:
    kl = -0.5 * float(np.mean(1 + lv - mu**2 - np.exp(lv)))
    return 0.0 if kl > 1e4 else kl


def np_pcmepp(mp, lp, mq, lq, a, b, alpha, beta, matched=None) -> dict:
    if matched is None:
        matched = np.eye(len(mp))
    mu_d = ((mp[:, None, :] - mq[None, :, :]) ** 2).sum(-1)
    sig_d = (np.exp(lp)[:, None, :] + np.exp(lq)[None, :, :]).sum(-1)
    logits = -a * (mu_d + sig_d) + b
    loss = 2 * np_bce(logits, matched)
    vib = np_kl(mp, lp) + np_kl(mq, lq) if beta else 0.0
    loss += beta * vib
    n_pp, pp = 0, 0.0
    if alpha:
        # The q→p pass recomputes the distance matrix with swapped inputs.
        mu_d2 = ((mq[:, None, :] - mp[None, :, :]) ** 2).sum(-1)
        sig_d2 = (np.exp(lq)[:, None, :] + np.exp(lp)[None, :, :]).sum(-1)
        logits2 = -a * (mu_d2 + sig_d2) + b
        t1, n1 = np_pseudo(logits, matched)
        t2, n2 = np_pseudo(logits2, matched.T.copy())
        pp = np_bce(logits, t1) + np_bce(logits2, t2)
        n_pp = n1 + n2
        loss += alpha * pp
    return dict(loss=loss, vib=vib, pp=pp, n=n_pp, mu_pdist=mu_d.mean(), sigma_pdist=sig_d.mean())


# ----------------------------------------------------------------------------------------------
# CSD


def test_csd_matches_hand_loop():
    mu_p, lv_p = gaussians(4, 6, seed=0)
    mu_q, lv_q = gaussians(3, 6, seed=1)
    d = csd(mu_p, lv_p, mu_q, lv_q)
    assert d.shape == (4, 3) and d.dtype == f64
    for i in range(4):
        for j in range(3):
            expected = sum((mu_p[i, k] - mu_q[j, k]) ** 2 for k in range(6))
            expected += sum(math.exp(lv_p[i, k]) + math.exp(lv_q[j, k]) for k in range(6))
            assert rel(d[i, j].item(), float(expected)) < 1e-13


def test_csd_unit_norm_form_equals_direct():
    mu_p, lv_p = gaussians(7, 16, seed=2)
    mu_q, lv_q = gaussians(5, 16, seed=3)
    direct = csd(mu_p, lv_p, mu_q, lv_q)
    light = csd(mu_p, lv_p, mu_q, lv_q, assume_unit_norm=True)
    torch.testing.assert_close(light, direct, rtol=0, atol=1e-13)


def test_csd_half_inputs_do_not_overflow():
    """Σσ² over 512 dims at log σ² = 5 is ≈ 76,000: beyond fp16's 65,504, so the CSD is taken in float32."""
    mu_p, _ = gaussians(3, 512, seed=6)
    mu_q, _ = gaussians(2, 512, seed=7)
    lv_p, lv_q = torch.full((3, 512), 5.0, dtype=f64), torch.full((2, 512), 5.0, dtype=f64)
    ref = csd(mu_p, lv_p, mu_q, lv_q)
    for unit in (False, True):
        half = csd(*(t.half() for t in (mu_p, lv_p, mu_q, lv_q)), assume_unit_norm=unit)
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        torch.testing.assert_close(half.double(), ref, rtol=1e-3, atol=0)


def test_csd_is_exactly_symmetric():
    mu_p, lv_p = gaussians(6, 8, seed=4)
    mu_q, lv_q = gaussians(6, 8, seed=5)
    assert torch.equal(csd(mu_p, lv_p, mu_q, lv_q), csd(mu_q, lv_q, mu_p, lv_p).T)


def test_csd_chunked_squared_distance_and_its_gradient(monkeypatch):
    monkeypatch.setattr(pcmepp_module, "_CHUNK_ELEMENTS", 7)  # force many row chunks
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    y = torch.randn(4, 3, dtype=f64, requires_grad=True)
    out = pcmepp_module._SquaredDistance.apply(x, y)
    torch.testing.assert_close(out, ((x[:, None] - y[None]) ** 2).sum(-1), rtol=0, atol=0)
    assert torch.autograd.gradcheck(pcmepp_module._SquaredDistance.apply, (x, y))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(3), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3)), "mu_p must be 2-D"),
        ((torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 3)), r"logvar_p .*\(2, 4\)"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, 3)), "logvar_q"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 5), torch.zeros(2, 5)), r"same embedding dim"),
    ],
)
def test_csd_validates_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        csd(*args)


# ----------------------------------------------------------------------------------------------
# PCME++ hand-derived 2×2 cases (arithmetic written per entry, independent of the implementation)


def sp(x: float) -> float:
    """softplus."""
    return math.log1p(math.exp(x))


def bce(x: float, t: float) -> float:
    """BCE with logits of one entry: −[t·log σ(x) + (1 − t)·log σ(−x)] = softplus(x) − t·x."""
    return sp(x) - t * x


def test_pcmepp_hand_case_closer_negative():
    # D = 2, μ_p = [e1, e2], μ_q = [(0.6, 0.8), e2]; σ² per dim: p rows 0.1 / 0.05, q rows 0.05 / 0.3.
    mu_p, mu_q = t64([[1, 0], [0, 1]]), t64([[0.6, 0.8], [0, 1]])
    lv_p = t64([[math.log(0.1)] * 2, [math.log(0.05)] * 2])
    lv_q = t64([[math.log(0.05)] * 2, [math.log(0.3)] * 2])
    # ‖Δμ‖² = [[0.8, 2], [0.4, 0]]; Σσ²_p = [0.2, 0.1], Σσ²_q = [0.1, 0.6]
    # d = [[0.8 + 0.3, 2 + 0.8], [0.4 + 0.2, 0 + 0.7]] = [[1.1, 2.8], [0.6, 0.7]]
    # a = b = 5: ℓ = 5 − 5d = [[-0.5, -9], [2, 1.5]]
    l00, l01, l10, l11 = -0.5, -9.0, 2.0, 1.5
    match = 2 * (bce(l00, 1) + bce(l01, 0) + bce(l10, 0) + bce(l11, 1)) / 4
    # p→q: row 1's negative q0 (ℓ = 2) beats its ground truth (ℓ = 1.5) → target 1; row 0 has none.
    pp_pq = (bce(l00, 1) + bce(l01, 0) + bce(l10, 1) + bce(l11, 1)) / 4
    # q→p on ℓᵀ = [[-0.5, 2], [-9, 1.5]]: q0's ground truth p0 (-0.5) is beaten by p1 (2); q1 has none.
    pp_qp = (bce(l00, 1) + bce(l10, 1) + bce(l01, 0) + bce(l11, 1)) / 4
    # KL per element: −½(1 + lv − μ² − σ²)
    kl_p = -0.5 * (
        (1 + math.log(0.1) - 1 - 0.1)
        + (1 + math.log(0.1) - 0 - 0.1)
        + (1 + math.log(0.05) - 0 - 0.05)
        + (1 + math.log(0.05) - 1 - 0.05)
    )
    kl_p /= 4
    kl_q = -0.5 * (
        (1 + math.log(0.05) - 0.36 - 0.05)
        + (1 + math.log(0.05) - 0.64 - 0.05)
        + (1 + math.log(0.3) - 0 - 0.3)
        + (1 + math.log(0.3) - 1 - 0.3)
    )
    kl_q /= 4
    expected = match + 1e-4 * (kl_p + kl_q) + 0.1 * (pp_pq + pp_qp)

    terms = pcmepp_pair_terms(mu_p, lv_p, mu_q, lv_q, 5.0, 5.0, alpha=0.1, beta=1e-4)
    assert terms.loss.dtype == f64
    assert rel(terms.loss.item(), expected) < 1e-12
    assert rel(terms.match.item(), match) < 1e-12
    assert rel(terms.pseudo_positive.item(), pp_pq + pp_qp) < 1e-12
    assert rel(terms.vib.item(), kl_p + kl_q) < 1e-12
    assert terms.n_pseudo_gts.item() == 2
    assert rel(terms.mu_pdist.item(), (0.8 + 2 + 0.4 + 0) / 4) < 1e-12
    assert rel(terms.sigma_pdist.item(), (0.3 + 0.8 + 0.2 + 0.7) / 4) < 1e-12


# The reference note quotes two 2×2 values confirmed against the official criterion without their
# inputs. A brute-force grid (D = 2 unit vectors from {e1, e2, (.6, .8), (.8, .6), ...}, constant
# log σ² from {0, ln .5, ln .25, ln .1, 1, ln 2, −inf}, a, b ∈ {.5, 1, 2, 5, 10}, β ∈ {0, 1e-4, …, 1},
# α = 0.1) found natural inputs for both: σ² = 1 (log σ² = 0), a = 1, b = 5, so ℓ = 1 − ‖Δμ‖² ∈ {±1}.


def test_pcmepp_official_example_perfect_separation():
    # μ_p = μ_q = [e1, e2]: d = [[4, 6], [6, 4]], ℓ = [[1, -1], [-1, 1]]; β = 0.01 (found by the grid).
    mu = t64([[1, 0], [0, 1]])
    lv = torch.zeros(2, 2, dtype=f64)
    match = 2 * (bce(1, 1) + bce(-1, 0) + bce(-1, 0) + bce(1, 1)) / 4
    pp = 2 * (bce(1, 1) + bce(-1, 0) + bce(-1, 0) + bce(1, 1)) / 4  # no pseudo-positives: T = I
    kl = -0.5 * ((1 + 0 - 1 - 1) + (1 + 0 - 0 - 1)) / 2  # = 0.25 per modality
    expected = match + 0.01 * 2 * kl + 0.1 * pp
    assert rel(expected, 0.6941757125400903) < 1e-15
    terms = pcmepp_pair_terms(mu, lv, mu, lv, 1.0, 5.0, alpha=0.1, beta=0.01)
    assert rel(terms.loss.item(), 0.6941757125400903) < 1e-12
    assert terms.n_pseudo_gts.item() == 0


def test_pcmepp_official_example_with_ties():
    # μ_p = [e1, e1], μ_q = [e2, e1]: ℓ = [[-1, 1], [-1, 1]] with exact ties; β = 0.
    mu_p, mu_q = t64([[1, 0], [1, 0]]), t64([[0, 1], [1, 0]])
    lv = torch.zeros(2, 2, dtype=f64)
    match = 2 * (bce(-1, 1) + bce(1, 0) + bce(-1, 0) + bce(1, 1)) / 4
    # p→q: row 0 (gt ℓ = -1) selects both columns → T row 0 = [1, 1]; row 1 (gt ℓ = 1) only itself.
    pp_pq = (bce(-1, 1) + bce(1, 1) + bce(-1, 0) + bce(1, 1)) / 4
    # q→p on ℓᵀ = [[-1, -1], [1, 1]]: both rows tie with their ground truth → all targets 1.
    pp_qp = (bce(-1, 1) + bce(-1, 1) + bce(1, 1) + bce(1, 1)) / 4
    expected = match + 0.1 * (pp_pq + pp_qp)
    assert rel(expected, 1.7641757125400903) < 1e-15
    terms = pcmepp_pair_terms(mu_p, lv, mu_q, lv, 1.0, 5.0, alpha=0.1, beta=0.0)
    assert rel(terms.loss.item(), 1.7641757125400903) < 1e-12
    assert terms.n_pseudo_gts.item() == 3  # 1 (p→q) + 2 (q→p)


# ----------------------------------------------------------------------------------------------
# PCME++ against the NumPy reference


def _check_against_reference(mu_p, lv_p, mu_q, lv_q, a, b, alpha, beta, matched=None):
    arrays = [t.numpy() for t in (mu_p, lv_p, mu_q, lv_q)]
    ref = np_pcmepp(*arrays, a, b, alpha, beta, None if matched is None else matched.numpy())
    terms = pcmepp_pair_terms(mu_p, lv_p, mu_q, lv_q, a, b, alpha, beta, matched)
    assert rel(terms.loss.item(), ref["loss"]) < 1e-12
    assert terms.n_pseudo_gts.item() == ref["n"]
    assert rel(terms.mu_pdist.item(), ref["mu_pdist"]) < 1e-12
    assert rel(terms.sigma_pdist.item(), ref["sigma_pdist"]) < 1e-12
    if ref["pp"]:
        assert rel(terms.pseudo_positive.item(), ref["pp"]) < 1e-12
    return terms


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [8, 33])
def test_pcmepp_matches_reference_square(seed, n):
    d = 16
    mu_p, lv_p = gaussians(n, d, seed)
    # Correlated positives plus small σ: many negatives tie or beat their ground truth.
    g = torch.Generator().manual_seed(100 + seed)
    mu_q = F.normalize(mu_p + 0.7 * torch.randn(n, d, generator=g, dtype=f64), dim=-1)
    lv_q = -4 + 0.5 * torch.randn(n, d, generator=g, dtype=f64)
    rng = np.random.default_rng(seed)
    a, b = float(rng.uniform(1, 10)), float(rng.uniform(-5, 10))
    total_pp = 0
    for alpha, beta in [(0.1, 1e-4), (0.0, 1e-4), (0.1, 0.0), (float(rng.uniform(0, 1)), float(rng.uniform(0, 1)))]:
        terms = _check_against_reference(mu_p, lv_p, mu_q, lv_q, a, b, alpha, beta)
        total_pp += terms.n_pseudo_gts.item()
    assert total_pp > 0  # the pseudo-positive path was exercised


@pytest.mark.parametrize("seed", range(5))
def test_pcmepp_matches_reference_label_smoothed_and_rectangular(seed):
    n, m, d, eps = 5, 15, 12, 1e-4
    mu_p, lv_p = gaussians(n, d, seed, lv_mean=-2)
    mu_q, lv_q = gaussians(m, d, seed + 50, lv_mean=-2)
    mu_q[:n] = F.normalize(mu_p + 0.5 * torch.randn(n, d, dtype=f64, generator=torch.Generator().manual_seed(seed)))
    # naver-ai/pcmepp square smoothing (1 − ε)·I + ε·(1 − I) ...
    smooth = (1 - eps) * torch.eye(n, dtype=f64) + eps * (1 - torch.eye(n, dtype=f64))
    _check_against_reference(mu_p, lv_p, mu_q[:n], lv_q[:n], 5.0, 5.0, 0.1, 1e-4, smooth)
    # ... and PSM's multi-GPU target [I | ε·1 | ε·1] (N ≠ M; other-rank rows have ground truth col 0).
    wide = torch.cat([torch.eye(n, dtype=f64), torch.full((n, m - n), eps, dtype=f64)], dim=1)
    _check_against_reference(mu_p, lv_p, mu_q, lv_q, 5.0, 5.0, 0.1, 1e-4, wide)
    _check_against_reference(mu_q, lv_q, mu_p, lv_p, 3.0, 2.0, 0.1, 1e-4, wide.T.contiguous())


def test_pcmepp_float64_end_to_end_and_default_matched():
    mu_p, lv_p = gaussians(6, 8, seed=7)
    mu_q, lv_q = gaussians(6, 8, seed=8)
    crit = PCMEPPCriterion()  # float32 parameters, float64 inputs
    loss, logs = crit(mu_p, lv_p, mu_q, lv_q)
    assert loss.dtype == f64
    explicit = pcmepp_pair_loss(mu_p, lv_p, mu_q, lv_q, 5.0, 5.0, matched=torch.eye(6, dtype=f64))
    assert rel(loss.item(), explicit.item()) < 1e-15
    assert set(logs) >= {"loss", "match", "pseudo_positive", "vib", "n_pseudo_gts", "mu_pdist", "sigma_pdist"}
    assert logs["shift"].item() == 5.0 and logs["negative_scale"].item() == 5.0


def test_pcmepp_half_inputs_are_lifted_to_float32():
    mu_p, lv_p = gaussians(4, 8, seed=9)
    mu_q, lv_q = gaussians(4, 8, seed=10)
    low = pcmepp_pair_loss(*(t.to(torch.bfloat16) for t in (mu_p, lv_p, mu_q, lv_q)), 5.0, 5.0)
    assert low.dtype == torch.float32
    assert rel(low.item(), pcmepp_pair_loss(mu_p, lv_p, mu_q, lv_q, 5.0, 5.0).item()) < 0.05


def test_pcmepp_matched_validation():
    mu_p, lv_p = gaussians(3, 4, seed=0)
    mu_q, lv_q = gaussians(5, 4, seed=1)
    with pytest.raises(ValueError, match="matched is required"):
        pcmepp_pair_loss(mu_p, lv_p, mu_q, lv_q, 5.0, 5.0)
    with pytest.raises(ValueError, match=r"matched must have shape"):
        pcmepp_pair_loss(mu_p, lv_p, mu_q, lv_q, 5.0, 5.0, matched=torch.eye(3, dtype=f64))


def test_criterion_parameters_match_official_names():
    crit = PCMEPPCriterion()
    params = dict(crit.named_parameters())
    assert set(params) == {"shift", "negative_scale"}
    for p in params.values():
        assert p.shape == (1,) and p.item() == 5.0
    assert set(TriModalLoss("pcmepp").state_dict()) == {"criterion.shift", "criterion.negative_scale"}


# ----------------------------------------------------------------------------------------------
# VIB


def test_vib_kl_formula():
    mu, lv = gaussians(4, 6, seed=11)
    expected = -0.5 * np.mean(1 + lv.numpy() - mu.numpy() ** 2 - np.exp(lv.numpy()))
    assert rel(vib_kl(mu, lv).item(), float(expected)) < 1e-13


def test_vib_guard_drops_exploding_kl_with_warning():
    mu, _ = gaussians(4, 6, seed=12)
    lv = torch.full((4, 6), 20.0, dtype=f64, requires_grad=True)  # σ² = e^20: KL ≈ 2.4e8
    with pytest.warns(RuntimeWarning, match="VIB"):
        kl = vib_kl(mu, lv)
    assert kl.item() == 0.0 and not kl.requires_grad
    ok_mu, ok_lv = gaussians(4, 6, seed=13)
    with pytest.warns(RuntimeWarning, match="VIB"):
        terms = pcmepp_pair_terms(mu, lv, ok_mu, ok_lv, 5.0, 5.0, alpha=0.1, beta=1e-4)
    assert rel(terms.vib.item(), vib_kl(ok_mu, ok_lv).item()) < 1e-15


# ----------------------------------------------------------------------------------------------
# InfoNCE


def test_infonce_matches_hand_formula():
    emb_p, _ = gaussians(5, 8, seed=14)
    emb_q, _ = gaussians(5, 8, seed=15)
    scale = 3.7
    s = scale * emb_p.numpy() @ emb_q.numpy().T
    rows = np.mean([np.log(np.exp(s[i]).sum()) - s[i, i] for i in range(5)])
    cols = np.mean([np.log(np.exp(s[:, j]).sum()) - s[j, j] for j in range(5)])
    assert rel(infonce_pair_loss(emb_p, emb_q, scale).item(), 0.5 * (rows + cols)) < 1e-12
    one_way = infonce_pair_loss(emb_p, emb_q, scale, symmetric=False)
    assert rel(one_way.item(), float(rows)) < 1e-12


def test_psm_tau_is_a_raw_multiplier():
    emb_p, _ = gaussians(6, 8, seed=16)
    emb_q, _ = gaussians(6, 8, seed=17)
    loss, logs = InfoNCECriterion()(emb_p, emb_q)
    cos = emb_p @ emb_q.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(cos, labels) + F.cross_entropy(cos.T, labels)) / 2
    assert rel(loss.item(), expected.item()) < 1e-12
    assert logs["tau"].item() == 1.0


def test_geoclap_scale_init_exp_and_clamp():
    crit = GeoCLAPInfoNCECriterion()
    assert crit.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    emb_p, _ = gaussians(4, 8, seed=18)
    emb_q, _ = gaussians(4, 8, seed=19)
    expected = infonce_pair_loss(emb_p, emb_q, 1 / 0.07)
    assert rel(crit(emb_p, emb_q)[0].item(), expected.item()) < 1e-6  # float32 parameter
    with torch.no_grad():
        crit.logit_scale.fill_(10.0)
    crit.clamp_()
    assert crit.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        crit.logit_scale.fill_(-3.0)
    crit.clamp_()
    assert crit.logit_scale.item() == 1.0


# ----------------------------------------------------------------------------------------------
# Gradients


def test_gradients_reach_parameters_and_inputs():
    g = torch.Generator().manual_seed(20)
    raw = {m: torch.randn(6, 8, dtype=f64, generator=g, requires_grad=True) for m in ("image", "audio", "text")}
    lvs = {m: (-2 + torch.randn(6, 8, dtype=f64, generator=g)).requires_grad_() for m in raw}
    for kind in ("pcmepp", "infonce", "geoclap_infonce"):
        emb = {m: {"mean": F.normalize(raw[m], dim=-1), "logvar": lvs[m]} for m in raw}
        combiner = TriModalLoss(kind).double()
        loss, _ = combiner(emb)
        loss.backward()
        for name, p in combiner.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (kind, name)
        for t in [*raw.values(), *(lvs.values() if kind == "pcmepp" else [])]:
            assert t.grad is not None and t.grad.abs().sum() > 0, kind
            t.grad = None


# ----------------------------------------------------------------------------------------------
# TriModalLoss


def tri_inputs(n: int = 6, d: int = 8, seed: int = 21) -> dict:
    out = {}
    for k, m in enumerate(("image", "audio", "text")):
        mu, lv = gaussians(n, d, seed + k, lv_mean=-3)
        out[m] = {"mean": mu, "logvar": lv}
    return out


def test_trimodal_default_weights_and_shared_criterion():
    emb = tri_inputs()
    combiner = TriModalLoss("pcmepp").double()
    total, logs = combiner(emb)

    def pair(p, q):
        return pcmepp_pair_loss(emb[p]["mean"], emb[p]["logvar"], emb[q]["mean"], emb[q]["logvar"], 5.0, 5.0)

    l_ia, l_it, l_at = pair("image", "audio"), pair("image", "text"), pair("audio", "text")
    assert rel(total.item(), (0.5 * l_ia + 0.5 * (l_it + l_at)).item()) < 1e-13
    assert rel(logs["image_audio/loss"].item(), l_ia.item()) < 1e-13
    assert {"image_audio/mu_pdist", "audio_text/sigma_pdist", "image_text/n_pseudo_gts", "loss"} <= set(logs)
    assert DEFAULT_PAIR_WEIGHTS == {"image_audio": 0.5, "image_text": 0.5, "audio_text": 0.5}

    equal = TriModalLoss("pcmepp", pair_weights=dict.fromkeys(DEFAULT_PAIR_WEIGHTS, 1 / 3)).double()
    assert rel(equal(emb)[0].item(), ((l_ia + l_it + l_at) / 3).item()) < 1e-13


def test_trimodal_missing_text_is_image_audio_alone():
    emb = tri_inputs()
    combiner = TriModalLoss("pcmepp").double()
    full_logs = combiner(emb)[1]
    for variant in ({"image": emb["image"], "audio": emb["audio"]}, {**emb, "text": None}):
        total, logs = combiner(variant)
        assert rel(total.item(), full_logs["image_audio/loss"].item()) < 1e-15
        assert not any(k.startswith(("image_text", "audio_text")) for k in logs)


def test_trimodal_infonce_kinds():
    emb = tri_inputs()
    det = {m: {"mean": e["mean"], "logvar": None} for m, e in emb.items()}
    total, _ = TriModalLoss("infonce").double()(det)
    pairs = [("image", "audio"), ("image", "text"), ("audio", "text")]
    expected = sum(0.5 * infonce_pair_loss(emb[p]["mean"], emb[q]["mean"], 1.0) for p, q in pairs)
    assert rel(total.item(), expected.item()) < 1e-13

    geo = TriModalLoss("geoclap_infonce").double()
    assert set(geo.criteria) == set(DEFAULT_PAIR_WEIGHTS)
    with torch.no_grad():
        geo.criteria["image_text"].logit_scale.fill_(9.0)
    geo.clamp_()
    assert geo.criteria["image_text"].logit_scale.item() == pytest.approx(math.log(100))
    total, logs = geo(det)
    # exp of the (float32-initialised) log-scales: ≈ 1/0.07, 100, 1/0.07
    scales = {name: crit.logit_scale.detach().exp() for name, crit in geo.criteria.items()}
    assert scales["image_text"].item() == pytest.approx(100.0)
    expected = sum(0.5 * infonce_pair_loss(emb[p]["mean"], emb[q]["mean"], scales[f"{p}_{q}"]) for p, q in pairs)
    assert rel(total.item(), expected.item()) < 1e-12
    assert "image_text/logit_scale" in logs


def test_trimodal_validation():
    with pytest.raises(ValueError, match="kind"):
        TriModalLoss("triplet")
    with pytest.raises(ValueError, match="distributed"):
        TriModalLoss("pcmepp", distributed="ring")
    with pytest.raises(ValueError, match="pair_weights"):
        TriModalLoss("pcmepp", pair_weights={"image_audio": 1.0})
    emb = tri_inputs()
    with pytest.raises(ValueError, match="logvar"):
        TriModalLoss("pcmepp")({**emb, "text": {"mean": emb["text"]["mean"], "logvar": None}})
    with pytest.raises(ValueError, match="two modalities"):
        TriModalLoss("pcmepp")({"image": emb["image"]})
    with pytest.raises(ValueError, match="unknown modality"):
        TriModalLoss("pcmepp")({**emb, "video": emb["text"]})


@pytest.mark.parametrize("kind", ["pcmepp", "infonce", "geoclap_infonce"])
@pytest.mark.parametrize("mode", ["global", "official"])
def test_trimodal_distributed_modes_without_process_group_equal_single_device(kind, mode):
    emb = tri_inputs()
    single = TriModalLoss(kind).double()(emb)[0]
    assert rel(TriModalLoss(kind, distributed=mode).double()(emb)[0].item(), single.item()) < 1e-13
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


def test_calibrated_shift_starts_pairs_at_the_base_rate():
    from psm.losses import calibrated_shift

    # Random unit means and the heads' initial log σ² = −4: the typical pair starts at the log-odds of 1/(B−1).
    g = torch.Generator().manual_seed(0)
    n, d, a = 64, 32, 5.0
    mu_p = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    mu_q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    logvar = torch.full((n, d), -4.0)
    b = calibrated_shift(a, d, -4.0, n)
    logits = -a * csd(mu_p, logvar, mu_q, logvar) + b
    assert abs(float(logits.median()) + math.log(n - 1)) < 0.5
    # the official shift of 5 starts the typical pair orders of magnitude below the base rate
    assert float((logits - b + 5.0).median()) < -math.log(n - 1) - 5
    with pytest.raises(ValueError, match="batch of at least 2"):
        calibrated_shift(a, d, -4.0, 1)
