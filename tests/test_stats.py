"""mechreward.stats against scipy and brute force on synthetic data with known answers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from scipy import stats as sps

from mechreward import stats as S
from mechreward.errors import DataError


def correlated(n, rho, seed):
    """Bivariate normal pair with Pearson correlation rho; Spearman = 6/pi asin(rho/2)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=n)
    return x, y


def true_spearman(rho):
    return 6 / np.pi * np.arcsin(rho / 2)


# ----------------------------------------------------------------------------- cohens_d


def test_cohens_d_matches_hand_computation_with_ddof1_unweighted_pooling():
    pos = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [6.0, 10.0]])  # [4, 2]
    neg = np.array([[0.0, 10.0], [1.0, 10.0], [-1.0, 10.0]])  # [3, 2]
    # column 0 by hand: mean_c = 3, var_c = (4+1+0+9)/3 = 14/3; mean_w = 0, var_w = 1
    expected0 = (3.0 - 0.0) / np.sqrt((14 / 3 + 1.0) / 2)
    d = S.cohens_d(pos, neg)
    assert d.shape == (2,)
    assert d[0] == pytest.approx(expected0, rel=1e-12)
    assert d[1] == 0.0  # zero variance → 0, not NaN
    assert S.cohens_d(neg, pos)[0] == pytest.approx(-expected0)


def test_cohens_d_vectorised_equals_per_column_loop():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.3, 1, size=(30, 50)), rng.normal(0, 2, size=(20, 50))
    loop = [(pos[:, j].mean() - neg[:, j].mean())
            / np.sqrt((pos[:, j].var(ddof=1) + neg[:, j].var(ddof=1)) / 2) for j in range(50)]
    np.testing.assert_allclose(S.cohens_d(pos, neg), loop, rtol=1e-12)


def test_cohens_d_never_firing_feature_is_zero_and_nan_input_raises():
    pos, neg = np.zeros((5, 3)), np.zeros((4, 3))
    pos[:, 0] = [1, 2, 3, 4, 5]
    d = S.cohens_d(pos, neg)
    assert np.all(np.isfinite(d)) and d[1] == 0 and d[2] == 0 and d[0] > 0
    pos[0, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        S.cohens_d(pos, neg)
    with pytest.raises(DataError, match="at least 2 rows"):
        S.cohens_d(np.ones((1, 3)), neg)


# ----------------------------------------------------------------------------- auroc


def brute_auroc(s, lab):
    pos, neg = s[lab == 1], s[lab == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auroc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, size=80).astype(float)  # many ties
    lab = (rng.random(80) < 0.4).astype(int)
    assert S.auroc(s, lab) == pytest.approx(brute_auroc(s, lab), abs=1e-12)
    assert S.auroc(np.array([1.0, 2, 3, 4]), [0, 0, 1, 1]) == 1.0
    assert S.auroc(np.array([1.0, 1, 1, 1]), [0, 0, 1, 1]) == 0.5


def test_auroc_vectorised_over_feature_columns():
    rng = np.random.default_rng(3)
    lab = np.r_[np.ones(25), np.zeros(35)].astype(bool)
    s = rng.normal(size=(60, 7)) + lab[:, None] * np.linspace(0, 2, 7)
    s[:, 3] = np.round(s[:, 3])  # ties
    got = S.auroc(s, lab)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, [brute_auroc(s[:, j], lab) for j in range(7)], atol=1e-12)
    assert got[-1] > got[0]


def test_auroc_rejects_one_class_labels_naming_the_class():
    with pytest.raises(DataError, match=r"labels are all 1 \(n=40\)"):
        S.auroc(np.arange(40.0), np.ones(40))
    with pytest.raises(DataError, match="0/1"):
        S.auroc(np.arange(4.0), [0, 1, 2, 1])


# ----------------------------------------------------------------------------- MWU, BH


def test_mann_whitney_p_matches_scipy_per_feature_and_constant_feature_is_one():
    rng = np.random.default_rng(4)
    pos, neg = rng.normal(0.5, 1, size=(40, 5)), rng.normal(0, 1, size=(30, 5))
    pos[:, 4] = 0.0
    neg[:, 4] = 0.0
    p = S.mann_whitney_p(pos, neg)
    for j in range(4):
        assert p[j] == pytest.approx(sps.mannwhitneyu(pos[:, j], neg[:, j], alternative="two-sided").pvalue)
    assert p[4] == 1.0


def test_benjamini_hochberg_equals_scipy_false_discovery_control():
    rng = np.random.default_rng(5)
    p = np.r_[rng.uniform(size=200), rng.uniform(0, 1e-3, size=20)]
    np.testing.assert_allclose(S.benjamini_hochberg(p), sps.false_discovery_control(p, method="bh"))
    # brute force definition: q_(i) = min_{j>=i} p_(j) m / j
    m, order = len(p), np.argsort(p)
    raw = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(raw[::-1])[::-1].clip(max=1)
    np.testing.assert_allclose(S.benjamini_hochberg(p)[order], q, rtol=1e-12)
    with pytest.raises(DataError):
        S.benjamini_hochberg([0.1, 1.5])


# ----------------------------------------------------------------------------- correlations


def test_spearman_and_pearson_equal_scipy():
    x, y = correlated(200, 0.6, seed=6)
    rho, p = S.spearman(x, y)
    ref = sps.spearmanr(x, y)
    assert (rho, p) == pytest.approx((ref.statistic, ref.pvalue))
    r, pp = S.pearson(x, y)
    ref = sps.pearsonr(x, y)
    assert (r, pp) == pytest.approx((ref.statistic, ref.pvalue))


@pytest.mark.parametrize(
    "x, y, msg",
    [
        (np.ones(10), np.arange(10.0), "x is constant"),
        (np.arange(10.0), np.full(10, 2.0), "y is constant"),
        (np.arange(2.0), np.arange(2.0), "n=2"),
        (np.r_[np.arange(9.0), np.nan], np.arange(10.0), "NaN"),
        (np.arange(9.0), np.arange(10.0), "differ in length"),
    ],
)
def test_correlations_reject_degenerate_input(x, y, msg):
    for fn in (S.spearman, S.pearson):
        with pytest.raises(DataError, match=msg):
            fn(x, y)


def test_partial_spearman_removes_correlation_induced_through_covariate():
    rng = np.random.default_rng(7)
    z = rng.normal(size=2000)
    x, y = z + 0.5 * rng.normal(size=2000), z + 0.5 * rng.normal(size=2000)
    assert S.spearman(x, y).stat > 0.7
    r, p = S.partial_spearman(x, y, z)
    assert abs(r) < 0.06 and p > 0.01


def test_partial_spearman_equals_textbook_formula_and_keeps_a_direct_effect():
    rng = np.random.default_rng(8)
    z = rng.normal(size=300)
    x = z + rng.normal(size=300)
    y = 0.5 * x + z + rng.normal(size=300)  # a direct x → y effect beyond z
    rxy, rxz, ryz = (sps.spearmanr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    expected = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    r, p = S.partial_spearman(x, y, z)
    assert r == pytest.approx(expected, rel=1e-10)
    t = r * np.sqrt((300 - 3) / (1 - r * r))
    assert p == pytest.approx(2 * sps.t.sf(abs(t), 297), rel=1e-10)
    assert r > 0.2 and p < 1e-4


# ----------------------------------------------------------------------------- resampling


def test_bootstrap_ci_contains_true_rho_and_narrows_with_more_data():
    rho = 0.5
    x, y = correlated(2000, rho, seed=9)
    big = S.bootstrap_ci(S.spearman, x, y, n_boot=400, seed=0)
    assert big.low < true_spearman(rho) < big.high
    assert big.estimate == pytest.approx(sps.spearmanr(x, y).statistic)
    small = S.bootstrap_ci(S.spearman, x[:100], y[:100], n_boot=400, seed=0)
    assert (small.high - small.low) > 2.5 * (big.high - big.low)  # width ~ 1/sqrt(n): ratio ~4.5


def test_bootstrap_ci_resamples_whole_clusters():
    # 30 questions x 5 identical rollouts: the effective sample is 30, not 150.
    x, y = correlated(30, 0.4, seed=10)
    groups = np.repeat(np.arange(30), 5)
    xr, yr = np.repeat(x, 5), np.repeat(y, 5)
    clustered = S.bootstrap_ci(S.pearson, xr, yr, groups=groups, n_boot=500, seed=1)
    naive = S.bootstrap_ci(S.pearson, xr, yr, n_boot=500, seed=1)
    per_question = S.bootstrap_ci(S.pearson, x, y, n_boot=500, seed=1)
    width = lambda c: c.high - c.low  # noqa: E731
    assert width(clustered) > 1.7 * width(naive)
    assert width(clustered) == pytest.approx(width(per_question), rel=0.25)
    # every drawn cluster comes whole: resampled rows always number a multiple of 5
    sizes = []
    S.bootstrap_ci(lambda a: sizes.append(len(a)) or 0.0, xr, groups=groups, n_boot=20, seed=0)
    assert all(s % 5 == 0 for s in sizes) and set(sizes) == {150}


def test_bootstrap_ci_skips_one_class_resamples_and_counts_them():
    lab = np.r_[np.ones(3), np.zeros(7)]
    score = np.arange(10.0)
    ci = S.bootstrap_ci(S.auroc, score, lab, n_boot=300, seed=0)
    assert 0 < ci.n_valid < 300  # some resamples had no positive
    assert ci.estimate == 0.0 and ci.low == 0.0


def test_paired_bootstrap_ci_of_mean_difference():
    rng = np.random.default_rng(11)
    a = rng.normal(0.6, 0.05, size=200)
    b = a - 0.03 + rng.normal(0, 0.01, size=200)  # true mean difference 0.03
    ci = S.paired_bootstrap_ci(a, b, n_boot=2000, seed=0)
    assert ci.estimate == pytest.approx(np.mean(a - b))
    assert ci.low < 0.03 < ci.high and ci.low > 0.025
    # pairing matters: unpaired noise of a/b (sd 0.05) would give a ~5x wider interval
    assert ci.high - ci.low < 0.01
    with pytest.raises(DataError, match="paired"):
        S.paired_bootstrap_ci([1.0, 2.0, 3.0], [1.0, 2.0])


def test_permutation_p_small_for_correlated_data_and_matches_scipy():
    x, y = correlated(60, 0.6, seed=12)
    p = S.permutation_p(x, y, n_perm=2000, seed=0)
    assert p == pytest.approx(1 / 2001 * 2)  # nothing as extreme: 2 * (0 + 1) / (n + 1)
    x, y = correlated(40, 0.25, seed=13)
    p = S.permutation_p(x, y, n_perm=4000, seed=0)
    ref = sps.permutation_test(
        (x, y), lambda a, b: sps.spearmanr(a, b).statistic, permutation_type="pairings",
        n_resamples=4000, rng=np.random.default_rng(0),
    ).pvalue
    assert abs(p - ref) < 0.03  # Monte Carlo error of two 4000-draw estimates


def test_permutation_p_roughly_uniform_for_independent_data():
    ps = [S.permutation_p(*np.random.default_rng(s).normal(size=(2, 30)), n_perm=300, seed=s)
          for s in range(100)]
    ps = np.array(ps)
    assert ps.min() >= 2 / 301
    assert 0.35 < np.mean(ps) < 0.65
    assert 0.02 <= np.mean(ps < 0.1) <= 0.2


def test_permutation_fast_path_equals_generic_statistic():
    x, y = correlated(25, 0.3, seed=14)
    fast = S.permutation_p(x, y, S.spearman, n_perm=500, seed=3)
    generic = S.permutation_p(x, y, lambda a, b: sps.spearmanr(a, b).statistic, n_perm=500, seed=3)
    assert fast == generic


# ----------------------------------------------------------------------------- summary


def test_correlation_summary_fields_agree_with_the_single_functions():
    rng = np.random.default_rng(15)
    label = (rng.random(100) < 0.43).astype(int)
    score = label * 1.0 + rng.normal(size=100)
    s = S.correlation_summary(score, label, n_boot=300, n_perm=500, seed=0)
    ref = sps.spearmanr(score, label)
    assert (s.rho, s.p) == pytest.approx((ref.statistic, ref.pvalue))
    assert s.auroc == pytest.approx(brute_auroc(score, label))
    assert s.pearson == pytest.approx(sps.pearsonr(score, label).statistic)
    assert s.ci95[0] < s.rho < s.ci95[1]
    assert s.permutation_p < 0.01 and s.n == 100 and s.n_pos == int(label.sum())
    d = s.to_dict()
    assert set(d) >= {"rho", "p", "ci95", "permutation_p", "auroc", "pearson", "n", "n_pos"}


def test_correlation_summary_rejects_one_class_labels():
    with pytest.raises(DataError, match=r"labels are all 0 \(n=40\)"):
        S.correlation_summary(np.arange(40.0), np.zeros(40))


# ----------------------------------------------------------------------------- within questions

def _questions(seed, G=120, m=4, within=0.0, across=0.0):
    """G questions x m rollouts; P(correct) = sigmoid(difficulty_q + within * x_i).

    Returns the within-question signal x (independent of the question), the question's easiness
    plus noise that does not depend on the rollout's outcome (`across` scales it), labels, groups.
    """
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), m)
    easy = rng.normal(scale=1.5, size=G)
    x = rng.normal(size=G * m)
    y = (rng.random(G * m) < 1 / (1 + np.exp(-(easy[g] + within * x)))).astype(int)
    q_score = easy[g] * across + rng.normal(scale=0.3, size=G * m)
    return x, q_score, y, g.astype(str)


def _brute_within_auroc(s, y, g):
    wins = pairs = 0.0
    for q in np.unique(g):
        m = g == q
        for a in s[m][y[m] == 1]:
            for b in s[m][y[m] == 0]:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
                pairs += 1
    return wins / pairs


def test_within_auroc_equals_a_pair_by_pair_count_with_ties():
    x, _, y, g = _questions(0, G=40, m=5, within=1.0)
    s = np.round(x, 1)  # ties inside questions count 1/2
    assert S.within_auroc(s, y, g) == pytest.approx(_brute_within_auroc(s, y, g), abs=1e-12)
    many = S.within_auroc_many(np.stack([s, -s, y.astype(float)]), y, g)
    assert many == pytest.approx([_brute_within_auroc(s, y, g), 1 - _brute_within_auroc(s, y, g), 1.0])
    mixed = S.mixed_questions(y, g)
    want = sum(0 < y[g == q].sum() < 5 for q in np.unique(g))
    assert len(set(g[mixed])) == want and S.within_summary(s, y, g, 100, 100).n_mixed_questions == want


def _brute_within_summary(s, y, g, n_boot, n_perm, seed):
    """Independent loops: resample mixed questions; shuffle labels within each question."""
    rng = np.random.default_rng(seed + 12345)
    qs = [q for q in np.unique(g) if 0 < y[g == q].sum() < (g == q).sum()]

    def pooled(qlist, lab):
        w = p = 0.0
        for q in qlist:
            m = g == q
            ss, yy = s[m], lab[m]
            d = ss[yy == 1][:, None] - ss[yy == 0][None, :]
            w += (d > 0).sum() + 0.5 * (d == 0).sum()
            p += d.size
        return w / p

    est = pooled(qs, y)
    boots = [pooled([qs[i] for i in rng.integers(0, len(qs), len(qs))], y) for _ in range(n_boot)]
    null = []
    for _ in range(n_perm):
        lab = y.copy()
        for q in qs:
            idx = np.flatnonzero(g == q)
            lab[idx] = rng.permutation(lab[idx])
        null.append(pooled(qs, lab))
    null = np.array(null) - 0.5
    p = min(1.0, 2 * min((1 + (null >= est - 0.5).sum()) / (n_perm + 1), (1 + (null <= est - 0.5).sum()) / (n_perm + 1)))
    return est, np.quantile(boots, [0.025, 0.975]), p


def test_within_summary_matches_an_independent_computation():
    x, _, y, g = _questions(1, G=60, m=4, within=0.2)
    got = S.within_summary(x, y, g, n_boot=1000, n_perm=1000, seed=0)
    est, ci, p = _brute_within_summary(x, y, g, 1000, 1000, 0)
    assert got.auroc == pytest.approx(est, abs=1e-12)
    assert got.ci95 == pytest.approx(tuple(ci), abs=0.02)  # different random draws, same distribution
    assert got.permutation_p == pytest.approx(p, abs=0.03)
    assert 0.005 < p < 0.5  # a case where the p-value is neither 0-like nor 1-like, so the check bites


def test_within_effect_is_detected_within_and_across_only_effect_only_across():
    x, q_score, y, g = _questions(2, G=150, m=4, within=1.2, across=1.0)
    # a score that ranks completions of the same question: detected within (and across)
    w = S.within_summary(x, y, g, n_boot=1000, n_perm=2000, seed=0)
    assert w.auroc > 0.6 and w.ci95[0] > 0.5 and w.permutation_p < 0.01
    assert S.spearman(x, y).p < 0.05
    # a score that only knows which questions are easy: strong across, nothing within
    a = S.within_summary(q_score, y, g, n_boot=1000, n_perm=2000, seed=0)
    rho = S.spearman(q_score, y)
    assert rho.stat > 0.3 and rho.p < 1e-6 and S.correlation_summary(q_score, y, g, 300, 300).ci95[0] > 0
    assert a.ci95[0] < 0.5 < a.ci95[1] and a.permutation_p > 0.05
    assert abs(S.within_auroc(q_score, y, g) - _brute_within_auroc(q_score, y, g)) < 1e-12


def test_within_summary_without_mixed_questions_is_empty_not_an_error():
    y = np.array([1, 1, 0, 0, 1, 1])
    g = np.array(["a", "a", "b", "b", "c", "c"])
    w = S.within_summary(np.arange(6.0), y, g, 50, 50)
    assert w.n_mixed_questions == 0 and w.auroc is None and w.ci95 is None
    with pytest.raises(DataError, match="no question has both"):
        S.within_auroc(np.arange(6.0), y, g)


def test_incremental_lrt_equals_statsmodels_across_and_within():
    sm = pytest.importorskip("statsmodels.api")
    from statsmodels.discrete.conditional_models import ConditionalLogit

    x, q_score, y, g = _questions(3, G=120, m=4, within=0.8, across=1.0)
    rng = np.random.default_rng(0)
    length = q_score + rng.normal(size=y.size)
    logprob = rng.normal(size=y.size)
    z = np.column_stack([length, logprob])
    score = x + 0.5 * length
    across = S.incremental_lrt(score, y, z)
    X = np.column_stack([z, score])
    X = (X - X.mean(0)) / X.std(0)
    full, red = sm.Logit(y, sm.add_constant(X)).fit(disp=0), sm.Logit(y, sm.add_constant(X[:, :2])).fit(disp=0)
    assert across.chi2 == pytest.approx(2 * (full.llf - red.llf), rel=1e-6)
    assert across.coef == pytest.approx(full.params[-1], rel=1e-6) and across.n == y.size
    within = S.incremental_lrt(score, y, z, groups=g)
    mixed = S.mixed_questions(y, g)
    Xm = np.column_stack([z, score])[mixed]
    Xm = (Xm - Xm.mean(0)) / Xm.std(0)
    cf = ConditionalLogit(y[mixed], Xm, groups=g[mixed]).fit(disp=0)
    cr = ConditionalLogit(y[mixed], Xm[:, :2], groups=g[mixed]).fit(disp=0)
    assert within.chi2 == pytest.approx(2 * (cf.llf - cr.llf), rel=1e-4)
    assert within.coef == pytest.approx(cf.params[-1], rel=1e-4) and within.n == int(mixed.sum())
    assert within.p < 1e-3


def test_within_centre_removes_question_means():
    x = np.array([1.0, 3.0, 10.0, 20.0, 30.0])
    g = np.array(["a", "a", "b", "b", "b"])
    assert S.within_centre(x, g) == pytest.approx([-1, 1, -10, 0, 10])
    assert S.within_centre(np.column_stack([x, 2 * x]), g)[:, 1] == pytest.approx([-2, 2, -20, 0, 20])


def test_conditional_logit_fit_is_the_same_with_autograd_disabled_by_the_caller():
    # vLLM's process runs with grad disabled; the within-question LRT must still fit
    import torch

    from mechreward.stats import conditional_logit_fit

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 4)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200) > 0
    free = conditional_logit_fit(x, y, groups)
    with torch.no_grad():
        no_grad = conditional_logit_fit(x, y, groups)
    with torch.inference_mode():
        inference = conditional_logit_fit(x, y, groups)
    assert free[0][0] > 0.5  # the planted effect
    np.testing.assert_allclose(no_grad[0], free[0], rtol=1e-12)
    np.testing.assert_allclose(inference[0], free[0], rtol=1e-12)
