"""Gate G1, the correlation gate (GATES.md): protocol, statistics, controls and verdict.

Questions are split into discovery (feature selection) and validation (held out); a split
never shares a question. The pack is built on discovery; on validation the score
R = Σ w·pooled is tested against correctness: Spearman ρ and p (published), bootstrap 95% CI
over questions, permutation p, AUROC, Pearson. Controls on the same validation responses:
ρ of response length, of mean token log-prob, of the raw diff-of-means direction at the same
layer (mean-pooled residual; the R2 signal), of random packs of the same size and signs (null
distribution), and the partial Spearman of R controlling for length.

Verdict (published thresholds on ρ): ≥ 0.50 PASS-EXCELLENT, ≥ 0.30 PASS, ≥ 0.10 WEAK, else
FAIL. Flags: CI_LOWER_BOUND_LE_0 (the CI's lower bound ≤ 0), CONFOUNDED (|ρ_length| ≥ ρ), and
NOT_ABOVE_RANDOM_PACKS (ρ ≤ the 95th percentile of the random-pack null).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats as sps

from .. import stats
from ..errors import ConfigError, DataError
from ..probe import FeaturePack, FeatureStats, SelectionConfig, build_pack, check_labels
from ..prompts import format_of_header

THRESHOLDS = ((0.50, "PASS-EXCELLENT"), (0.30, "PASS"), (0.10, "WEAK"))
"""Published verdict thresholds on the validation Spearman ρ; below the last: FAIL."""
MIN_DISCOVERY = 4
"""Fewest discovery questions (two of each class are needed for a ddof=1 effect size)."""
MIN_VALIDATION = 10
"""Fewest validation questions the statistics are computed on."""


@dataclass
class G1Protocol:
    """The G1 settings that are not about producing rollouts."""

    n_discovery: int = 50
    """Discovery questions (published 50)."""
    n_validation: int | None = 100
    """Validation questions (published 100); null = every question not in discovery."""
    pooling: str = "mean"
    """Pooling of SAE codes over completion tokens (mean, max, last, sum)."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    n_random_packs: int = 1000
    """Random packs (same size and signs, alive features) for the null distribution."""
    n_boot: int = 2000
    n_perm: int = 10000
    seed: int = 0
    """Seeds the split, the bootstrap, the permutations and the random packs."""


def verdict(rho: float) -> str:
    for threshold, name in THRESHOLDS:
        if rho >= threshold:
            return name
    return "FAIL"


def gate_flags(rho: float, ci95: Sequence[float], length_rho: float | None, random_p95: float | None) -> list[str]:
    flags = []
    if ci95[0] <= 0:
        flags.append("CI_LOWER_BOUND_LE_0")
    if length_rho is not None and abs(length_rho) >= rho:
        flags.append("CONFOUNDED")
    if random_p95 is not None and rho <= random_p95:
        flags.append("NOT_ABOVE_RANDOM_PACKS")
    return flags


# --------------------------------------------------------------------------- split

def split_questions(question_ids: Sequence[str], n_discovery: int, n_validation: int | None,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint discovery and validation question ids, drawn by a seeded shuffle of the distinct ids."""
    distinct = list(dict.fromkeys(str(q) for q in question_ids))
    if n_discovery < MIN_DISCOVERY:
        raise ConfigError(f"n_discovery must be >= {MIN_DISCOVERY}, got {n_discovery}")
    if n_validation is not None and n_validation < MIN_VALIDATION:
        raise ConfigError(f"n_validation must be >= {MIN_VALIDATION} (or null), got {n_validation}")
    need = n_discovery + (n_validation if n_validation is not None else MIN_VALIDATION)
    if len(distinct) < need:
        raise DataError(f"the rollouts hold {len(distinct)} questions; G1 needs {need} "
                        f"(n_discovery={n_discovery}, n_validation={n_validation})")
    order = np.random.default_rng(seed).permutation(len(distinct))
    shuffled = [distinct[i] for i in order]
    disc = shuffled[:n_discovery]
    val = shuffled[n_discovery:] if n_validation is None else shuffled[n_discovery:n_discovery + n_validation]
    check_disjoint(disc, val)
    return disc, val


def check_disjoint(discovery: Sequence[str], validation: Sequence[str]) -> None:
    both = sorted(set(discovery) & set(validation))
    if both:
        raise DataError(f"discovery and validation share {len(both)} question(s), e.g. {both[:3]}: "
                        "held-out statistics would not be held out")


# --------------------------------------------------------------------------- statistics

def _rho_or_none(x, y) -> float | None:
    """Spearman ρ, or None when it is undefined (a constant control, e.g. every response the same length)."""
    try:
        return stats.spearman(x, y).stat
    except DataError:
        return None


def random_pack_rhos(pooled_val: np.ndarray, labels: np.ndarray, alive: np.ndarray, weights: Sequence[float],
                     n_packs: int, seed: int) -> np.ndarray:
    """Spearman ρ of `n_packs` random packs: the pack's weights on features drawn from `alive`.

    pooled_val `[n, d_sae]` → `[n_packs]`. A pack whose score is constant on validation has ρ = 0.
    """
    m = len(weights)
    if alive.size < m:
        raise DataError(f"only {alive.size} features fire on discovery; cannot draw random packs of {m}")
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(alive, size=m, replace=False) for _ in range(n_packs)])  # [K, m]
    w = np.asarray(weights, dtype=np.float64)
    scores = np.einsum("nkm,m->kn", pooled_val[:, picks], w)  # [K, n]
    ranks = sps.rankdata(scores, axis=1)
    y = sps.rankdata(labels)
    rc = ranks - ranks.mean(1, keepdims=True)
    yc = y - y.mean()
    denom = np.linalg.norm(rc, axis=1) * np.linalg.norm(yc)
    return np.divide(rc @ yc, denom, out=np.zeros(n_packs), where=denom > 0)


def g1_statistics(score, labels, groups, length, logprob, direction_score, random_rhos, n_boot: int = 2000,
                  n_perm: int = 10000, seed: int = 0) -> dict:
    """The report numbers of G1 from validation arrays (all `[n]`; random_rhos `[K]`)."""
    summary = stats.correlation_summary(score, labels, groups=groups, n_boot=n_boot, n_perm=n_perm, seed=seed)
    length_rho = _rho_or_none(length, labels)
    try:
        partial = stats.partial_spearman(score, labels, length).stat
    except DataError:
        partial = None
    finite_lp = np.all(np.isfinite(logprob))
    null = np.asarray(random_rhos, dtype=np.float64)
    p95 = float(np.quantile(null, 0.95)) if null.size else None
    controls = {"length_rho": length_rho, "logprob_rho": _rho_or_none(logprob, labels) if finite_lp else None,
                "direction_rho": _rho_or_none(direction_score, labels), "random_pack_rho_p95": p95,
                "partial_rho_length": partial,
                "random_pack_rho_mean": float(null.mean()) if null.size else None,
                "random_pack_p": float((1 + np.sum(null >= summary.rho)) / (1 + null.size)) if null.size else None,
                "n_random_packs": int(null.size)}
    rho = summary.rho
    return {"spearman_rho": rho, "p_value": summary.p, "ci95": list(summary.ci95),
            "permutation_p": summary.permutation_p, "auroc": summary.auroc, "pearson_r": summary.pearson,
            "pearson_p": summary.pearson_p, "n_validation_responses": summary.n,
            "n_correct_validation": summary.n_pos, "verdict": verdict(rho),
            "flags": gate_flags(rho, summary.ci95, length_rho, p95), "controls": controls}


# --------------------------------------------------------------------------- the gate

@dataclass
class G1Result:
    report: dict
    """report.json contents (without pack_path, which the caller adds)."""
    pack: FeaturePack
    """The pack built on discovery, validation block filled."""
    feature_stats: FeatureStats
    score: np.ndarray
    """R on validation `[n_val]`."""
    labels: np.ndarray
    """Validation correctness `[n_val]`."""
    random_rhos: np.ndarray
    """Null distribution `[n_random_packs]`."""


def _prompt_format(header: dict) -> dict | None:
    try:
        return format_of_header(header).to_dict()
    except DataError:
        return None


def run_gate(rs, protocol: G1Protocol, sae_ref: dict, model: str, layer: int) -> G1Result:
    """G1 on a `RolloutSet` holding pooled codes of the SAE `sae_ref` at `layer` and its raw residuals."""
    qids = rs.question_ids
    disc_q, val_q = split_questions(qids, protocol.n_discovery, protocol.n_validation, protocol.seed)
    disc = np.flatnonzero(np.isin(qids, disc_q))
    val = np.flatnonzero(np.isin(qids, val_q))
    check_disjoint(qids[disc].tolist(), qids[val].tolist())
    labels = rs.labels
    no_answer = rs.no_answer
    check_labels(labels[disc], f"discovery split ({len(disc_q)} questions)", no_answer[disc])
    check_labels(labels[val], f"validation split ({len(val_q)} questions)", no_answer[val])
    codes = rs.codes(protocol.pooling).numpy()  # [R, d_sae]
    pack, fs = build_pack(codes[disc], labels[disc], sae_ref, model, layer, protocol.pooling, protocol.selection,
                          provenance={"rollouts": str(rs.dir), "task": rs.header.get("task"),
                                      "sampling": rs.header.get("sampling"), "discovery": sorted(disc_q),
                                      "prompt_format": _prompt_format(rs.header),
                                      "validation": sorted(val_q), "seed": protocol.seed})
    score = pack.score_pooled(codes[val])
    resid = rs.resid(layer, "mean").numpy().astype(np.float64)  # [R, d_model]
    direction = resid[disc][labels[disc] == 1].mean(0) - resid[disc][labels[disc] == 0].mean(0)
    null = random_pack_rhos(codes[val], labels[val], fs.index, pack.weights, protocol.n_random_packs,
                            protocol.seed + 1) if protocol.n_random_packs > 0 else np.zeros(0)
    report = g1_statistics(score, labels[val], qids[val], rs.lengths[val], rs.mean_logprobs[val],
                           resid[val] @ direction, null, protocol.n_boot, protocol.n_perm, protocol.seed)
    report = {**report, "n_discovery": len(disc_q), "n_validation": len(val_q),
              "n_discovery_responses": int(len(disc)), "n_correct_discovery": int(labels[disc].sum()),
              "n_features": len(pack.features), "n_features_alive": int(fs.index.size),
              "pooling": protocol.pooling, "layer": layer, "model": model, "sae_sha256": sae_ref.get("sha256"),
              "prompt_format": pack.provenance.get("prompt_format")}
    pack.validation = {k: report[k] for k in ("spearman_rho", "p_value", "ci95", "permutation_p", "auroc",
                                              "pearson_r", "n_validation", "n_correct_validation", "verdict",
                                              "flags", "controls")}
    pack.validation["gate"] = "G1"
    return G1Result(report, pack, fs, score, labels[val], null)
