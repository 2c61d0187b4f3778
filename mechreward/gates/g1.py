"""Gate G1, the correlation gate (GATES.md): protocol, statistics, controls and verdict.

Questions are split into discovery (feature selection) and validation (held out); a split
never shares a question. The pack is built on discovery; on validation the score
R = Σ w·pooled is tested against correctness: Spearman ρ and p (published), bootstrap 95% CI
over questions, permutation p, AUROC, Pearson. Controls on the same validation responses:
ρ of response length, of mean token log-prob, of the raw diff-of-means direction at the same
layer (mean-pooled residual; the R2 signal), of random packs of the same size and signs (null
distribution), and the partial Spearman of R controlling for length.

Within questions (what GRPO's group normalisation uses): on questions with ≥ 1 correct and ≥ 1
wrong rollout ("mixed"), the AUROC over (correct, wrong) pairs of the same question, a
bootstrap CI over mixed questions and a permutation p shuffling labels within questions — for
the pack and for every control (length, mean log-prob, direction, random packs). Incremental
validity: nested likelihood-ratio tests of the pack score beyond length and mean log-prob,
across questions (logistic regression) and within questions (conditional logistic regression
stratified by question), and the partial Spearman ρ controlling for both.

Verdict (published thresholds on ρ): ≥ 0.50 PASS-EXCELLENT, ≥ 0.30 PASS, ≥ 0.10 WEAK, else
FAIL. Flags beside it: CI_LOWER_BOUND_LE_0 (the CI's lower bound ≤ 0), CONFOUNDED
(|ρ_length| ≥ ρ), NOT_ABOVE_RANDOM_PACKS (ρ ≤ the 95th percentile of the random-pack null),
BEATEN_BY_BASELINE (a control's |ρ| ≥ the pack's ρ, or its within-question |AUROC − 0.5| ≥ the
pack's AUROC − 0.5; random packs: their 95th percentiles), NOT_SIGNIFICANT (p or permutation
p ≥ 0.05), UNINFORMATIVE_WITHIN (the within-question CI includes 0.5, or fewer than 2 mixed
questions). `conclusion` says in one sentence what the numbers mean for a GRPO reward.
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
from ..tasks.planted import MODES as PLANTED_MODES

THRESHOLDS = ((0.50, "PASS-EXCELLENT"), (0.30, "PASS"), (0.10, "WEAK"))
"""Published verdict thresholds on the validation Spearman ρ; below the last: FAIL."""
MIN_DISCOVERY = 4
"""Fewest discovery questions (two of each class are needed for a ddof=1 effect size)."""
MIN_VALIDATION = 10
"""Fewest validation questions the statistics are computed on."""
ALPHA = 0.05
"""Significance level of NOT_SIGNIFICANT."""


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


PASS_THRESHOLD = 0.30
"""The published PASS threshold on ρ (THRESHOLDS)."""


def pass_power(rho: float, n: int, threshold: float = PASS_THRESHOLD) -> float:
    """Probability that the validation ρ reaches `threshold` (G1 PASS or better) when the population
    Spearman ρ is `rho` and `n` responses are independent: Fisher z with the Bonett-Wright variance
    (1 + ρ²/2) / (n − 3) of Spearman's ρ. Several rollouts per question make the real spread wider.
    """
    if n < 4:
        raise ConfigError(f"pass_power needs n >= 4 responses, got {n}")
    if not -1.0 < rho < 1.0:
        raise ConfigError(f"pass_power needs -1 < rho < 1, got {rho}")
    se = np.sqrt((1.0 + rho * rho / 2.0) / (n - 3))
    return float(sps.norm.sf((np.arctanh(threshold) - np.arctanh(rho)) / se))


def rho_for_power(n: int, power: float = 0.8, threshold: float = PASS_THRESHOLD) -> float:
    """The population ρ that `pass_power` gives `power` at `n` responses (bisection)."""
    lo, hi = -0.999, 0.999
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pass_power(mid, n, threshold) < power else (lo, mid)
    return (lo + hi) / 2


def verdict(rho: float) -> str:
    for threshold, name in THRESHOLDS:
        if rho >= threshold:
            return name
    return "FAIL"


def gate_flags(rho: float, ci95: Sequence[float], length_rho: float | None, random_p95: float | None,
               p: float | None = None, permutation_p: float | None = None, beaten_by: Sequence[str] = (),
               within_ci95: Sequence[float] | None = None, within_checked: bool = False) -> list[str]:
    """The flags beside the verdict (module docstring). `within_checked`: the within-question flag applies."""
    flags = []
    if ci95[0] <= 0:
        flags.append("CI_LOWER_BOUND_LE_0")
    if length_rho is not None and abs(length_rho) >= rho:
        flags.append("CONFOUNDED")
    if random_p95 is not None and rho <= random_p95:
        flags.append("NOT_ABOVE_RANDOM_PACKS")
    if beaten_by:
        flags.append("BEATEN_BY_BASELINE")
    if (p is not None and p >= ALPHA) or (permutation_p is not None and permutation_p >= ALPHA):
        flags.append("NOT_SIGNIFICANT")
    if within_checked and (within_ci95 is None or within_ci95[0] <= 0.5 <= within_ci95[1]):
        flags.append("UNINFORMATIVE_WITHIN")
    return flags


def beaten_by(rho: float, within_auroc: float | None, controls: dict[str, tuple[float | None, float | None]],
              random_rho_p95: float | None = None, random_within_p95: float | None = None) -> list[str]:
    """Controls at least as good as the pack: `controls` maps a name to (across ρ, within AUROC).

    Across: |ρ_control| ≥ ρ_pack. Within: |AUROC_control − 0.5| ≥ AUROC_pack − 0.5 (a control is
    free to be used with either sign; the pack's sign was fixed on discovery). Random packs:
    their 95th percentiles (same signs as the pack) against the pack.
    """
    out = []
    for name, (c_rho, c_auc) in controls.items():
        if c_rho is not None and abs(c_rho) >= rho:
            out.append(f"{name}: |rho| {abs(c_rho):.3f} >= pack rho {rho:.3f}")
        if c_auc is not None and within_auroc is not None and abs(c_auc - 0.5) >= within_auroc - 0.5:
            out.append(f"{name}: within-question AUROC {c_auc:.3f} is as far from 0.5 as the pack's {within_auroc:.3f}")
    if random_rho_p95 is not None and random_rho_p95 >= rho:
        out.append(f"random packs: rho 95th pct {random_rho_p95:.3f} >= pack rho {rho:.3f}")
    if random_within_p95 is not None and within_auroc is not None and random_within_p95 >= within_auroc:
        out.append(f"random packs: within-question AUROC 95th pct {random_within_p95:.3f} >= pack {within_auroc:.3f}")
    return out


def beaten_names(entries: Sequence[str]) -> set[str]:
    """The control names in `beaten_by`'s entries ("direction", "mean log-prob", "length", "random packs")."""
    return {e.split(":", 1)[0] for e in entries}


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


def random_pack_scores(pooled_val: np.ndarray, alive: np.ndarray, weights: Sequence[float], n_packs: int,
                       seed: int) -> np.ndarray:
    """Scores `[n_packs, n]` of random packs: the pack's weights on features drawn from `alive`."""
    m = len(weights)
    if alive.size < m:
        raise DataError(f"only {alive.size} features fire on discovery; cannot draw random packs of {m}")
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(alive, size=m, replace=False) for _ in range(n_packs)])  # [K, m]
    w = np.asarray(weights, dtype=np.float64)
    return np.einsum("nkm,m->kn", pooled_val[:, picks], w)  # [K, n]


def random_pack_rhos(pooled_val: np.ndarray, labels: np.ndarray, alive: np.ndarray, weights: Sequence[float],
                     n_packs: int, seed: int, scores: np.ndarray | None = None) -> np.ndarray:
    """Spearman ρ of `n_packs` random packs: the pack's weights on features drawn from `alive`.

    pooled_val `[n, d_sae]` → `[n_packs]` (or pass their `scores [K, n]`). A pack whose score is
    constant on validation has ρ = 0.
    """
    if scores is None:
        scores = random_pack_scores(pooled_val, alive, weights, n_packs, seed)
    n_packs = scores.shape[0]
    ranks = sps.rankdata(scores, axis=1)
    y = sps.rankdata(labels)
    rc = ranks - ranks.mean(1, keepdims=True)
    yc = y - y.mean()
    denom = np.linalg.norm(rc, axis=1) * np.linalg.norm(yc)
    return np.divide(rc @ yc, denom, out=np.zeros(n_packs), where=denom > 0)


def _within_or_none(x, labels, groups, n_boot: int, n_perm: int, seed: int) -> dict:
    """`stats.within_summary` as a dict; all None when the control is not finite."""
    xa = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(xa)):
        return {"n_mixed_questions": None, "n_pairs": None, "auroc": None, "ci95": None, "permutation_p": None}
    return stats.within_summary(xa, labels, groups, n_boot=n_boot, n_perm=n_perm, seed=seed).to_dict()


def incremental_validity(score, labels, groups, length, logprob) -> dict:
    """The pack score beyond length and mean log-prob: LRTs across and within questions, partial ρ.

    Mean log-prob enters when it is finite everywhere; a constant covariate (every completion the same
    length, as on the planted organism) carries nothing and is left out (`dropped_constant`); an undefined
    test (too few mixed questions, no covariate left) is None.
    """
    covs = [np.asarray(length, dtype=np.float64)]
    names = ["length"]
    lp = np.asarray(logprob, dtype=np.float64)
    if np.all(np.isfinite(lp)):
        covs.append(lp)
        names.append("mean_logprob")
    constant = [n for n, c in zip(names, covs) if c.size and np.ptp(c) == 0]
    if len(constant) < len(names):
        covs = [c for n, c in zip(names, covs) if n not in constant]
        names = [n for n in names if n not in constant]
    else:
        constant = []
    z = np.column_stack(covs)
    out: dict = {"covariates": names, "dropped_constant": constant}
    for key, g in (("across", None), ("within", groups)):
        try:
            r = stats.incremental_lrt(score, labels, z, groups=g)
            out[key] = {"chi2": r.chi2, "p": r.p, "coef_per_sd": r.coef, "n": r.n}
        except DataError as e:
            out[key] = None
            out[f"{key}_undefined"] = str(e)
    try:
        pr = stats.partial_spearman(score, labels, z)
        out["partial_rho"] = {"rho": pr.stat, "p": pr.p}
    except DataError:
        out["partial_rho"] = None
    return out


def conclusion(r: dict) -> str:
    """One sentence a researcher can read: what G1 says about the pack as a GRPO reward, and why."""
    w = r["within"]["pack"]
    inc = r["incremental"]
    head = f"G1 {r['verdict']} on the published across-question statistic (rho = {r['spearman_rho']:.3f})"
    if w["auroc"] is None:
        return (head + f", but only {w['n_mixed_questions']} validation question(s) have both a correct and a wrong "
                "rollout, so nothing shows the pack ranks completions of the same question, which is all a GRPO "
                "reward can use (sample several rollouts per question).")
    lo, hi = w["ci95"]
    within = (f"within questions it ranks a correct above a wrong completion of the same question in "
              f"{w['auroc']:.0%} of pairs (CI {lo:.2f}-{hi:.2f}, {w['n_mixed_questions']} mixed questions, "
              f"permutation p {w['permutation_p']:.2g})")
    ctrl = r["within"]["controls"]
    best = max(((k, v["auroc"]) for k, v in ctrl.items() if k != "random_packs" and v.get("auroc") is not None),
               key=lambda kv: abs(kv[1] - 0.5), default=None)
    base = "" if best is None else f", against {abs(best[1] - 0.5) + 0.5:.2f} for the best cheap signal ({best[0]})"
    iw = inc.get("within")
    beyond = "" if iw is None else (f"; beyond length and log-prob it {'adds' if iw['p'] < ALPHA else 'adds nothing'} "
                                     f"within questions (LRT p = {iw['p']:.2g})")
    useful = ("UNINFORMATIVE_WITHIN" not in r["flags"] and "BEATEN_BY_BASELINE" not in r["flags"]
              and iw is not None and iw["p"] < ALPHA)
    tail = (": the within-question evidence supports it as a GRPO reward." if useful else
            ": the evidence does not support it as a GRPO reward over a cheaper signal." if "BEATEN_BY_BASELINE" in r["flags"]
            else ": the evidence does not support it as a GRPO reward.")
    return f"{head}; {within}{base}{beyond}{tail}"


def g1_statistics(score, labels, groups, length, logprob, direction_score, random_rhos, n_boot: int = 2000,
                  n_perm: int = 10000, seed: int = 0, random_within_aurocs=None) -> dict:
    """The report numbers of G1 from validation arrays (all `[n]`; random_rhos and random_within_aurocs `[K]`)."""
    summary = stats.correlation_summary(score, labels, groups=groups, n_boot=n_boot, n_perm=n_perm, seed=seed)
    length_rho = _rho_or_none(length, labels)
    try:
        partial = stats.partial_spearman(score, labels, length).stat
    except DataError:
        partial = None
    finite_lp = np.all(np.isfinite(logprob))
    null = np.asarray(random_rhos, dtype=np.float64)
    p95 = float(np.quantile(null, 0.95)) if null.size else None
    logprob_rho = _rho_or_none(logprob, labels) if finite_lp else None
    direction_rho = _rho_or_none(direction_score, labels)
    controls = {"length_rho": length_rho, "logprob_rho": logprob_rho,
                "direction_rho": direction_rho, "random_pack_rho_p95": p95,
                "partial_rho_length": partial,
                "random_pack_rho_mean": float(null.mean()) if null.size else None,
                "random_pack_p": float((1 + np.sum(null >= summary.rho)) / (1 + null.size)) if null.size else None,
                "n_random_packs": int(null.size)}
    rho = summary.rho
    # within questions: the pack and every control
    lab = np.asarray(labels).astype(int)
    wpack = _within_or_none(score, lab, groups, n_boot, n_perm, seed)
    wctrl = {"length": _within_or_none(length, lab, groups, n_boot, n_perm, seed),
             "logprob": _within_or_none(logprob, lab, groups, n_boot, n_perm, seed),
             "direction": _within_or_none(direction_score, lab, groups, n_boot, n_perm, seed)}
    rw = None if random_within_aurocs is None else np.asarray(random_within_aurocs, dtype=np.float64)
    if rw is not None and rw.size and wpack["auroc"] is not None:
        wctrl["random_packs"] = {"auroc_p95": float(np.quantile(rw, 0.95)), "auroc_mean": float(rw.mean()),
                                 "p": float((1 + np.sum(rw >= wpack["auroc"])) / (1 + rw.size)), "n": int(rw.size)}
    else:
        wctrl["random_packs"] = {"auroc_p95": None, "auroc_mean": None, "p": None, "n": 0}
    beaten = beaten_by(rho, wpack["auroc"], {"length": (length_rho, wctrl["length"]["auroc"]),
                                             "mean log-prob": (logprob_rho, wctrl["logprob"]["auroc"]),
                                             "direction": (direction_rho, wctrl["direction"]["auroc"])},
                       p95, wctrl["random_packs"]["auroc_p95"])
    flags = gate_flags(rho, summary.ci95, length_rho, p95, summary.p, summary.permutation_p, beaten,
                       wpack["ci95"], within_checked=True)
    out = {"spearman_rho": rho, "p_value": summary.p, "ci95": list(summary.ci95),
           "permutation_p": summary.permutation_p, "auroc": summary.auroc, "pearson_r": summary.pearson,
           "pearson_p": summary.pearson_p, "n_validation_responses": summary.n,
           "n_correct_validation": summary.n_pos, "verdict": verdict(rho), "flags": flags, "controls": controls,
           "n_mixed_questions": wpack["n_mixed_questions"], "within": {"pack": wpack, "controls": wctrl},
           "incremental": incremental_validity(score, lab, groups, length, logprob), "beaten_by": beaten,
           "power": {"threshold": PASS_THRESHOLD, "n": summary.n,
                     "rho_for_80pct_pass": rho_for_power(summary.n, 0.8) if summary.n >= 4 else None,
                     "pass_probability_at_observed_rho": (pass_power(rho, summary.n) if summary.n >= 4 and abs(rho) < 1
                                                          else None),
                     "assumes": "independent responses (Fisher z, Bonett-Wright variance); several rollouts per "
                                "question widen the real spread"}}
    out["conclusion"] = conclusion(out)
    return out


# --------------------------------------------------------------------------- ground truth

TRUE_MODES = PLANTED_MODES
"""Ground-truth solving modes a task may record per rollout (`mode`; `mechreward.tasks.planted`):
the first is the right rule."""


def _within_mode_auroc(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float | None:
    try:
        return float(stats.within_auroc(x, y, groups))
    except DataError:
        return None


def ground_truth_modes(records: Sequence[dict], codes_val: np.ndarray, val_index: np.ndarray, pack: FeaturePack,
                       score_val: np.ndarray, alive: np.ndarray) -> dict | None:
    """How well the pack recovers a task's recorded ground-truth mode on the validation responses.

    None when the rollouts record no `mode`. Else, on validation responses whose mode is determined
    (`right` or `swap`): per pack feature the AUROC of its pooled code for the right mode, the pack
    feature that separates the modes best (largest |AUROC − 0.5|, its `separation` = max(AUROC,
    1 − AUROC)), the best latent among all alive SAE latents for comparison, and the pack score's AUROC.
    The same within questions (`within_*`: AUROC over (right-mode, wrong-mode) pairs of completions of the
    same question, what a GRPO reward can use; the content of the question no longer differs between them).
    """
    modes = [records[i].get("mode") for i in val_index]
    if all(m is None for m in modes):
        return None
    counts = {m: modes.count(m) for m in sorted(set(map(str, modes)))}
    keep = np.array([m in TRUE_MODES for m in modes])
    out: dict = {"counts": counts, "n_determined": int(keep.sum())}
    y = np.array([m == TRUE_MODES[0] for m in modes])[keep].astype(int)
    if keep.sum() < 2 or y.min() == y.max():
        out["undefined"] = f"fewer than one validation response of each determined mode ({counts})"
        return out
    X = codes_val[keep]
    groups = np.array([str(records[i]["question_id"]) for i in val_index])[keep]
    feats = []
    for f in pack.features:
        a = float(stats.auroc(X[:, f["index"]], y))
        wa = _within_mode_auroc(X[:, f["index"]], y, groups)
        feats.append({"index": int(f["index"]), "role": f.get("role"), "auroc_right_mode": a,
                      "separation": max(a, 1 - a), "within_auroc_right_mode": wa,
                      "within_separation": None if wa is None else max(wa, 1 - wa)})
    best = max(feats, key=lambda d: d["separation"])
    within = [d for d in feats if d["within_separation"] is not None]
    if within:
        out["best_pack_latent_within"] = max(within, key=lambda d: d["within_separation"])
        out["pack_score_within_auroc_right_mode"] = _within_mode_auroc(score_val[keep], y, groups)
    all_auc = np.asarray(stats.auroc(X[:, alive], y), dtype=np.float64).reshape(-1) if alive.size else np.zeros(0)
    out.update({"pack_features": feats, "best_pack_latent": best,
                "pack_score_auroc_right_mode": float(stats.auroc(score_val[keep], y))})
    if all_auc.size:
        j = int(np.argmax(np.abs(all_auc - 0.5)))
        out["best_alive_latent"] = {"index": int(alive[j]), "auroc_right_mode": float(all_auc[j]),
                                    "separation": float(max(all_auc[j], 1 - all_auc[j])),
                                    "n_alive": int(alive.size)}
    return out


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
                                      "validation": sorted(val_q), "seed": protocol.seed},
                          groups=qids[disc], lengths=rs.lengths[disc])
    score = pack.score_pooled(codes[val])
    resid = rs.resid(layer, "mean").numpy().astype(np.float64)  # [R, d_model]
    direction = resid[disc][labels[disc] == 1].mean(0) - resid[disc][labels[disc] == 0].mean(0)
    null, null_within = np.zeros(0), None
    if protocol.n_random_packs > 0:
        rscores = random_pack_scores(codes[val], fs.index, pack.weights, protocol.n_random_packs, protocol.seed + 1)
        null = random_pack_rhos(codes[val], labels[val], fs.index, pack.weights, protocol.n_random_packs,
                                protocol.seed + 1, scores=rscores)
        if stats.mixed_questions(labels[val], qids[val]).any():
            null_within = stats.within_auroc_many(rscores, labels[val], qids[val])
    report = g1_statistics(score, labels[val], qids[val], rs.lengths[val], rs.mean_logprobs[val],
                           resid[val] @ direction, null, protocol.n_boot, protocol.n_perm, protocol.seed,
                           random_within_aurocs=null_within)
    report = {**report, "n_discovery": len(disc_q), "n_validation": len(val_q),
              "n_discovery_responses": int(len(disc)), "n_correct_discovery": int(labels[disc].sum()),
              "n_features": len(pack.features), "n_features_alive": int(fs.index.size),
              "pooling": protocol.pooling, "layer": layer, "model": model, "sae_sha256": sae_ref.get("sha256"),
              "prompt_format": pack.provenance.get("prompt_format")}
    truth = ground_truth_modes(rs.records, codes[val], val, pack, score, fs.index)
    if truth is not None:
        report["ground_truth_mode"] = truth
    pack.validation = {k: report[k] for k in ("spearman_rho", "p_value", "ci95", "permutation_p", "auroc",
                                              "pearson_r", "n_validation", "n_correct_validation", "verdict",
                                              "flags", "controls", "n_mixed_questions", "within", "incremental",
                                              "beaten_by", "conclusion")}
    pack.validation["gate"] = "G1"
    return G1Result(report, pack, fs, score, labels[val], null)
