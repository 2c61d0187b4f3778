"""Calibration of G1's statistics layer alone (no model): null scores pass at most at the nominal rate,
the within-question permutation p is uniform under the null, and a planted score of known strength
passes as often as the power G1 reports (`pass_power`) says.

Rollouts are simulated as G1 sees them: questions with their own solve rate (Beta(1.2, 1.2)),
several rollouts per question, and a score with a question-level effect of its own (clustering
in both the labels and the score, independent of each other under the null).
"""

import numpy as np
import pytest
from scipy import stats as sps

from mechreward import stats
from mechreward.errors import ConfigError
from mechreward.gates.g1 import PASS_THRESHOLD, gate_flags, pass_power, rho_for_power, verdict

N_Q, K = 60, 4


def _rollouts(seed: int, n_q: int = N_Q, k: int = K, delta: float = 0.0, question_sd: float = 1.0):
    rng = np.random.default_rng(seed)
    solve = rng.beta(1.2, 1.2, n_q)
    groups = np.repeat(np.arange(n_q), k).astype(str)
    labels = (rng.random(n_q * k) < np.repeat(solve, k)).astype(int)
    score = question_sd * np.repeat(rng.normal(size=n_q), k) + rng.normal(size=n_q * k) + delta * labels
    return score, labels, groups


def _passes(score, labels, groups, seed) -> bool:
    """G1's PASS (or PASS-EXCELLENT) without a significance or CI flag, from the gate's own functions."""
    summ = stats.correlation_summary(score, labels, groups=groups, n_boot=200, n_perm=200, seed=seed)
    flags = gate_flags(summ.rho, summ.ci95, None, None, summ.p, summ.permutation_p)
    return verdict(summ.rho).startswith("PASS") and "NOT_SIGNIFICANT" not in flags and "CI_LOWER_BOUND_LE_0" not in flags


def test_null_scores_pass_at_most_five_percent_of_seeds():
    passed = [_passes(*_rollouts(seed), seed) for seed in range(200)]
    assert np.mean(passed) <= 0.05


def test_across_question_permutation_p_permutes_whole_questions_and_holds_its_level_under_clustering():
    """With a question effect in both the score and correctness (independent of each other), permuting single
    responses treats a question's rollouts as independent draws and rejects too often; permuting whole
    questions (G1's permutation p when it knows the questions) rejects at the nominal 5%."""
    grouped, responses = [], []
    for seed in range(300):
        score, labels, groups = _rollouts(seed)
        grouped.append(stats.permutation_p(score, labels, n_perm=499, seed=seed, groups=groups))
        responses.append(stats.permutation_p(score, labels, n_perm=499, seed=seed))
    grouped, responses = np.array(grouped), np.array(responses)
    se = np.sqrt(0.05 * 0.95 / grouped.size)
    assert abs(np.mean(grouped < 0.05) - 0.05) <= 3 * se
    assert sps.kstest(grouped, "uniform").pvalue > 0.01
    assert np.mean(responses < 0.05) > 0.05 + 3 * se  # the response-level p is anti-conservative here
    # G1's summary uses the question permutation when given the questions
    score, labels, groups = _rollouts(0)
    assert stats.correlation_summary(score, labels, groups=groups, n_boot=10, n_perm=499).permutation_p == \
        stats.permutation_p(score, labels, n_perm=499, seed=0, groups=groups)


def test_block_permutation_moves_each_question_whole_onto_a_question_of_the_same_size():
    rng = np.random.default_rng(0)
    groups = np.array(list("aaabbbccdde") + ["f"] * 3)  # sizes 3, 3, 2, 2, 1, 3
    blocks = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    idx = stats._block_permutation_indices(rng, blocks, groups.size, 500)
    for row in idx:
        assert sorted(row) == list(range(groups.size))  # a permutation
        for b in blocks:
            src = set(groups[row[b]])
            assert len(src) == 1 and (groups == src.pop()).sum() == len(b)  # one whole group of that size
    # every same-size question is reached, and orders within a question vary
    assert {groups[r[0]] for r in idx} == {"a", "b", "f"} and len({tuple(r[:3]) for r in idx}) > 6


def test_within_question_permutation_p_is_uniform_under_the_null():
    ps = np.array([stats.within_summary(*_rollouts(seed), n_boot=10, n_perm=999, seed=seed).permutation_p
                   for seed in range(300)])
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    # the rejection rate at 5%: within 3 binomial SE of 0.05 (and not conservative to uselessness)
    rate = np.mean(ps < 0.05)
    assert abs(rate - 0.05) <= 3 * np.sqrt(0.05 * 0.95 / ps.size)


def test_within_question_permutation_p_rejects_a_planted_within_signal():
    ps = [stats.within_summary(*_rollouts(seed, delta=1.0), n_boot=10, n_perm=999, seed=seed).permutation_p
          for seed in range(40)]
    assert np.mean(np.array(ps) < 0.05) >= 0.9


def _population_rho(delta: float, question_sd: float) -> float:
    s, lab, _ = _rollouts(10_000, n_q=100_000, k=1, delta=delta, question_sd=question_sd)
    return float(sps.spearmanr(s, lab).statistic)


@pytest.mark.parametrize("k,question_sd,delta,tol", [(1, 0.0, 0.62, 3.0), (K, 1.0, 0.95, 4.0)])
def test_planted_score_passes_as_often_as_the_reported_power(k, question_sd, delta, tol):
    """One rollout per question (the published default: exactly the power formula's assumption), and
    four per question with a question effect in the score (clustered: within 4 binomial SE)."""
    rho_true = _population_rho(delta, question_sd)
    n = (N_Q * K // k) * k  # 240 responses either way
    claimed = pass_power(rho_true, n)
    assert 0.3 < claimed < 0.9  # a strength where power is informative, not 0 or 1
    seeds = range(400)
    rhos = np.array([stats.spearman(*_rollouts(s, n_q=n // k, k=k, delta=delta, question_sd=question_sd)[:2]).stat
                     for s in seeds])
    rate = np.mean(rhos >= PASS_THRESHOLD)
    assert abs(rate - claimed) <= tol * np.sqrt(claimed * (1 - claimed) / len(seeds)), (rate, claimed, rho_true)


def test_power_helpers():
    assert pass_power(PASS_THRESHOLD, 200) == pytest.approx(0.5)
    r80 = rho_for_power(240, 0.8)
    assert pass_power(r80, 240) == pytest.approx(0.8, abs=1e-6) and PASS_THRESHOLD < r80 < 0.5
    assert pass_power(0.5, 1000) > pass_power(0.5, 100) > pass_power(0.2, 100)
    with pytest.raises(ConfigError, match="n >= 4"):
        pass_power(0.3, 3)
    with pytest.raises(ConfigError, match="rho"):
        pass_power(1.0, 100)
