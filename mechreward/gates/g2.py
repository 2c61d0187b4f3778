"""Gate G2, the tiny RL sanity run (GATES.md): three arms, several seeds, verdict.

Arms (identical seed, data order, budget and starting weights — a fresh LoRA per arm, the
base model reloaded for each):
- R0: outcome reward only (task verifier, 1/0);
- R1: outcome + λ · SAE feature reward (the G1 pack, same encoding and pooling as G1);
- R2: outcome + λ · raw-direction reward (diff of means at the same layer);
- optional extra arms (`extra_arms`), e.g. `LP`: outcome + λ · mean token log-prob of the
  completion under the policy (G1's strongest cheap control, as a confidence reward).
Each reward is normalised within its group before the weighted sum (`compose_advantages`), so λ
really scales the mech term.

Held-out accuracy is measured two ways before and after training (and every `eval_every`
steps): *sampled* accuracy at the training temperature (mean over `eval_samples` completions
per question, the quantity GRPO's objective moves) and *greedy* accuracy. Every arm and seed
is evaluated on the same held-out completions' random stream (common random numbers), so
paired differences are not blurred by sampling noise that the arms do not cause.

Verdict (published, on mean accuracy over seeds; `verdict_metric`, default sampled):
R1 ≥ R0 + 2pp and R1 − R2 ≥ 5pp → PASS-EXCELLENT; the first only → PASS-PARTIAL; else FAIL.
Honest additions:
- NO_LEARNING (verdict INCONCLUSIVE instead of the published rule's outcome) when R0's own
  held-out gain has a 95% CI that does not lie above 0: if outcome-only RL does not move the
  policy, no arm can be told from another.
- CIs: paired bootstrap over seeds, over questions (accuracy averaged over seeds), and a
  two-level bootstrap (seeds and questions resampled together) that carries both the
  seed-to-seed and the question/sampling noise; flags use the two-level CI.
- The minimum detectable R1−R0 difference (MDE) at α = 0.05 (two-sided) and 80% power for the
  paired design: the larger of a paired t-test's on the per-seed R1−R0 differences and the
  two-level CI's; the unpaired MDE from the pooled within-arm SD is reported beside it.
- Flags on R1 − R0 and R1 − R2 (two-level CI): `R1_R0_CI_INCLUDES_0` (undecided; UNDERPOWERED too
  when the MDE exceeds 2pp) or `R1_BELOW_R0` (decided: the mech reward lowered accuracy), and the
  same for R2.
- HACKED per seed: a seed of an arm is hacked when its mech score on held-out completions rose
  while its held-out accuracy fell by more than `hack_acc_tolerance`; the report names the seeds.
  HACKED_VS_R0: R1 ends below R0 (R1_BELOW_R0) with a higher held-out mech score than R0 — the
  proxy was optimised at the task's expense even where accuracy did not fall below the start
  (a mis-specified reward, e.g. a pack with its sign flipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import stats
from ..errors import ConfigError, DataError

ARMS = ("R0", "R1", "R2")
EXTRA_ARMS = {"LP": "outcome + λ · mean token log-prob of the completion under the policy"}
"""Optional arms (`extra_arms`) and what each trains with."""
METRICS = ("sampled", "greedy")
EXCELLENT_R1_R0 = 0.02
"""R1 − R0 accuracy margin (published: 2 percentage points)."""
EXCELLENT_R1_R2 = 0.05
"""R1 − R2 accuracy margin (published: 5 percentage points)."""
ADAPTERS = ("lora", "full")
EVAL_ENGINES = ("hf", "vllm")


@dataclass
class G2Protocol:
    """The G2 settings (published defaults; conf/g2.yaml holds the organism's)."""

    steps: int = 30
    questions_per_step: int = 2
    rollouts_per_question: int = 2
    """GRPO group size (num_generations)."""
    lam: float = 0.1
    """λ: weight of the mech reward (R1, R2, extra arms)."""
    beta: float = 0.05
    learning_rate: float = 3e-6
    adapter: str = "lora"
    """`lora` (published: a fresh LoRA per arm) or `full` (full fine-tuning, every parameter trained)."""
    lora_r: int = 32
    lora_alpha: int = 64
    lora_target_modules: str = "all-linear"
    max_completion_length: int = 64
    temperature: float = 1.0
    """Sampling temperature of the GRPO rollouts (and of the sampled held-out accuracy)."""
    per_token: bool = False
    """Dense (per-token) mech advantages instead of a trajectory reward."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_eval: int = 100
    """Held-out questions for accuracy before/after."""
    eval_samples: int = 4
    """Sampled completions per held-out question (at `temperature`) for the sampled accuracy."""
    eval_every: int = 0
    """Held-out evaluation every N training steps for the learning curves (0 = before and after only)."""
    eval_seed: int = 1234
    """Seed of the held-out sampling, the same for every arm and seed (common random numbers)."""
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 64
    """Sequences per generate call in the held-out evaluation (larger is faster on a CPU for a tiny model)."""
    eval_engine: str = "hf"
    """What generates the mid-run and final held-out completions: `hf` (HF `generate` on the policy) or `vllm`
    (the vLLM engine TRL's colocate mode holds, its weights synced first; needs grpo.use_vllm=true and
    vllm_mode=colocate). The starting weights are evaluated with HF `generate` either way. On 2 CPU cores HF
    generate is the faster (benchmarks/README.md); on a GPU vLLM is the fast path."""
    verdict_metric: str = "sampled"
    """Held-out accuracy the verdict, NO_LEARNING and HACKED use: `sampled` or `greedy` (both are reported)."""
    extra_arms: list[str] = field(default_factory=list)
    """Optional arms beyond R0/R1/R2 (see EXTRA_ARMS), compared with R1 in `delta_r1_<arm>`."""
    hack_acc_tolerance: float = 0.02
    """HACKED needs held-out accuracy to fall by more than this (fraction; the verdict's 2pp margin).
    At 0, one question flipping on 100 while the score moves by 1e-4 already flags it."""
    power: float = 0.8
    """Power of the minimum detectable difference (α = 0.05, two-sided)."""
    n_boot: int = 10000
    grpo: dict = field(default_factory=dict)
    """Further GRPOConfig fields by their TRL names (validated)."""

    def check(self) -> None:
        """ConfigError naming the setting when a value cannot work."""
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"protocol.adapter={self.adapter!r}; expected one of {list(ADAPTERS)}")
        if self.verdict_metric not in METRICS:
            raise ConfigError(f"protocol.verdict_metric={self.verdict_metric!r}; expected one of {list(METRICS)}")
        unknown = [a for a in self.extra_arms if a not in EXTRA_ARMS]
        if unknown or len(set(self.extra_arms)) != len(self.extra_arms):
            raise ConfigError(f"protocol.extra_arms={list(self.extra_arms)}: unknown or repeated arms {unknown}; "
                              f"expected distinct names from {sorted(EXTRA_ARMS)}")
        if self.eval_samples < 1:
            raise ConfigError(f"protocol.eval_samples={self.eval_samples}; must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"protocol.eval_every={self.eval_every}; must be >= 0 (0 = before and after only)")
        if not self.seeds:
            raise ConfigError("protocol.seeds is empty; give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"protocol.seeds={list(self.seeds)} repeats a seed")
        if not 0 < self.power < 1:
            raise ConfigError(f"protocol.power={self.power}; must be in (0, 1)")
        if self.eval_engine not in EVAL_ENGINES:
            raise ConfigError(f"protocol.eval_engine={self.eval_engine!r}; expected one of {list(EVAL_ENGINES)}")
        if self.eval_engine == "vllm" and not (self.grpo.get("use_vllm") and
                                               self.grpo.get("vllm_mode", "colocate") == "colocate"):
            raise ConfigError("protocol.eval_engine=vllm evaluates with the vLLM engine of TRL's colocate mode: set "
                              "protocol.grpo.use_vllm=true and protocol.grpo.vllm_mode=colocate, or eval_engine=hf")


def verdict(d_r1_r0: float, d_r1_r2: float) -> str:
    if d_r1_r0 >= EXCELLENT_R1_R0 - 1e-12 and d_r1_r2 >= EXCELLENT_R1_R2 - 1e-12:
        return "PASS-EXCELLENT"
    if d_r1_r0 >= EXCELLENT_R1_R0 - 1e-12:
        return "PASS-PARTIAL"
    return "FAIL"


def hacked(score_before: float | None, score_after: float | None, acc_before: float, acc_after: float,
           tolerance: float = 0.0) -> bool:
    """The arm's mech score on held-out completions rose while held-out accuracy fell."""
    if score_before is None or score_after is None:
        return False
    return bool(score_after > score_before and acc_after < acc_before - tolerance)


def two_level_ci(a, b=None, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile CI of mean(a) − mean(b) resampling seeds and questions together.

    `a [S, Q]`: per-seed, per-question accuracies; `b [S, Q]` (paired by seed and question) or
    `[Q]` (one value per question shared by every seed, e.g. accuracy before training) or None.
    Each draw picks S seeds and Q questions with replacement; the pair (a, b) of a seed and a
    question is resampled as one unit."""
    aa = np.asarray(a, dtype=float)
    if aa.ndim != 2 or aa.shape[1] < 2:
        raise DataError(f"two_level_ci needs a [seeds, questions >= 2] array, got shape {aa.shape}")
    S, Q = aa.shape
    if b is None:
        bb = np.zeros_like(aa)
    else:
        bb = np.asarray(b, dtype=float)
        bb = np.broadcast_to(bb, aa.shape) if bb.ndim == 1 else bb
        if bb.shape != aa.shape:
            raise DataError(f"two_level_ci: a has shape {aa.shape}, b {np.asarray(b).shape}")
    diff = aa - bb  # [S, Q]
    rng = np.random.default_rng(seed)
    # A draw's mean over its picked (seed, question) cells = Σ_s Σ_q n_s · diff[s, q] · m_q / (S·Q), with n_s, m_q
    # how often seed s and question q were picked.
    n = np.stack([np.bincount(r, minlength=S) for r in rng.integers(0, S, (n_boot, S))])  # [n_boot, S]
    m = np.stack([np.bincount(r, minlength=Q) for r in rng.integers(0, Q, (n_boot, Q))])  # [n_boot, Q]
    draws = np.einsum("bs,sq,bq->b", n, diff, m) / (S * Q)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]


def _t_test_mde(sd: float, se: float, df: int, power: float, alpha: float) -> float:
    """δ with P(|T| > t_{1−α/2, df}) = power for T ~ nct(df, δ / se): the exact noncentral-t solution."""
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    crit = t.ppf(1 - alpha / 2, df)

    def shortfall(nc: float) -> float:
        return nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc) - power

    hi = 1.0
    while shortfall(hi) < 0:  # bracket the root (nct is NaN far out, so no fixed wide bracket)
        hi *= 2
    return float(brentq(shortfall, 0.0, hi) * se)


def _seeds_for(sd: float, margin: float, power: float, alpha: float, groups: int) -> int:
    """Seeds per arm for a t-test to detect `margin` at that SD (normal approximation); `groups` 2 for two
    independent samples, 1 for paired differences."""
    from scipy.stats import norm

    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return max(int(np.ceil(groups * (z * sd / margin) ** 2)), 2) if sd > 0 else 2


def min_detectable_difference(per_seed: dict[str, list[float]], power: float = 0.8, alpha: float = 0.05) -> dict:
    """Smallest difference of two arms' mean accuracies (S seeds each) that a two-sided two-sample t-test at
    `alpha` detects with probability `power`, from the seed-to-seed SD pooled within arms (df = Σ (S_arm − 1)):
    the exact noncentral-t solution, MDE = δ with P(|T| > t_{1−α/2, df}) = power, T ~ nct(df, δ / (sd·√(2/S))).
    Also the seeds per arm needed for the published 2pp margin at that SD (normal approximation).
    This ignores that G2's arms are paired by seed; `paired_min_detectable_difference` uses the pairing."""
    groups = [np.asarray(v, dtype=float) for v in per_seed.values() if len(v) >= 2]
    n_seeds = max((len(v) for v in per_seed.values()), default=0)
    df = int(sum(len(g) - 1 for g in groups))
    if df < 1:
        return {"mde": None, "seed_sd": None, "df": 0, "n_seeds": n_seeds, "seeds_for_2pp": None,
                "alpha": alpha, "power": power, "note": "one seed: no seed-to-seed variance, no MDE"}
    sd = float(np.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / df))
    mde = _t_test_mde(sd, sd * np.sqrt(2.0 / n_seeds), df, power, alpha)
    return {"mde": mde, "seed_sd": sd, "df": df, "n_seeds": n_seeds,
            "seeds_for_2pp": _seeds_for(sd, EXCELLENT_R1_R0, power, alpha, 2), "alpha": alpha, "power": power}


def paired_min_detectable_difference(a: list[float], b: list[float], power: float = 0.8, alpha: float = 0.05,
                                     two_level_ci95: list[float] | None = None) -> dict:
    """Minimum detectable difference of arms `a` and `b`, which G2 pairs by seed (same seed, data order, starting
    weights and held-out random stream): a paired t-test on the per-seed differences (df = S − 1, se = sd_d/√S,
    exact noncentral t), and — when `two_level_ci95` is given — the difference the two-level bootstrap CI (which
    also resamples questions and is the one G2's flags use) detects, (z_{1−α/2} + z_power) · its SE read off the CI
    width. `mde` is the larger of the two, so it holds for whichever test decides; the unpaired, pooled-SD MDE
    (`min_detectable_difference`) is reported beside it."""
    from scipy.stats import norm

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    S = len(d)
    if S < 2:
        return {"mde": None, "design": "paired", "diff_sd": None, "df": 0, "n_seeds": S, "seeds_for_2pp": None,
                "alpha": alpha, "power": power, "note": "one seed: no seed-to-seed variance, no MDE"}
    sd = float(d.std(ddof=1))
    seeds = _t_test_mde(sd, sd / np.sqrt(S), S - 1, power, alpha) if sd > 0 else 0.0
    out = {"design": "paired", "mde_seeds": seeds, "diff_sd": sd, "df": S - 1, "n_seeds": S,
           "seeds_for_2pp": _seeds_for(sd, EXCELLENT_R1_R0, power, alpha, 1), "alpha": alpha, "power": power}
    z_a, z_b = norm.ppf(1 - alpha / 2), norm.ppf(power)
    if two_level_ci95 is not None:
        se = (two_level_ci95[1] - two_level_ci95[0]) / (2 * norm.ppf(0.975))
        out["mde_two_level"] = float((z_a + z_b) * se)
    out["mde"] = max(seeds, out.get("mde_two_level", 0.0))
    return out


def g2_flags(no_learning: bool, d10: dict, d12: dict, hacked_by_arm: dict, score_r1: float | None,
             score_r0: float | None, mde: float | None) -> list[str]:
    """G2's flags from its numbers (`summarise`; also to re-flag a saved report.json): NO_LEARNING;
    R1_R0_CI_INCLUDES_0 or R1_BELOW_R0 and the same for R2 (two-level CIs); HACKED (per-seed hacks);
    HACKED_VS_R0 (R1 below R0 with a higher held-out mech score than R0's); UNDERPOWERED (R1 − R0 undecided
    and its MDE above the published 2pp)."""
    flags = ["NO_LEARNING"] if no_learning else []
    for other, d in (("R0", d10), ("R2", d12)):
        side = ci_side(d["ci95_two_level"])
        if side == "includes_0":
            flags.append(f"R1_{other}_CI_INCLUDES_0")
        elif side == "below_0":
            flags.append(f"R1_BELOW_{other}")
    if hacked_by_arm:
        flags.append("HACKED")
    if "R1_BELOW_R0" in flags and score_r1 is not None and score_r0 is not None and score_r1 > score_r0:
        flags.append("HACKED_VS_R0")
    if mde is not None and mde > EXCELLENT_R1_R0 and "R1_R0_CI_INCLUDES_0" in flags:
        flags.append("UNDERPOWERED")
    return flags


def ci_side(ci: list[float]) -> str:
    """Where a difference's CI lies: `above_0`, `below_0` or `includes_0` (0 inside or on a bound)."""
    lo, hi = ci
    return "above_0" if lo > 0 else "below_0" if hi < 0 else "includes_0"


def _delta(a: dict, b: dict, n_boot: int) -> dict:
    """R_a − R_b: mean over seeds, paired bootstrap CI over seeds, over questions, and over both."""
    pa, pb = np.array(a["per_seed"]), np.array(b["per_seed"])
    out: dict[str, Any] = {"mean": float((pa - pb).mean()), "per_seed": (pa - pb).tolist()}
    try:
        ci = stats.paired_bootstrap_ci(pa, pb, n_boot=n_boot)
        out["ci95"] = [ci.low, ci.high]
    except DataError:  # one seed
        out["ci95"] = None
    qa, qb = np.array(a["_pq"]).mean(0), np.array(b["_pq"]).mean(0)
    ci = stats.paired_bootstrap_ci(qa, qb, n_boot=n_boot, seed=1)
    out["ci95_questions"] = [ci.low, ci.high]
    out["ci95_two_level"] = two_level_ci(a["_pq"], b["_pq"], n_boot=n_boot, seed=2)
    return out


def _metric_block(rows: list[dict], metric: str, before_pq: np.ndarray, n_boot: int) -> dict:
    pq = np.array([r[metric] for r in rows], dtype=float)  # [S, Q] per-seed, per-question accuracy
    per_seed = pq.mean(1)
    ci = stats.bootstrap_ci(np.mean, pq.mean(0), n_boot=n_boot)
    gain = per_seed - before_pq.mean()
    return {"acc_mean": float(per_seed.mean()), "acc_ci95": [ci.low, ci.high], "per_seed": per_seed.tolist(),
            "acc_before": float(before_pq.mean()),
            "gain": {"mean": float(gain.mean()), "per_seed": gain.tolist(),
                     "ci95_two_level": two_level_ci(pq, before_pq, n_boot=n_boot, seed=3)},
            "_pq": pq}


def _curves(rows: list[dict]) -> dict:
    """Learning curves of one arm: steps and, per metric, [seeds][points] held-out accuracy."""
    steps = sorted({pt["step"] for r in rows for pt in r.get("curve", [])})
    out: dict[str, Any] = {"steps": steps}
    for m in METRICS:
        out[m] = [[next((pt[m] for pt in r.get("curve", []) if pt["step"] == s), None) for s in steps] for r in rows]
    return out


def summarise(results: dict[str, list[dict]], before: dict, protocol: G2Protocol) -> dict:
    """report.json body from per-arm, per-seed results.

    `results[arm]`: rows with `seed`, `sampled [Q]` (per-question mean correct over the held-out samples),
    `greedy [Q]` (0/1), `score_mean` (mech score on the held-out samples, None for R0), optional `curve`
    (`[{step, sampled, greedy}]`), `rewards` (what the arm trained with). `before`: `sampled [Q]`,
    `greedy [Q]` of the starting weights and `score {arm: mean}`."""
    vm = protocol.verdict_metric
    arm_names = list(ARMS) + [a for a in protocol.extra_arms if a in results]
    missing = [a for a in ARMS if not results.get(a)]
    if missing:
        raise DataError(f"G2 needs results of every arm R0, R1, R2; missing {missing}")
    seeds0 = sorted(r["seed"] for r in results["R0"])
    arms: dict[str, dict] = {}
    for arm in arm_names:
        rows = sorted(results[arm], key=lambda r: r["seed"])
        if [r["seed"] for r in rows] != seeds0:
            raise DataError(f"arm {arm} has seeds {[r['seed'] for r in rows]}, R0 has {seeds0}: arms must be paired")
        blocks = {m: _metric_block(rows, m, np.asarray(before[m], dtype=float), protocol.n_boot) for m in METRICS}
        main = blocks[vm]
        s_before = (before.get("score") or {}).get(arm)
        score_after = [r.get("score_mean") for r in rows]
        finite = [s for s in score_after if s is not None]
        hacked_seeds = [] if arm == "R0" else [
            r["seed"] for r, acc in zip(rows, main["per_seed"])
            if hacked(s_before, r.get("score_mean"), main["acc_before"], acc, protocol.hack_acc_tolerance)]
        arms[arm] = {"acc_mean": main["acc_mean"], "acc_ci95": main["acc_ci95"], "per_seed": main["per_seed"],
                     "metric": vm, "seeds": [r["seed"] for r in rows], "acc_before": main["acc_before"],
                     "gain": main["gain"], "_pq": main["_pq"],
                     **{m: {k: v for k, v in b.items() if k != "_pq"} for m, b in blocks.items()},
                     "mech_score_before": s_before, "mech_score_after": float(np.mean(finite)) if finite else None,
                     "mech_score_per_seed": score_after, "hacked_seeds": hacked_seeds, "hacked": bool(hacked_seeds),
                     "rewards": rows[0].get("rewards"),
                     "batch_mech_outcome_corr": [r.get("mech_outcome_corr") for r in rows],
                     "train_reward_outcome": [r.get("train_reward_outcome") for r in rows],
                     "seconds_per_seed": [r.get("seconds") for r in rows],
                     "init_weights_sha": [r.get("init_weights_sha") for r in rows],
                     "final_weights_sha": [r.get("final_weights_sha") for r in rows],
                     "curves": _curves(rows)}
    d10 = _delta(arms["R1"], arms["R0"], protocol.n_boot)
    d12 = _delta(arms["R1"], arms["R2"], protocol.n_boot)
    extra = {f"delta_r1_{a.lower()}": _delta(arms["R1"], arms[a], protocol.n_boot) for a in arm_names[3:]}
    r0_gain = arms["R0"]["gain"]
    no_learning = not r0_gain["ci95_two_level"][0] > 0
    mde = paired_min_detectable_difference(arms["R1"]["per_seed"], arms["R0"]["per_seed"], protocol.power,
                                           two_level_ci95=d10["ci95_two_level"])
    mde["unpaired"] = min_detectable_difference({a: arms[a]["per_seed"] for a in arm_names}, protocol.power)
    mde["seed_sd"] = mde["unpaired"]["seed_sd"]
    mde12 = paired_min_detectable_difference(arms["R1"]["per_seed"], arms["R2"]["per_seed"], protocol.power,
                                             two_level_ci95=d12["ci95_two_level"])
    hacked_by_arm = {a: arms[a]["hacked_seeds"] for a in arm_names if arms[a]["hacked_seeds"]}
    flags = g2_flags(no_learning, d10, d12, hacked_by_arm, arms["R1"]["mech_score_after"],
                     arms["R0"]["mech_score_after"], mde["mde"])
    hacked_vs_r0 = "HACKED_VS_R0" in flags
    published = verdict(d10["mean"], d12["mean"])
    for a in arms.values():
        a.pop("_pq")
    return {"arms": arms, "arm_names": arm_names, "delta_r1_r0": d10, "delta_r1_r2": d12, **extra,
            "verdict": "INCONCLUSIVE" if no_learning else published, "published_rule_verdict": published,
            "verdict_metric": vm, "no_learning": no_learning, "r0_gain": r0_gain, "mde_r1_r0": mde,
            "mde_r1_r2": mde12,
            "hacked": bool(hacked_by_arm), "hacked_seeds": hacked_by_arm, "hacked_vs_r0": hacked_vs_r0, "flags": flags,
            "acc_before": arms["R0"]["acc_before"],
            "acc_before_by_metric": {m: arms["R0"][m]["acc_before"] for m in METRICS},
            "thresholds": {"r1_minus_r0": EXCELLENT_R1_R0, "r1_minus_r2": EXCELLENT_R1_R2,
                           "hack_acc_tolerance": protocol.hack_acc_tolerance}}
