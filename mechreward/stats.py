"""Statistics shared by the layer map, the probe and the gates (G1, G2).

Thin, validated wrappers around scipy.stats plus the few things scipy does not do in the shape
the gates need (cluster bootstrap over questions, vectorised effect sizes and AUROC over
feature columns, partial Spearman). Conventions:

- "pos" is the correct class, "neg" the wrong one; labels are 0/1 (or bool), 1 = correct.
- Shapes are in the names or docstrings: `[n]` one value per response, `[n, F]` one column
  per feature; vectorised functions work over the feature axis and return `[F]`.
- Degenerate input (NaN/inf, n < 3, a constant array, labels of one class only) raises
  `DataError` naming the problem instead of returning NaN: a gate must not print "rho = nan".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import stats as sps

from .errors import DataError, ShapeError

MIN_N = 3
"""Fewest paired observations a correlation is computed on."""


# ----------------------------------------------------------------------------- validation


def _as_float(name: str, x, ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in ndim:
        raise DataError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise DataError(f"{name} contains {bad} NaN/inf value(s) (shape {a.shape})")
    return a


def _check_paired(x: np.ndarray, y: np.ndarray, xname: str = "x", yname: str = "y") -> None:
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{xname} and {yname} differ in length: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] < MIN_N:
        raise DataError(f"need at least {MIN_N} paired values, got n={x.shape[0]}")


def _check_not_constant(name: str, a: np.ndarray) -> None:
    if np.ptp(a) == 0:
        raise DataError(f"{name} is constant (all {a.flat[0]:g}, n={a.shape[0]}): correlation undefined")


def _as_labels(labels, n: int | None = None) -> np.ndarray:
    """0/1 labels `[n]` as bool; both classes must be present."""
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {lab.shape}")
    if n is not None and lab.shape[0] != n:
        raise DataError(f"labels have length {lab.shape[0]} but scores have {n} rows")
    if lab.dtype != bool:
        labf = lab.astype(np.float64)
        if not np.all(np.isin(labf, (0.0, 1.0))):
            odd = labf[~np.isin(labf, (0.0, 1.0))][:3]
            raise DataError(f"labels must be 0/1, got values like {odd.tolist()}")
        lab = labf == 1.0
    n_pos = int(lab.sum())
    if n_pos == 0 or n_pos == lab.shape[0]:
        raise DataError(f"labels are all {int(n_pos > 0)} (n={lab.shape[0]}): need both classes")
    return lab


# ----------------------------------------------------------------------------- effect sizes


def cohens_d(x_pos, x_neg, axis: int = 0) -> np.ndarray:
    """Cohen's d of pos (correct) minus neg (wrong), as in GATES.md.

    d = (mean_pos - mean_neg) / sqrt((var_pos + var_neg) / 2), variances with ddof=1
    (the unweighted pooled SD of the published protocol, not the n-weighted one).

    x_pos: `[n_pos, F]` (or `[n_pos]`), x_neg: `[n_neg, F]`; reduced over `axis` → `[F]`.
    A feature whose pooled variance is 0 (e.g. never fires) gets d = 0, not NaN/inf.
    """
    a = _as_float("x_pos", x_pos, ndim=(1, 2, 3))
    b = _as_float("x_neg", x_neg, ndim=(1, 2, 3))
    for name, arr in (("x_pos", a), ("x_neg", b)):
        if arr.shape[axis] < 2:
            raise DataError(f"{name} needs at least 2 rows for a ddof=1 variance, got {arr.shape[axis]}")
    diff = a.mean(axis=axis) - b.mean(axis=axis)
    sd = np.sqrt((a.var(axis=axis, ddof=1) + b.var(axis=axis, ddof=1)) / 2.0)
    # Relative threshold: float noise of a constant column must not become a huge d.
    tiny = sd <= 1e-12 * np.maximum(1.0, np.maximum(np.abs(a).max(axis=axis), np.abs(b).max(axis=axis)))
    d = np.divide(diff, sd, out=np.zeros_like(diff), where=~tiny)
    return d


def auroc(scores, labels) -> np.ndarray | float:
    """Area under the ROC curve of `scores` for `labels` (1 = positive), ties counted 1/2.

    Computed from average ranks: AUROC = U / (n_pos * n_neg), U the Mann-Whitney statistic of
    the positives. scores `[n]` → float; scores `[n, F]` → `[F]` (one AUROC per column).
    """
    s = _as_float("scores", scores, ndim=(1, 2))
    lab = _as_labels(labels, s.shape[0])
    n_pos = int(lab.sum())
    n_neg = lab.shape[0] - n_pos
    ranks = sps.rankdata(s, axis=0)  # average ranks: ties get 1/2 credit
    u = ranks[lab].sum(axis=0) - n_pos * (n_pos + 1) / 2.0
    out = u / (n_pos * n_neg)
    return float(out) if s.ndim == 1 else out


def mann_whitney_p(x_pos, x_neg) -> np.ndarray | float:
    """Two-sided Mann-Whitney U p-value per feature (scipy, method 'auto').

    x_pos `[n_pos, F]`, x_neg `[n_neg, F]` → `[F]` (1-D inputs → float). A feature constant
    over both groups has no evidence of a difference: p = 1 (scipy would give NaN).
    """
    a = _as_float("x_pos", x_pos, ndim=(1, 2))
    b = _as_float("x_neg", x_neg, ndim=(1, 2))
    if a.shape[0] < 1 or b.shape[0] < 1:
        raise DataError(f"both groups need at least one row, got n_pos={a.shape[0]}, n_neg={b.shape[0]}")
    if a.shape[1:] != b.shape[1:]:
        raise DataError(f"x_pos and x_neg have different feature counts: {a.shape} vs {b.shape}")
    both = np.concatenate([a, b], axis=0)
    const = np.ptp(both, axis=0) == 0
    p = np.ones(both.shape[1:], dtype=np.float64)
    if np.any(~const):
        if a.ndim == 1:
            p = np.asarray(sps.mannwhitneyu(a, b, alternative="two-sided").pvalue, dtype=np.float64)
        else:
            p[~const] = sps.mannwhitneyu(a[:, ~const], b[:, ~const], axis=0, alternative="two-sided").pvalue
    return float(p) if a.ndim == 1 else p


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), `[m]` → `[m]`.

    Same numbers as `scipy.stats.false_discovery_control(p, method="bh")`.
    """
    pa = _as_float("p", p, ndim=(1,))
    if pa.size == 0:
        raise DataError("no p-values to adjust (empty array)")
    if np.any((pa < 0) | (pa > 1)):
        raise DataError(f"p-values must lie in [0, 1], got min {pa.min():g}, max {pa.max():g}")
    return sps.false_discovery_control(pa, method="bh")


# ----------------------------------------------------------------------------- correlations


class Correlation(NamedTuple):
    """A correlation coefficient and its two-sided p-value; unpacks as `(stat, p)`."""

    stat: float
    """rho (Spearman) or r (Pearson), in [-1, 1]."""
    p: float
    """Two-sided p-value from scipy's (or, for partial Spearman, the t) reference distribution."""


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    xa = _as_float("x", x)
    ya = _as_float("y", y)
    _check_paired(xa, ya)
    _check_not_constant("x", xa)
    _check_not_constant("y", ya)
    return xa, ya


def spearman(x, y) -> Correlation:
    """Spearman rank correlation of `x [n]` and `y [n]` with scipy's two-sided p-value."""
    xa, ya = _paired(x, y)
    res = sps.spearmanr(xa, ya)
    return Correlation(float(res.statistic), float(res.pvalue))


def pearson(x, y) -> Correlation:
    """Pearson correlation of `x [n]` and `y [n]` with scipy's two-sided p-value."""
    xa, ya = _paired(x, y)
    res = sps.pearsonr(xa, ya)
    return Correlation(float(res.statistic), float(res.pvalue))


def partial_spearman(x, y, covariate) -> Correlation:
    """Spearman correlation of `x [n]` and `y [n]` controlling for `covariate [n]` or `[n, k]`.

    Each variable is ranked (average ranks); the covariates' ranks (with an intercept) are
    regressed out of the ranks of x and of y by least squares, and the residuals are
    correlated (Pearson). With one covariate this equals the textbook
    (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)) on Spearman coefficients.

    p-value: two-sided, from t = r sqrt(df / (1 - r^2)) on df = n - 2 - k degrees of
    freedom (k = number of covariates), the usual partial-correlation test.
    """
    xa, ya = _paired(x, y)
    z = _as_float("covariate", covariate, ndim=(1, 2))
    z = z[:, None] if z.ndim == 1 else z
    if z.shape[0] != xa.shape[0]:
        raise DataError(f"covariate has {z.shape[0]} rows but x has {xa.shape[0]}")
    k = z.shape[1]
    n = xa.shape[0]
    df = n - 2 - k
    if df < 1:
        raise DataError(f"partial correlation with {k} covariate(s) needs n >= {k + 3}, got n={n}")
    for j in range(k):
        _check_not_constant(f"covariate column {j}", z[:, j])
    design = np.column_stack([np.ones(n), sps.rankdata(z, axis=0)])  # [n, 1 + k]
    ranks = np.column_stack([sps.rankdata(xa), sps.rankdata(ya)])  # [n, 2]
    coef, *_ = np.linalg.lstsq(design, ranks, rcond=None)
    resid = ranks - design @ coef  # [n, 2]
    norms = np.linalg.norm(resid, axis=0)
    scale = np.linalg.norm(ranks - ranks.mean(axis=0), axis=0)
    if np.any(norms <= 1e-10 * scale):
        which = "x" if norms[0] <= 1e-10 * scale[0] else "y"
        raise DataError(f"{which} is fully explained by the covariate's ranks: partial correlation undefined")
    r = float(np.clip(resid[:, 0] @ resid[:, 1] / (norms[0] * norms[1]), -1.0, 1.0))
    if abs(r) >= 1.0:
        p = 0.0
    else:
        t = r * np.sqrt(df / (1.0 - r * r))
        p = float(2.0 * sps.t.sf(abs(t), df))
    return Correlation(r, p)


# ----------------------------------------------------------------------------- resampling


class BootstrapCI(NamedTuple):
    """A percentile bootstrap confidence interval."""

    estimate: float
    """The statistic on the full (not resampled) data."""
    low: float
    high: float
    n_valid: int
    """Resamples the statistic could be computed on (resamples that raised DataError, e.g.
    one-class labels, or gave a non-finite value are left out of the percentiles)."""


def _stat_value(v) -> float:
    """A statistic function may return a number or a tuple whose first item is the number."""
    if isinstance(v, tuple):
        v = v[0]
    return float(v)


def _percentile_ci(
    estimate: float, draws: list[float], n_boot: int, level: float
) -> BootstrapCI:
    if len(draws) < max(2, n_boot // 2):
        raise DataError(
            f"bootstrap statistic could be computed on only {len(draws)} of {n_boot} resamples "
            "(too few distinct values or one-class resamples): data too small for a CI"
        )
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(draws), [alpha, 1.0 - alpha])
    return BootstrapCI(float(estimate), float(lo), float(hi), len(draws))


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise DataError(f"confidence level must be in (0, 1), got {level}")


def bootstrap_ci(
    stat_fn: Callable[..., float | tuple],
    *arrays,
    groups=None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapCI:
    """Percentile bootstrap CI of `stat_fn(*arrays)`; all arrays share their first axis `[n, ...]`.

    With `groups [n]` (question ids), whole clusters are resampled with replacement: every
    response of a drawn question comes along, so several rollouts of one question do not
    count as independent evidence. Without groups, rows are resampled.
    `stat_fn` returns a float or a tuple whose first element is the statistic (so
    `stats.spearman` can be passed directly).
    """
    _check_level(level)
    if n_boot < 1:
        raise DataError(f"n_boot must be >= 1, got {n_boot}")
    if not arrays:
        raise DataError("bootstrap_ci needs at least one data array")
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0]
    for i, a in enumerate(arrs):
        if a.shape[0] != n:
            raise DataError(f"array {i} has {a.shape[0]} rows, array 0 has {n}")
    estimate = _stat_value(stat_fn(*arrs))
    rng = np.random.default_rng(seed)

    if groups is None:
        clusters = [np.array([i]) for i in range(n)]
        idx_sets = None
    else:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise DataError(f"groups must have shape ({n},), got {g.shape}")
        _, inv = np.unique(g, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        bounds = np.flatnonzero(np.diff(inv[order])) + 1
        clusters = np.split(order, bounds)
        idx_sets = clusters
    n_clusters = len(clusters)
    if n_clusters < 2:
        raise DataError(f"bootstrap needs at least 2 clusters/rows, got {n_clusters}")

    draws: list[float] = []
    for _ in range(n_boot):
        pick = rng.integers(0, n_clusters, size=n_clusters)
        idx = pick if idx_sets is None else np.concatenate([idx_sets[c] for c in pick])
        try:
            v = _stat_value(stat_fn(*(a[idx] for a in arrs)))
        except DataError:
            continue
        if np.isfinite(v):
            draws.append(v)
    return _percentile_ci(estimate, draws, n_boot, level)


def paired_bootstrap_ci(
    a, b, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> BootstrapCI:
    """Percentile bootstrap CI of mean(a - b) for paired values `a [n]`, `b [n]`.

    The pair (a_i, b_i) is the unit resampled (e.g. the R1 and R0 accuracy of seed i in G2).
    With n = 3 seeds there are only 10 distinct resamples: the CI is coarse, and says so by
    being wide. Vectorised (one [n_boot, n] index draw).
    """
    _check_level(level)
    aa = _as_float("a", a)
    bb = _as_float("b", b)
    if aa.shape != bb.shape:
        raise DataError(f"a and b must be paired (same length), got {aa.shape[0]} vs {bb.shape[0]}")
    if aa.shape[0] < 2:
        raise DataError(f"paired bootstrap needs at least 2 pairs, got n={aa.shape[0]}")
    diff = aa - bb  # [n]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.shape[0], size=(n_boot, diff.shape[0]))  # [n_boot, n]
    means = diff[idx].mean(axis=1)  # [n_boot]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapCI(float(diff.mean()), float(lo), float(hi), int(n_boot))


def _permutation_indices(rng: np.random.Generator, n: int, n_perm: int) -> np.ndarray:
    return rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)  # [n_perm, n]


def _block_permutation_indices(rng: np.random.Generator, blocks: list[np.ndarray], n: int, n_perm: int) -> np.ndarray:
    """[n_perm, n] indices that move whole groups: each group's positions receive the values of another group of
    the same size (groups of one size permuted among themselves), in a random order within the group."""
    idx = np.empty((n_perm, n), dtype=np.int64)
    by_size: dict[int, list[np.ndarray]] = {}
    for b in blocks:
        by_size.setdefault(len(b), []).append(b)
    for m, bs in by_size.items():
        P = np.stack(bs)  # [c, m] positions of the c groups of size m
        c = P.shape[0]
        bp = rng.permuted(np.tile(np.arange(c), (n_perm, 1)), axis=1)  # [n_perm, c]: which group's values
        wp = rng.permuted(np.tile(np.arange(m), (n_perm, c, 1)), axis=2)  # [n_perm, c, m]: their order
        idx[:, P.reshape(-1)] = P[bp[..., None], wp].reshape(n_perm, c * m)
    return idx


def permutation_p(
    x,
    y,
    stat: Callable[..., float | tuple] = spearman,
    n_perm: int = 10000,
    seed: int = 0,
    chunk: int = 2000,
    groups: Sequence | np.ndarray | None = None,
) -> float:
    """Two-sided permutation p-value of `stat(x [n], y [n])`, permuting y.

    p = min(1, 2 * min(P_greater, P_less)) with P_greater = (1 + #{t* >= t}) / (n_perm + 1)
    (the +1 counts the observed arrangement, so p is never 0), as scipy.stats.permutation_test
    defines two-sided. `stat` returns a float or a tuple whose first item is the statistic.
    `spearman` and `pearson` take a vectorised path (same permutations, same numbers as calling
    them one by one).

    `groups [n]` (question ids): whole groups are permuted — each question's labels go, in a random order,
    to another question with as many responses — instead of single responses. Under the null that the score
    is independent of correctness while both carry a question effect (several rollouts per question), a
    response-level permutation is anti-conservative (it treats the k rollouts of a question as k independent
    draws); the group permutation keeps each question's labels together and stays exact.
    """
    xa, ya = _paired(x, y)
    if n_perm < 1:
        raise DataError(f"n_perm must be >= 1, got {n_perm}")
    observed = _stat_value(stat(xa, ya))
    rng = np.random.default_rng(seed)
    n = xa.shape[0]
    blocks = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape[0] != n:
            raise ShapeError(f"groups has {g.shape[0]} entries for {n} responses")
        _, inv = np.unique(g, return_inverse=True)
        blocks = [np.flatnonzero(inv == j) for j in range(inv.max() + 1)]
    fast = stat is spearman or stat is pearson
    if fast:
        xv = sps.rankdata(xa) if stat is spearman else xa
        yv = sps.rankdata(ya) if stat is spearman else ya
        xc = (xv - xv.mean()) / np.linalg.norm(xv - xv.mean())
        yc = (yv - yv.mean()) / np.linalg.norm(yv - yv.mean())
    perm_stats = np.empty(n_perm, dtype=np.float64)
    done = 0
    while done < n_perm:
        m = min(chunk, n_perm - done)
        idx = _permutation_indices(rng, n, m) if blocks is None else _block_permutation_indices(rng, blocks, n, m)
        if fast:
            perm_stats[done:done + m] = yc[idx] @ xc
        else:
            for j in range(m):
                perm_stats[done + j] = _stat_value(stat(xa, ya[idx[j]]))
        done += m
    tol = 1e-12 * max(1.0, abs(observed))  # float noise must not decide ties
    p_greater = (1 + np.count_nonzero(perm_stats >= observed - tol)) / (n_perm + 1)
    p_less = (1 + np.count_nonzero(perm_stats <= observed + tol)) / (n_perm + 1)
    return float(min(1.0, 2.0 * min(p_greater, p_less)))


# ----------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class CorrelationSummary:
    """Everything G1 reports about a score against 0/1 correctness."""

    rho: float
    """Spearman rho(score, label) (the published statistic)."""
    p: float
    """scipy's two-sided p-value for rho."""
    ci95: tuple[float, float]
    """95% percentile bootstrap CI of rho (clusters = groups when given)."""
    permutation_p: float
    """Two-sided permutation p-value of rho (+1 corrected); whole questions permuted when groups were given."""
    auroc: float
    """AUROC of score for label (ties 1/2)."""
    pearson: float
    """Pearson r (point-biserial, since label is 0/1)."""
    pearson_p: float
    n: int
    """Number of responses."""
    n_pos: int
    """Number of correct responses."""
    n_groups: int
    """Number of distinct groups (questions); n when no groups were given."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d


def correlation_summary(
    score,
    label,
    groups: Sequence | np.ndarray | None = None,
    n_boot: int = 2000,
    n_perm: int = 10000,
    seed: int = 0,
) -> CorrelationSummary:
    """Spearman rho with p, bootstrap CI (over groups when given), permutation p, AUROC and
    Pearson of `score [n]` against 0/1 `label [n]`.

    `groups` (question ids): the bootstrap resamples questions and the permutation p permutes whole
    questions (`permutation_p(groups=...)`), both valid with several rollouts per question. The scipy
    p-values treat responses as independent, which is exact for one rollout per question (the G1
    default) and optimistic for several (a question effect in both score and correctness rejected 15% of
    null seeds at α = 0.05 in tests/test_g1_calibration.py).
    """
    s = _as_float("score", score)
    lab = _as_labels(label, s.shape[0])
    y = lab.astype(np.float64)
    rho = spearman(s, y)
    r = pearson(s, y)
    ci = bootstrap_ci(spearman, s, y, groups=groups, n_boot=n_boot, seed=seed, level=0.95)
    perm = permutation_p(s, y, spearman, n_perm=n_perm, seed=seed, groups=groups)
    n_groups = s.shape[0] if groups is None else int(np.unique(np.asarray(groups)).size)
    return CorrelationSummary(
        rho=rho.stat, p=rho.p, ci95=(ci.low, ci.high), permutation_p=perm,
        auroc=float(auroc(s, lab)), pearson=r.stat, pearson_p=r.p,
        n=int(s.shape[0]), n_pos=int(lab.sum()), n_groups=n_groups,
    )


# ----------------------------------------------------------------------------- within questions
#
# GRPO normalises rewards within the group of completions of one prompt, so what a reward can
# contribute is how it ranks completions of the *same* question. These statistics use only
# (correct, wrong) pairs of the same question; questions whose rollouts are all correct or all
# wrong ("unmixed") carry no within-question information and drop out.


def _group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    g = np.asarray(groups)
    if g.shape != (n,):
        raise DataError(f"groups must have shape ({n},), got {g.shape}")
    _, inv = np.unique(g, return_inverse=True)
    return inv.reshape(-1), int(inv.max()) + 1 if n else 0


def mixed_questions(labels, groups) -> np.ndarray:
    """Boolean mask `[n]` of responses whose question has at least one correct and one wrong response."""
    lab = np.asarray(labels).astype(np.float64)
    inv, G = _group_codes(groups, lab.shape[0])
    n_pos = np.bincount(inv, weights=lab, minlength=G)
    n_all = np.bincount(inv, minlength=G)
    mixed = (n_pos > 0) & (n_pos < n_all)
    return mixed[inv]


def _within_parts(scores: np.ndarray, lab: np.ndarray, inv: np.ndarray):
    """Per mixed question: U (wins of correct over wrong, ties 1/2) and the number of pairs.

    scores `[n]` or `[K, n]` → U `[G_mixed]` or `[K, G_mixed]`, pairs `[G_mixed]`, and the
    per-question member index lists (for permutations).
    """
    order = np.argsort(inv, kind="stable")
    bounds = np.flatnonzero(np.diff(inv[order])) + 1
    members = [m for m in np.split(order, bounds) if 0 < lab[m].sum() < m.size]
    two_d = scores.ndim == 2
    u, pairs, ranks, npos = [], [], [], []
    for m in members:
        s = scores[:, m] if two_d else scores[m]
        r = sps.rankdata(s, axis=-1)  # average ranks within the question: ties count 1/2
        k = int(lab[m].sum())
        u.append(r[..., lab[m]].sum(-1) - k * (k + 1) / 2.0)
        pairs.append(k * (m.size - k))
        ranks.append(r)
        npos.append(k)
    U = np.stack(u, axis=-1) if u else np.zeros((scores.shape[0], 0) if two_d else 0)
    return U, np.asarray(pairs, dtype=np.float64), members, ranks, npos


def within_auroc(score, labels, groups) -> float:
    """AUROC over (correct, wrong) pairs of the same question, ties 1/2.

    = Σ_q U_q / Σ_q n_pos,q · n_neg,q over mixed questions q (a pair-weighted pooled AUROC).
    DataError when no question is mixed.
    """
    s = _as_float("score", score)
    lab = np.asarray(labels).astype(bool)
    if lab.shape != s.shape:
        raise DataError(f"labels have length {lab.shape[0]} but scores have {s.shape[0]}")
    inv, _ = _group_codes(groups, s.shape[0])
    U, P, *_ = _within_parts(s, lab, inv)
    if P.size == 0:
        raise DataError("no question has both a correct and a wrong response: within-question AUROC undefined")
    return float(U.sum() / P.sum())


def within_auroc_many(scores, labels, groups) -> np.ndarray:
    """`within_auroc` of each row of `scores [K, n]` → `[K]` (e.g. the random packs)."""
    s = _as_float("scores", scores, ndim=(2,))
    lab = np.asarray(labels).astype(bool)
    inv, _ = _group_codes(groups, s.shape[1])
    U, P, *_ = _within_parts(s, lab, inv)
    if P.size == 0:
        raise DataError("no question has both a correct and a wrong response: within-question AUROC undefined")
    return U.sum(-1) / P.sum()


@dataclass(frozen=True)
class WithinSummary:
    """Within-question evidence of a score for correctness."""

    n_mixed_questions: int
    """Questions with >= 1 correct and >= 1 wrong response (the only ones that count)."""
    n_pairs: int
    """(correct, wrong) pairs of the same question."""
    auroc: float | None
    """Within-question AUROC (None when fewer than 2 questions are mixed)."""
    ci95: tuple[float, float] | None
    """Percentile bootstrap CI resampling mixed questions."""
    permutation_p: float | None
    """Two-sided p of AUROC − 0.5, labels shuffled within each question (+1 corrected)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci95"] = None if self.ci95 is None else list(self.ci95)
        return d


def within_summary(score, labels, groups, n_boot: int = 2000, n_perm: int = 10000, seed: int = 0,
                   level: float = 0.95) -> WithinSummary:
    """Within-question AUROC of `score [n]` for 0/1 `labels [n]` with questions `groups [n]`.

    Bootstrap: mixed questions are drawn with replacement and the pooled AUROC recomputed
    (Σ U / Σ pairs over the draw). Permutation: labels are shuffled within every question (each
    question keeps its number of correct responses), which is the null "the score does not rank
    completions of the same question".
    """
    _check_level(level)
    s = _as_float("score", score)
    lab = np.asarray(labels).astype(bool)
    if lab.shape != s.shape:
        raise DataError(f"labels have length {lab.shape[0]} but scores have {s.shape[0]}")
    inv, _ = _group_codes(groups, s.shape[0])
    U, P, members, ranks, npos = _within_parts(s, lab, inv)
    G = P.size
    if G < 2:
        return WithinSummary(G, int(P.sum()), None, None, None)
    est = float(U.sum() / P.sum())
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)  # [B, G]
    draws = (counts @ U) / (counts @ P)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    # permutation within questions: positives get a random subset of the question's ranks
    total = np.zeros(n_perm)
    for r, k in zip(ranks, npos):
        perm = rng.permuted(np.tile(r, (n_perm, 1)), axis=1)  # [n_perm, n_q]
        total += perm[:, :k].sum(1) - k * (k + 1) / 2.0
    null = total / P.sum() - 0.5
    obs = est - 0.5
    tol = 1e-12
    p_greater = (1 + np.count_nonzero(null >= obs - tol)) / (n_perm + 1)
    p_less = (1 + np.count_nonzero(null <= obs + tol)) / (n_perm + 1)
    return WithinSummary(G, int(P.sum()), est, (float(lo), float(hi)), float(min(1.0, 2.0 * min(p_greater, p_less))))


# ----------------------------------------------------------------------------- incremental validity


class LikelihoodRatio(NamedTuple):
    """A nested-model likelihood-ratio test of one added predictor."""

    chi2: float
    """2 · (log L_full − log L_reduced), on 1 degree of freedom."""
    p: float
    coef: float
    """The added predictor's coefficient in the full model (predictors standardised: per SD)."""
    n: int
    """Responses that enter the fit (within: responses of mixed questions)."""


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    if np.any(sd == 0):
        raise DataError(f"predictor column(s) {np.flatnonzero(sd == 0).tolist()} are constant: cannot fit")
    return (x - x.mean(axis=0)) / sd


def logistic_fit(x, y, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Maximum-likelihood logistic regression of 0/1 `y [n]` on `x [n, p]` plus an intercept (Newton).

    Returns (coefficients `[1 + p]`, intercept first; log-likelihood).
    """
    X = np.column_stack([np.ones(len(y)), np.asarray(x, dtype=np.float64)])
    yv = np.asarray(y, dtype=np.float64)
    beta = np.zeros(X.shape[1])

    def ll(b):
        eta = X @ b
        return float(np.sum(yv * eta - np.logaddexp(0.0, eta)))

    cur = ll(beta)
    for _ in range(max_iter):
        mu = 1.0 / (1.0 + np.exp(-(X @ beta)))
        grad = X.T @ (yv - mu)
        hess = (X * (mu * (1 - mu))[:, None]).T @ X
        step = np.linalg.solve(hess + 1e-10 * np.eye(X.shape[1]), grad)
        t = 1.0
        while t > 1e-8:  # step halving keeps the likelihood increasing (separation: it creeps up)
            new = ll(beta + t * step)
            if new >= cur - 1e-12:
                break
            t /= 2
        beta, prev, cur = beta + t * step, cur, new
        if abs(cur - prev) < 1e-10:
            break
    return beta, cur


def _cond_loglik(beta, X, pos_mask, valid, k: np.ndarray):
    """Conditional-logit log-likelihood (torch, float64) for padded groups `X [G, m, p]`.

    Per question: Σ_{correct} η_i − log e_k(exp η), e_k the elementary symmetric polynomial of
    degree k (the question's number of correct responses) over its members, by the recursion
    e_j ← e_j + w_i · e_{j−1}. η is shifted by the question's maximum so that every w ≤ 1.
    """
    import torch

    eta = torch.einsum("gmp,p->gm", X, beta)
    shift = torch.where(valid, eta, torch.full_like(eta, -1e300)).max(1, keepdim=True).values.detach()
    w = torch.where(valid, torch.exp(eta - shift), torch.zeros_like(eta))  # padding: weight 0
    kmax = int(k.max())
    E = [torch.ones(X.shape[0], dtype=torch.float64)] + [torch.zeros(X.shape[0], dtype=torch.float64)] * kmax
    for i in range(X.shape[1]):
        E = [E[0]] + [E[j] + w[:, i] * E[j - 1] for j in range(1, kmax + 1)]
    E = torch.stack(E, 1)  # [G, kmax + 1]
    kt = torch.as_tensor(k, dtype=torch.long)
    denom = torch.log(E.gather(1, kt[:, None]).squeeze(1)) + kt.to(torch.float64) * shift.squeeze(1)
    num = torch.where(pos_mask & valid, eta, torch.zeros_like(eta)).sum(1)
    return (num - denom).sum()


def conditional_logit_fit(x, y, groups) -> tuple[np.ndarray, float, int]:
    """Conditional (fixed-effects) logistic regression of `y [n]` on `x [n, p]`, stratified by `groups`.

    The likelihood conditions on the number of correct responses of each question, so question
    difficulty drops out and only within-question differences inform the coefficients. Only
    mixed questions contribute. Returns (coefficients `[p]`, log-likelihood, responses used).
    """
    import torch
    from scipy.optimize import minimize

    xa = np.asarray(x, dtype=np.float64)
    xa = xa[:, None] if xa.ndim == 1 else xa
    lab = np.asarray(y).astype(bool)
    inv, _ = _group_codes(groups, lab.shape[0])
    _, _, members, _, npos = _within_parts(np.zeros(lab.shape[0]), lab, inv)
    if len(members) < 2:
        raise DataError(f"conditional logit needs at least 2 mixed questions, got {len(members)}")
    m = max(len(g) for g in members)
    G, p = len(members), xa.shape[1]
    X = np.zeros((G, m, p))
    pos = np.zeros((G, m), dtype=bool)
    valid = np.zeros((G, m), dtype=bool)
    for i, g in enumerate(members):
        X[i, :len(g)] = xa[g]
        pos[i, :len(g)] = lab[g]
        valid[i, :len(g)] = True
    k = np.asarray(npos)

    def f(b):
        # autograd on, whatever the caller's mode (vLLM's process runs with grad disabled)
        with torch.inference_mode(False), torch.enable_grad():
            bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
            ll = _cond_loglik(bt, torch.as_tensor(X), torch.as_tensor(pos), torch.as_tensor(valid), k)
            (g,) = torch.autograd.grad(-ll, bt)
        return float(-ll.detach()), g.numpy()

    res = minimize(f, np.zeros(p), jac=True, method="BFGS", options={"gtol": 1e-9, "maxiter": 500})
    return res.x, float(-res.fun), int(valid.sum())


def incremental_lrt(score, labels, covariates, groups=None) -> LikelihoodRatio:
    """Does `score [n]` predict 0/1 `labels` beyond `covariates [n, k]` (e.g. length, mean log-prob)?

    Nested likelihood-ratio test on 1 df: logistic regression (groups=None: across all
    responses, with an intercept) or conditional logistic regression stratified by question
    (groups given: within questions only). Predictors are standardised (coef per SD).
    """
    s = _as_float("score", score)
    z = _as_float("covariates", covariates, ndim=(1, 2))
    z = z[:, None] if z.ndim == 1 else z
    if z.shape[0] != s.shape[0]:
        raise DataError(f"covariates have {z.shape[0]} rows but score has {s.shape[0]}")
    lab = _as_labels(labels, s.shape[0])
    rows = np.arange(s.shape[0]) if groups is None else np.flatnonzero(mixed_questions(lab, groups))
    if rows.size < MIN_N:
        raise DataError(f"only {rows.size} responses belong to questions with both a correct and a wrong response")
    full = _standardise(np.column_stack([z, s])[rows])
    if groups is None:
        b_full, ll_full = logistic_fit(full, lab[rows])
        _, ll_red = logistic_fit(full[:, :-1], lab[rows])
        coef = b_full[-1]
    else:
        g = np.asarray(groups)[rows]
        b_full, ll_full, _ = conditional_logit_fit(full, lab[rows], g)
        _, ll_red, _ = conditional_logit_fit(full[:, :-1], lab[rows], g)
        coef = b_full[-1]
    chi2 = max(0.0, 2.0 * (ll_full - ll_red))
    return LikelihoodRatio(float(chi2), float(sps.chi2.sf(chi2, 1)), float(coef), int(rows.size))


def within_centre(x, groups) -> np.ndarray:
    """`x [n]` or `[n, F]` minus its question mean (each response's deviation from its question's mean)."""
    a = np.asarray(x, dtype=np.float64)
    inv, G = _group_codes(groups, a.shape[0])
    a2 = a[:, None] if a.ndim == 1 else a
    sums = np.zeros((G, a2.shape[1]))
    np.add.at(sums, inv, a2)
    means = sums / np.bincount(inv, minlength=G)[:, None]
    out = a2 - means[inv]
    return out[:, 0] if a.ndim == 1 else out
