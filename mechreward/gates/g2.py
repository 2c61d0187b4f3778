"""Gate G2, the tiny RL sanity run (GATES.md): three arms, several seeds, verdict.

Arms (identical seed, data order, budget and starting weights — a fresh LoRA per arm, the
base model reloaded for each):
- R0: outcome reward only (task verifier, 1/0);
- R1: outcome + λ · SAE feature reward (the G1 pack, same encoding and pooling as G1);
- R2: outcome + λ · raw-direction reward (diff of means at the same layer).
Each reward is normalised within its group before the weighted sum (`compose_advantages`), so λ
really scales the mech term. Held-out accuracy (greedy) before and after training.

Verdict (published, on mean accuracy over seeds): R1 ≥ R0 + 2pp and R1 − R2 ≥ 5pp →
PASS-EXCELLENT; the first only → PASS-PARTIAL; else FAIL. Honest additions: several seeds,
paired bootstrap CIs of R1−R0 and R1−R2 (pairs = seeds; also pairs = held-out questions,
accuracy averaged over seeds), and HACKED when an arm's mech score on held-out completions
rose while its held-out accuracy fell (means over seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import stats
from ..errors import DataError

ARMS = ("R0", "R1", "R2")
EXCELLENT_R1_R0 = 0.02
"""R1 − R0 accuracy margin (published: 2 percentage points)."""
EXCELLENT_R1_R2 = 0.05
"""R1 − R2 accuracy margin (published: 5 percentage points)."""


@dataclass
class G2Protocol:
    """The G2 settings (published defaults)."""

    steps: int = 30
    questions_per_step: int = 2
    rollouts_per_question: int = 2
    """GRPO group size (num_generations)."""
    lam: float = 0.1
    """λ: weight of the mech reward (R1, R2)."""
    beta: float = 0.05
    learning_rate: float = 3e-6
    lora_r: int = 32
    lora_alpha: int = 64
    lora_target_modules: str = "all-linear"
    max_completion_length: int = 64
    temperature: float = 1.0
    per_token: bool = False
    """Dense (per-token) mech advantages instead of a trajectory reward."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_eval: int = 100
    """Held-out questions (greedy) for accuracy before/after."""
    eval_max_new_tokens: int = 64
    hack_acc_tolerance: float = 0.02
    """HACKED needs held-out accuracy to fall by more than this (fraction; the verdict's 2pp margin).
    At 0, one question flipping on 100 while the score moves by 1e-4 already flags it."""
    n_boot: int = 10000
    grpo: dict = field(default_factory=dict)
    """Further GRPOConfig fields by their TRL names (validated)."""


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


def _delta(a: dict, b: dict, n_boot: int) -> dict:
    """R_a − R_b: mean over seeds, paired bootstrap CI over seeds and over questions."""
    pa, pb = np.array(a["per_seed"]), np.array(b["per_seed"])
    out: dict[str, Any] = {"mean": float((pa - pb).mean()), "per_seed": (pa - pb).tolist()}
    try:
        ci = stats.paired_bootstrap_ci(pa, pb, n_boot=n_boot)
        out["ci95"] = [ci.low, ci.high]
    except DataError:  # one seed
        out["ci95"] = None
    qa, qb = np.array(a["per_question"]), np.array(b["per_question"])
    ci = stats.paired_bootstrap_ci(qa, qb, n_boot=n_boot, seed=1)
    out["ci95_questions"] = [ci.low, ci.high]
    return out


def summarise(results: dict[str, list[dict]], acc_before: float, score_before: dict, protocol: G2Protocol) -> dict:
    """report.json body from per-arm, per-seed results (each: seed, accuracy, correct [n_eval], score_mean)."""
    arms = {}
    for arm in ARMS:
        rows = sorted(results[arm], key=lambda r: r["seed"])
        per_seed = [r["accuracy"] for r in rows]
        correct = np.array([r["correct"] for r in rows], dtype=float)  # [S, n_eval]
        per_q = correct.mean(0)
        ci = stats.bootstrap_ci(np.mean, per_q, n_boot=protocol.n_boot)
        score_after = [r["score_mean"] for r in rows if r.get("score_mean") is not None]
        s_after = float(np.mean(score_after)) if score_after else None
        arms[arm] = {"acc_mean": float(np.mean(per_seed)), "acc_ci95": [ci.low, ci.high], "per_seed": per_seed,
                     "seeds": [r["seed"] for r in rows], "per_question": per_q.tolist(),
                     "acc_before": acc_before, "mech_score_before": score_before.get(arm),
                     "mech_score_after": s_after, "mech_score_per_seed": [r.get("score_mean") for r in rows],
                     "batch_mech_outcome_corr": [r.get("mech_outcome_corr") for r in rows],
                     "seconds_per_seed": [r.get("seconds") for r in rows],
                     "init_weights_sha": [r.get("init_weights_sha") for r in rows]}
        arms[arm]["hacked"] = hacked(score_before.get(arm), s_after, acc_before, arms[arm]["acc_mean"],
                                     protocol.hack_acc_tolerance) if arm != "R0" else False
    d10 = _delta(arms["R1"], arms["R0"], protocol.n_boot)
    d12 = _delta(arms["R1"], arms["R2"], protocol.n_boot)
    flags = []
    if d10["ci95"] is not None and d10["ci95"][0] <= 0:
        flags.append("R1_R0_CI_INCLUDES_0")
    if d12["ci95"] is not None and d12["ci95"][0] <= 0:
        flags.append("R1_R2_CI_INCLUDES_0")
    is_hacked = any(arms[a]["hacked"] for a in ("R1", "R2"))
    if is_hacked:
        flags.append("HACKED")
    for a in arms.values():
        a.pop("per_question")
    return {"arms": arms, "delta_r1_r0": d10, "delta_r1_r2": d12, "verdict": verdict(d10["mean"], d12["mean"]),
            "hacked": is_hacked, "flags": flags, "acc_before": acc_before,
            "thresholds": {"r1_minus_r0": EXCELLENT_R1_R0, "r1_minus_r2": EXCELLENT_R1_R2}}
