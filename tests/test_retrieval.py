"""The official retrieval metrics (hand-computed cases, ties, NaN) against pandas, and the scores they rank."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from psm.evaluation import cosine_scores, csd_scores, fuse_query, retrieval_metrics, retrieval_ranks
from psm.evaluation.retrieval import diagonal_ranks, metrics_from_ranks
from psm.losses import pcmepp
from psm.models.heads import GaussianEmbedding


def designed_scores(designs: list[tuple[int, int]]) -> np.ndarray:
    """An N×N matrix whose row i has ``greater`` entries above its diagonal and ``equal - 1`` ties with it.

    Diagonal = 0, better = 1, tied = 0, worse = -1; so the pandas rank of the diagonal is
    greater + (equal + 1) / 2, which the tests below write out by hand.
    """
    n = len(designs)
    s = np.full((n, n), -1.0)
    for i, (greater, equal) in enumerate(designs):
        others = [j for j in range(n) if j != i]
        s[i, i] = 0.0
        s[i, others[:greater]] = 1.0
        s[i, others[greater : greater + equal - 1]] = 0.0
    return s


def pandas_reference(scores: np.ndarray, recall_pct: float = 10.0) -> tuple[np.ndarray, float, float]:
    """The official computation, row by row with pandas (what ``geoclap/metrics.py`` does)."""
    n = scores.shape[0]
    ranks = np.array(
        [pd.Series(scores[i]).rank(method="average", ascending=False).iloc[i] for i in range(n)], dtype=float
    )
    k = recall_pct / 100 * n
    return ranks, float(np.mean(ranks < k)), float(pd.Series(ranks).median())


def test_hand_computed_4x4_with_ties():
    s = np.array(
        [
            [0.5, 0.5, 0.9, 0.1],  # one better (0.9), one tie (0.5): 1 + (2 + 1)/2 = 2.5
            [0.2, 0.8, 0.1, 0.0],  # best: 1
            [0.3, 0.3, 0.3, 0.3],  # four-way tie: 0 + (4 + 1)/2 = 2.5
            [0.9, 0.7, 0.8, 0.1],  # worst: 4
        ]
    )
    out = retrieval_metrics(s, return_ranks=True)
    np.testing.assert_array_equal(out["ranks"], [2.5, 1.0, 2.5, 4.0])
    assert out["k"] == pytest.approx(0.4) and out["n"] == 4
    assert out["recall_at_10pct"] == 0.0  # k = 0.4: no 1-based rank is below it
    assert out["median_rank"] == 2.5  # (2.5 + 2.5) / 2
    assert retrieval_metrics(s, recall_pct=50)["recall_at_50pct"] == 0.25  # k = 2: only rank 1 counts
    assert retrieval_metrics(s, recall_pct=75)["recall_at_75pct"] == 0.75  # k = 3: 2.5, 1, 2.5 (strict <)
    # the stable API returns exactly its two keys
    assert set(retrieval_metrics(s)) == {"recall_at_10pct", "median_rank"}


def test_hand_computed_recall_045_median_625():
    # 20 queries, k = 2.0: ranks 1 and 1.5 count (9 of 20 = 0.45); the middle two sorted ranks are 6 and
    # 6.5, so the median is 6.25 (the shape of the reference's confirmed example).
    designs = [(0, 1)] * 8 + [(0, 2), (5, 1), (5, 2)] + [(9, 1)] * 9
    expected = [1.0] * 8 + [1.5, 6.0, 6.5] + [10.0] * 9
    s = designed_scores(designs)
    out = retrieval_metrics(s, return_ranks=True)
    np.testing.assert_array_equal(out["ranks"], expected)
    assert out["recall_at_10pct"] == 0.45
    assert out["median_rank"] == 6.25
    _, recall, median = pandas_reference(s)
    assert (recall, median) == (0.45, 6.25)


def test_n33_uses_the_float_k_3_3():
    # 10 queries at rank 1, 5 at rank 3 (counts: 3 < 3.3), 5 at rank 3.5 (tie: misses), 13 at rank 20.
    designs = [(0, 1)] * 10 + [(2, 1)] * 5 + [(2, 2)] * 5 + [(19, 1)] * 13
    s = designed_scores(designs)
    out = retrieval_metrics(s, return_ranks=True)
    assert out["k"] == 10 / 100 * 33 == 3.3000000000000003
    np.testing.assert_array_equal(out["ranks"], [1.0] * 10 + [3.0] * 5 + [3.5] * 5 + [20.0] * 13)
    assert out["recall_at_10pct"] == 15 / 33  # an integer k = 3 would give 10/33
    assert out["median_rank"] == 3.5  # the 17th of 33 sorted ranks


def test_nan_scores_get_no_rank_and_a_nan_diagonal_is_a_miss():
    nan = math.nan
    s = np.array(
        [
            [0.9, nan, 0.95],  # the NaN takes no part: rank 2
            [0.1, nan, 0.3],  # NaN diagonal: no rank
            [0.2, 0.5, 0.7],  # rank 1
        ]
    )
    out = retrieval_metrics(s, recall_pct=50, return_ranks=True)  # k = 1.5
    np.testing.assert_array_equal(out["ranks"], [2.0, nan, 1.0])
    assert out["recall_at_50pct"] == pytest.approx(1 / 3)  # the NaN row stays in the denominator
    assert out["median_rank"] == 1.5  # median of the ranks that exist
    ranks, recall, median = pandas_reference(s, 50)
    np.testing.assert_array_equal(out["ranks"], ranks)
    assert (out["recall_at_50pct"], out["median_rank"]) == (recall, median)
    all_nan = retrieval_metrics(np.full((2, 2), nan))
    assert all_nan["recall_at_10pct"] == 0.0 and math.isnan(all_nan["median_rank"])


@pytest.mark.parametrize("n", [1, 2, 7, 33, 100, 257])
@pytest.mark.parametrize("kind", ["continuous", "ties", "ties_and_nan"])
def test_equals_the_pandas_reference_on_random_matrices(n, kind):
    rng = np.random.default_rng(n)
    s = rng.normal(size=(n, n))
    if kind != "continuous":
        s = rng.integers(0, 4, size=(n, n)).astype(float)  # many ties, on and off the diagonal
    if kind == "ties_and_nan":
        s[rng.random((n, n)) < 0.1] = np.nan
    ranks, recall, median = pandas_reference(s)
    for scores in (s, torch.from_numpy(s), torch.from_numpy(s).float()):
        out = retrieval_metrics(scores, return_ranks=True, chunk_rows=16)  # several row blocks
        np.testing.assert_array_equal(out["ranks"], ranks)
        assert out["recall_at_10pct"] == recall
        assert out["median_rank"] == median or (math.isnan(median) and math.isnan(out["median_rank"]))


def test_input_checks_and_metrics_from_ranks():
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((0, 0)))
    assert metrics_from_ranks([1.0, 2.0, 3.0, 4.0], recall_pct=50) == {"recall_at_50pct": 0.25, "median_rank": 2.5}
    # a rectangular block with explicit positives (how chunked evaluation ranks)
    block = torch.tensor([[0.1, 0.9, 0.9], [0.3, 0.2, 0.1]])
    assert diagonal_ranks(block, torch.tensor([1, 2])).tolist() == [1.5, 3.0]


def _gaussian(n: int, d: int, seed: int, probabilistic: bool = True) -> GaussianEmbedding:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, d, generator=g) * 3
    logvar = torch.randn(n, d, generator=g) - 3 if probabilistic else None
    return GaussianEmbedding.from_raw(raw, logvar)


def test_csd_scores_equal_minus_the_loss_csd():
    q, g = _gaussian(9, 16, 0), _gaussian(11, 16, 1)
    ours = csd_scores(q.unnormalized_mean, q.logvar, g.unnormalized_mean, g.logvar)
    assert ours.dtype == torch.float64 and ours.shape == (9, 11)
    # μ is re-normalised in float64 from the raw mean
    qm, gm = (torch.nn.functional.normalize(e.unnormalized_mean.double()) for e in (q, g))
    ref = -pcmepp.csd(qm, q.logvar.double(), gm, g.logvar.double())
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    ref_unit = -pcmepp.csd(qm, q.logvar.double(), gm, g.logvar.double(), assume_unit_norm=True)
    torch.testing.assert_close(ours, ref_unit, rtol=0, atol=1e-12)
    # equal, up to float32 rounding of the unit means, to the loss on the model's own unit means
    ref32 = -pcmepp.csd(q.mean, q.logvar, g.mean, g.logvar)
    torch.testing.assert_close(ours.float(), ref32, rtol=1e-6, atol=1e-5)
    # the official formula written out in numpy float64
    qm, gm = qm.numpy(), gm.numpy()
    off = -(
        2 - 2 * qm @ gm.T + np.exp(q.logvar.double().numpy()).sum(1)[:, None] + np.exp(g.logvar.double().numpy()).sum(1)
    )
    np.testing.assert_allclose(ours.numpy(), off, rtol=0, atol=1e-12)


def test_cosine_scores():
    q, g = _gaussian(5, 8, 2, False), _gaussian(6, 8, 3, False)
    ref = (
        torch.nn.functional.normalize(q.unnormalized_mean.double())
        @ torch.nn.functional.normalize(g.unnormalized_mean.double()).T
    )
    torch.testing.assert_close(cosine_scores(q.unnormalized_mean, g.unnormalized_mean), ref)


def test_fuse_query_adds_raw_means_and_log_variances():
    a, b = _gaussian(4, 8, 4), _gaussian(4, 8, 5)
    f = fuse_query(a, b)
    assert isinstance(f, GaussianEmbedding)
    raw = a.unnormalized_mean + b.unnormalized_mean
    torch.testing.assert_close(f.unnormalized_mean, raw)
    torch.testing.assert_close(f.mean, raw / raw.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(f.logvar, a.logvar + b.logvar)  # variances multiply
    # raw means, not unit means, are summed: differs from l2n(μ̂_a + μ̂_b) when the norms differ
    unit_sum = torch.nn.functional.normalize(a.mean + b.mean)
    assert not torch.allclose(f.mean, unit_sum)
    d = fuse_query(_gaussian(4, 8, 6, False), _gaussian(4, 8, 7, False))
    assert d.logvar is None
    with pytest.raises(ValueError, match="probabilistic and a deterministic"):
        fuse_query(a, _gaussian(4, 8, 7, False))


def test_chunked_ranks_equal_the_full_matrix_and_query_sigma_never_changes_a_ranking():
    q, g = _gaussian(50, 16, 8), _gaussian(50, 16, 9)
    full = retrieval_metrics(
        csd_scores(q.unnormalized_mean, q.logvar, g.unnormalized_mean, g.logvar), return_ranks=True
    )
    chunked = retrieval_ranks(q, g, chunk_rows=7)
    np.testing.assert_array_equal(chunked.numpy(), full["ranks"])
    louder = GaussianEmbedding(q.mean, q.logvar + 2.0, q.unnormalized_mean)
    np.testing.assert_array_equal(retrieval_ranks(louder, g).numpy(), full["ranks"])
    qd, gd = _gaussian(50, 16, 8, False), _gaussian(50, 16, 9, False)
    cos = retrieval_metrics(cosine_scores(qd.unnormalized_mean, gd.unnormalized_mean), return_ranks=True)
    np.testing.assert_array_equal(retrieval_ranks(qd, gd, chunk_rows=13).numpy(), cos["ranks"])


def test_importing_the_metric_is_cheap():
    code = (
        "import sys, psm.evaluation\n"
        "assert 'torch' not in sys.modules, 'package import pulled in torch'\n"
        "from psm.evaluation import retrieval_metrics\n"
        "heavy = [m for m in ('pandas', 'transformers', 'psm.models', 'psm.data') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(retrieval_metrics([[2.0, 1.0], [0.0, 3.0]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'recall_at_10pct': 0.0, 'median_rank': 1.0" in out.stdout


def test_numpy_layouts_and_dtypes_torch_refuses_are_ranked():
    """A reversed view, big-endian data and uint16/uint32 scores crashed (torch.as_tensor refuses them)."""
    s = np.array([[0.2, 0.9, 0.1], [0.5, 0.4, 0.3], [0.6, 0.7, 0.8]])  # diagonal ranks 2, 2, 1
    flipped = s[::-1, ::-1]  # negative strides; diagonal ranks 1, 2, 2
    np.testing.assert_array_equal(retrieval_metrics(flipped, return_ranks=True)["ranks"], [1.0, 2.0, 2.0])
    for variant in (flipped, s.astype(">f8"), (s * 10).astype(np.uint16), (s * 10).astype(np.uint32)):
        assert retrieval_metrics(variant, recall_pct=50) == {"recall_at_50pct": 1 / 3, "median_rank": 2.0}


def test_recall_pct_and_chunk_rows_are_checked():
    # R@0 % or R@NaN % is 0 for any model, and chunk_rows 0 gave a bare range() error.
    scores = np.eye(12)
    for bad in (0.0, -5.0, float("nan"), 101.0):
        with pytest.raises(ValueError, match=r"recall_pct must be a percentage in \(0, 100\]"):
            retrieval_metrics(scores, recall_pct=bad)
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        retrieval_metrics(scores, chunk_rows=0)
    assert retrieval_metrics(scores, recall_pct=100)["recall_at_100pct"] == 1.0


def test_evaluate_cli_refuses_a_bad_recall_pct(capsys):
    from psm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", "nowhere", "--manifest", "m.csv", "--recall-pct", "nan"])
    assert exit_info.value.code == 2
    assert "recall_pct must be a percentage" in capsys.readouterr().err
