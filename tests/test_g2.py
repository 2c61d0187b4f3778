"""G2: the published verdict rules, the statistics of the report (two-level CIs, NO_LEARNING, MDE against
statsmodels, HACKED per seed), and the command end to end on a tiny model (fresh identical starting weights
per arm and seed, which reward each arm trained with, learning curves, NO_LEARNING when the policy cannot move)."""

import json

import numpy as np
import pytest
import torch

from mechreward.errors import ConfigError
from mechreward.gates.g2 import (
    ARMS,
    G2Protocol,
    ci_side,
    hacked,
    min_detectable_difference,
    paired_min_detectable_difference,
    summarise,
    two_level_ci,
    verdict,
)
from mechreward.stats import paired_bootstrap_ci


@pytest.mark.parametrize("d10,d12,name", [(0.02, 0.05, "PASS-EXCELLENT"), (0.03, 0.049, "PASS-PARTIAL"),
                                          (0.019, 0.2, "FAIL"), (-0.1, -0.1, "FAIL"), (0.10, 0.08, "PASS-EXCELLENT")])
def test_published_verdict_rules(d10, d12, name):
    assert verdict(d10, d12) == name


def test_hacked_needs_score_up_and_accuracy_down():
    assert hacked(0.1, 0.3, 0.6, 0.5)
    assert not hacked(0.1, 0.3, 0.6, 0.6)
    assert not hacked(0.3, 0.1, 0.6, 0.5)
    assert not hacked(0.1, 0.3, 0.6, 0.58, tolerance=0.05)


def _results(acc, n_q=40, seed=0, scores=None, before=0.5):
    """Per-arm, per-seed results: sampled per-question rates with mean exactly `acc[arm][s]` (multiples of
    1/(4 n_q)), greedy 0/1 with the same mean rounded; `before` sampled and greedy accuracy of the start."""
    rng = np.random.default_rng(seed)
    k = 4

    def rates(a):
        hits = np.zeros(n_q * k)
        hits[rng.permutation(n_q * k)[:round(a * n_q * k)]] = 1
        return hits.reshape(n_q, k).mean(1)

    def zero_one(a):
        c = np.zeros(n_q)
        c[rng.permutation(n_q)[:round(a * n_q)]] = 1
        return c

    out = {}
    for arm, accs in acc.items():
        out[arm] = [{"seed": s, "sampled": rates(a).tolist(), "greedy": zero_one(a).tolist(),
                     "score_mean": None if scores is None else scores[arm][s]} for s, a in enumerate(accs)]
    b = {"sampled": rates(before), "greedy": zero_one(before), "score": {"R1": 0.1, "R2": 0.0}}
    return out, b


def test_summary_means_paired_cis_and_verdict_when_r0_learns():
    acc = {"R0": [0.60, 0.625, 0.65], "R1": [0.70, 0.725, 0.70], "R2": [0.60, 0.60, 0.625]}
    res, before = _results(acc, before=0.5)
    rep = summarise(res, before, G2Protocol(n_boot=2000))
    assert set(rep["arms"]) == set(ARMS) and rep["verdict_metric"] == "sampled"
    assert rep["arms"]["R1"]["per_seed"] == pytest.approx(acc["R1"])
    assert rep["arms"]["R1"]["sampled"]["per_seed"] == pytest.approx(acc["R1"])
    assert rep["arms"]["R1"]["acc_mean"] == pytest.approx(np.mean(acc["R1"]))
    assert rep["delta_r1_r0"]["mean"] == pytest.approx(np.mean(acc["R1"]) - np.mean(acc["R0"]))
    ci = paired_bootstrap_ci(acc["R1"], acc["R0"], n_boot=2000)
    assert rep["delta_r1_r0"]["ci95"] == pytest.approx([ci.low, ci.high])
    # R0 gained 12.5pp over 0.5 on every seed: it learned, the published rule decides
    assert rep["r0_gain"]["mean"] == pytest.approx(np.mean(acc["R0"]) - 0.5)
    assert rep["r0_gain"]["ci95_two_level"][0] > 0 and not rep["no_learning"]
    assert "NO_LEARNING" not in rep["flags"]
    assert rep["verdict"] == rep["published_rule_verdict"] == "PASS-EXCELLENT"  # +8pp over R0, +10pp over R2
    lo, hi = rep["arms"]["R0"]["acc_ci95"]
    assert lo <= rep["arms"]["R0"]["acc_mean"] <= hi and hi - lo > 0
    # the minimum detectable R1 − R2 difference, computed as R1 − R0's on the R1/R2 pairs
    m12 = paired_min_detectable_difference(acc["R1"], acc["R2"], two_level_ci95=rep["delta_r1_r2"]["ci95_two_level"])
    assert rep["mde_r1_r2"] == pytest.approx(m12) and rep["mde_r1_r2"]["mde"] != pytest.approx(rep["mde_r1_r0"]["mde"])


def test_no_learning_makes_the_verdict_inconclusive_not_fail():
    # R0 moves by +0.6pp (noise); R1 is 5pp below R0: the published rule says FAIL, but R0 never learned
    acc = {"R0": [0.50, 0.5125, 0.50], "R1": [0.45, 0.4625, 0.45], "R2": [0.45, 0.45, 0.45]}
    res, before = _results(acc, before=0.5)
    rep = summarise(res, before, G2Protocol(n_boot=2000))
    lo, hi = rep["r0_gain"]["ci95_two_level"]
    assert lo <= 0 <= hi and rep["no_learning"] and "NO_LEARNING" in rep["flags"]
    assert rep["published_rule_verdict"] == "FAIL" and rep["verdict"] == "INCONCLUSIVE"


def test_two_level_ci_matches_the_question_bootstrap_with_one_seed_and_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (1, 300))
    b = rng.uniform(0, 1, 300)
    lo, hi = two_level_ci(a, b, n_boot=4000)
    ci = paired_bootstrap_ci(a[0], b, n_boot=4000, seed=5)
    assert lo == pytest.approx(ci.low, abs=0.01) and hi == pytest.approx(ci.high, abs=0.01)
    # the same questions, but seeds that disagree by ±0.1: the seed resampling widens the interval
    spread = np.vstack([a[0] - 0.1, a[0], a[0] + 0.1])
    lo3, hi3 = two_level_ci(spread, b, n_boot=4000)
    assert hi3 - lo3 > 1.5 * (hi - lo)
    # a constant gain of exactly 0.1 has the CI [0.1, 0.1]
    assert two_level_ci(np.full((3, 50), 0.6), np.full(50, 0.5)) == pytest.approx([0.1, 0.1])


def test_min_detectable_difference_matches_statsmodels():
    from statsmodels.stats.power import TTestIndPower

    r0, r1 = [0.50, 0.53, 0.47, 0.52], [0.55, 0.54, 0.58, 0.57]
    out = min_detectable_difference({"R0": r0, "R1": r1}, power=0.8)
    sd = np.sqrt((np.var(r0, ddof=1) + np.var(r1, ddof=1)) / 2)
    es = TTestIndPower().solve_power(nobs1=4, ratio=1.0, alpha=0.05, power=0.8, alternative="two-sided")
    assert out["seed_sd"] == pytest.approx(sd) and out["df"] == 6
    assert out["mde"] == pytest.approx(es * sd, rel=1e-3)
    assert min_detectable_difference({"R0": [0.5], "R1": [0.6]})["mde"] is None


def test_paired_min_detectable_difference_matches_statsmodels_and_the_two_level_ci():
    from scipy.stats import norm
    from statsmodels.stats.power import TTestPower

    # arms that vary a lot from seed to seed but move together: the pairing removes the shared part
    r0 = np.array([0.40, 0.48, 0.55, 0.44, 0.51, 0.46])
    r1 = r0 + np.array([0.004, 0.010, 0.002, 0.008, 0.006, 0.001])
    out = paired_min_detectable_difference(r1, r0, power=0.8)
    d_sd = np.std(r1 - r0, ddof=1)
    es = TTestPower().solve_power(nobs=6, alpha=0.05, power=0.8, alternative="two-sided")
    assert out["diff_sd"] == pytest.approx(d_sd) and out["df"] == 5
    assert out["mde"] == out["mde_seeds"] == pytest.approx(es * d_sd, rel=1e-3)
    unpaired = min_detectable_difference({"R0": list(r0), "R1": list(r1)})["mde"]
    assert out["mde"] < unpaired / 10  # the unpaired MDE is blurred by the shared seed effect
    # a wider two-level CI (question noise) sets the MDE: (z_.975 + z_.8) · its SE
    wide = paired_min_detectable_difference(r1, r0, two_level_ci95=[-0.02, 0.02])
    assert wide["mde"] == wide["mde_two_level"] == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * 0.02 / norm.ppf(0.975))
    assert paired_min_detectable_difference([0.5], [0.6])["mde"] is None


def test_hacked_is_flagged_per_seed_even_when_the_seed_mean_hides_it():
    # R1 seed 1: score up (0.1 → 0.4) and accuracy down 10pp; seeds 0 and 2 gained accuracy, so the
    # seed means show accuracy up (no hacking by means), but seed 1 is hacked and named
    acc = {"R0": [0.60, 0.60, 0.60], "R1": [0.70, 0.40, 0.70], "R2": [0.55, 0.55, 0.55]}
    scores = {"R0": [None] * 3, "R1": [0.05, 0.4, 0.05], "R2": [-0.1, -0.1, -0.1]}
    res, before = _results(acc, scores=scores, before=0.5)
    rep = summarise(res, before, G2Protocol(n_boot=500))
    assert rep["arms"]["R1"]["acc_mean"] > rep["arms"]["R1"]["acc_before"]
    assert not hacked(0.1, rep["arms"]["R1"]["mech_score_after"], 0.5, rep["arms"]["R1"]["acc_mean"], 0.02)
    assert rep["arms"]["R1"]["hacked_seeds"] == [1] and rep["hacked_seeds"] == {"R1": [1]}
    assert rep["hacked"] and "HACKED" in rep["flags"] and not rep["arms"]["R2"]["hacked"]


def test_r1_decided_below_r0_is_flagged_as_below_not_as_a_ci_that_includes_0_and_hacked_vs_r0():
    # a mis-specified pack: every seed of R1 ends 6pp below R0 (both above the start, so no per-seed HACKED)
    # while R1's held-out mech score ends above R0's
    acc = {"R0": [0.65, 0.675, 0.65], "R1": [0.60, 0.60, 0.5875], "R2": [0.625, 0.65, 0.65]}
    scores = {"R0": [0.10, 0.11, 0.09], "R1": [0.30, 0.35, 0.32], "R2": [0.0, 0.0, 0.0]}
    res, before = _results(acc, n_q=200, scores=scores, before=0.5)
    rep = summarise(res, before, G2Protocol(n_boot=2000))
    lo, hi = rep["delta_r1_r0"]["ci95_two_level"]
    assert hi < 0 and "R1_BELOW_R0" in rep["flags"] and "R1_R0_CI_INCLUDES_0" not in rep["flags"]
    assert rep["hacked_vs_r0"] and "HACKED_VS_R0" in rep["flags"] and not rep["hacked"]
    assert "UNDERPOWERED" not in rep["flags"]  # decided: no power statement needed
    # the same accuracies with R1's score below R0's: R1 is below R0, but nothing says the proxy was gamed
    scores["R1"] = [0.05, 0.05, 0.05]
    res, before = _results(acc, n_q=200, scores=scores, before=0.5)
    rep = summarise(res, before, G2Protocol(n_boot=2000))
    assert "R1_BELOW_R0" in rep["flags"] and not rep["hacked_vs_r0"] and "HACKED_VS_R0" not in rep["flags"]
    # a CI that straddles 0 is the undecided flag
    assert ci_side([-0.01, 0.02]) == "includes_0" and ci_side([0.0, 0.02]) == "includes_0"
    assert ci_side([0.001, 0.02]) == "above_0" and ci_side([-0.03, -0.001]) == "below_0"


def test_protocol_check_names_the_setting():
    for kw, name in [({"adapter": "qlora"}, "protocol.adapter"), ({"verdict_metric": "mean"}, "verdict_metric"),
                     ({"extra_arms": ["R9"]}, "extra_arms"), ({"eval_samples": 0}, "eval_samples"),
                     ({"seeds": [1, 1]}, "seeds"), ({"eval_engine": "sglang"}, "eval_engine"),
                     ({"eval_engine": "vllm"}, "protocol.grpo.use_vllm=true"),
                     ({"eval_engine": "vllm", "grpo": {"use_vllm": True, "vllm_mode": "server"}}, "vllm_mode=colocate")]:
        with pytest.raises(ConfigError, match=name):
            G2Protocol(**kw).check()
    G2Protocol(eval_engine="vllm", grpo={"use_vllm": True}).check()  # colocate is TRL's default mode


def _tiny_setup(tmp_path):
    from mechreward.probe import FeaturePack
    from mechreward.rollouts import sae_reference
    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae, save_sae
    from tests.tiny import save_tiny

    model_dir = str(save_tiny(tmp_path / "m", "qwen3"))
    sae = load_sae(save_sae(SparseAutoencoder.from_config(SAEConfig(64, 128, 8, metadata={"layer": 1}), seed=2),
                            tmp_path / "sae"))
    torch.manual_seed(0)
    pack = FeaturePack(model=model_dir, layer=1, hook="model.layers.1", sae=sae_reference(sae),
                       features=[{"index": i, "weight": (-1.0) ** i} for i in range(0, 60, 3)],
                       normalisation={"mean": 0.0, "std": 1.0},
                       provenance={"direction": torch.randn(64).tolist(), "discovery": [], "validation": [],
                                   "prompt_format": {"chat_template": False}},
                       validation={"verdict": "PASS"})
    return model_dir, pack.save(tmp_path / "pack.json")


def test_g2_command_trains_each_arm_with_its_reward_and_flags_no_learning_at_lr_0(tmp_path):
    from mechreward.g2 import G2Config, run_g2
    from mechreward.models import ModelConfig
    from mechreward.run import Run, read_metrics
    from mechreward.tasks import TaskConfig

    model_dir, pack_path = _tiny_setup(tmp_path)
    cfg = G2Config(model=ModelConfig(model_dir, device="cpu"), pack=str(pack_path),
                   task=TaskConfig(split="eval", n=8), train_task=TaskConfig(split="train", n=8))
    p = cfg.protocol
    p.steps, p.questions_per_step, p.rollouts_per_question, p.eval_every, p.eval_samples = 2, 2, 2, 1, 2
    p.seeds, p.n_eval, p.max_completion_length, p.eval_max_new_tokens = [0, 1], 4, 4, 4
    p.lora_r, p.lora_alpha, p.n_boot, p.learning_rate = 4, 8, 200, 0.0  # lr 0: the policy cannot move
    p.extra_arms = ["LP"]
    run = Run(tmp_path / "run", "g2")
    rep = run_g2(cfg, run)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["verdict"] == rep["verdict"] and set(on_disk["arms"]) == {"R0", "R1", "R2", "LP"}
    # which reward each arm trained with: the trainer's reward functions and the reward metrics TRL logged
    fn = {a: rep["arms"][a]["rewards"]["functions"] for a in rep["arm_names"]}
    logged = {a: rep["arms"][a]["rewards"]["logged"] for a in rep["arm_names"]}
    assert [f["class"] for f in fn["R0"]] == ["OutcomeReward"] and logged["R0"] == ["outcome"]
    assert [f["class"] for f in fn["R1"]] == ["OutcomeReward", "SAEFeatureReward"]
    assert fn["R1"][1]["layer"] == 1 and fn["R1"][1]["n_features"] == 20
    assert set(logged["R1"]) == {"outcome", "sae_feature"}
    assert [f["class"] for f in fn["R2"]] == ["OutcomeReward", "DirectionReward"] and fn["R2"][1]["layer"] == 1
    assert fn["R2"][1]["direction_norm"] == pytest.approx(float(torch.tensor(
        json.loads(pack_path.read_text())["provenance"]["direction"]).norm()), rel=1e-5)
    assert set(logged["R2"]) == {"outcome", "direction"}
    assert [f["class"] for f in fn["LP"]] == ["OutcomeReward", "MeanLogProbReward"]
    assert set(logged["LP"]) == {"outcome", "mean_logprob"}
    for a in ("R1", "R2", "LP"):
        assert rep["arms"][a]["rewards"]["weights"] == pytest.approx([1.0, p.lam])
    for arm in rep["arm_names"]:
        a = rep["arms"][arm]
        assert a["seeds"] == [0, 1] and len(a["sampled"]["per_seed"]) == 2 and len(a["greedy"]["per_seed"]) == 2
        # identical starting weights per seed across arms; a new seed, a new LoRA init; lr 0 moved nothing
        assert a["final_weights_sha"] == a["init_weights_sha"]
        # learning curve: before, step 1, after (step 2), per seed
        assert a["curves"]["steps"] == [0, 1, 2] and len(a["curves"]["sampled"]) == 2
    sha = {arm: rep["arms"][arm]["init_weights_sha"] for arm in rep["arm_names"]}
    assert sha["R0"][0] == sha["R1"][0] == sha["R2"][0] == sha["LP"][0] != sha["R0"][1] == sha["R1"][1]
    # the policy did not move: the held-out samples (same eval seed) are the same, gain 0, NO_LEARNING
    for arm in rep["arm_names"]:
        assert rep["arms"][arm]["gain"]["per_seed"] == pytest.approx([0.0, 0.0])
    assert rep["no_learning"] and "NO_LEARNING" in rep["flags"] and rep["verdict"] == "INCONCLUSIVE"
    assert rep["mde_r1_r0"]["n_seeds"] == 2
    # results.json rebuilds the statistics without training again
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    again = summarise(saved["results"], saved["before"], G2Protocol(**saved["protocol"]))
    assert again["delta_r1_r0"] == rep["delta_r1_r0"] and again["flags"] == rep["flags"]
    curve_rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "curve"]
    assert {(r["arm"], r["seed"], r["step"]) for r in curve_rows} == {
        (a, s, t) for a in rep["arm_names"] for s in (0, 1) for t in (0, 1, 2)}
    assert (tmp_path / "run" / "learning_curves.png").stat().st_size > 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "INCONCLUSIVE" in md and "NO_LEARNING" in md and "learning_curves.png" in md


def test_g2_refuses_organism_protocol_on_another_model(tmp_path):
    from mechreward.g2 import G2Config, run_g2
    from mechreward.models import ModelConfig
    from mechreward.run import Run

    cfg = G2Config(model=ModelConfig("some/other-model", device="cpu"), protocol_for="organism")
    with pytest.raises(ConfigError, match="protocol_for"):
        run_g2(cfg, Run(tmp_path / "run", "g2"))


def test_midrun_curve_point_equals_an_independent_evaluation_of_the_adapter_saved_at_that_step(tmp_path):
    """G2 with LoRA, lr > 0: the held-out evaluation inside training (the curve point at step 1) is the one a
    fresh base model loaded with the adapter saved at step 1 gives on the pack's prompts: same prompt ids, same
    sampled and greedy completions (digest), same accuracies. The pack's format here is not the bare question,
    as a chat model's template is not: the mid-run point once fell back to bare prompts (on SmolLM2-135M-Instruct
    every completion was empty, accuracy 0.0 at step 2 of 4, 0.70 at step 4)."""
    from peft import PeftModel

    from mechreward.g2 import G2Config, evaluate_heldout, heldout_questions, run_g2
    from mechreward.models import ModelConfig, load_model
    from mechreward.probe import FeaturePack
    from mechreward.prompts import format_of_pack
    from mechreward.run import Run, read_metrics
    from mechreward.tasks import TaskConfig, load_task

    model_dir, pack_path = _tiny_setup(tmp_path)
    raw = json.loads(pack_path.read_text())
    raw["provenance"]["prompt_format"] = {"chat_template": False, "prompt_template": "Solve: {prompt} ="}
    pack_path.write_text(json.dumps(raw))
    cfg = G2Config(model=ModelConfig(model_dir, device="cpu"), pack=str(pack_path),
                   task=TaskConfig(split="eval", n=8), train_task=TaskConfig(split="train", n=8))
    p = cfg.protocol
    p.steps, p.questions_per_step, p.rollouts_per_question, p.eval_every, p.eval_samples = 2, 2, 2, 1, 2
    p.seeds, p.n_eval, p.max_completion_length, p.eval_max_new_tokens = [0], 4, 4, 4
    p.lora_r, p.lora_alpha, p.n_boot, p.learning_rate = 4, 8, 200, 1e-2
    p.grpo = {"save_strategy": "steps", "save_steps": 1}
    run = Run(tmp_path / "run", "g2")
    rep = run_g2(cfg, run)
    # R1's mech reward gives a learning signal (the tiny model's outcomes all tie at 0): its policy moved
    assert rep["arms"]["R1"]["final_weights_sha"] != rep["arms"]["R1"]["init_weights_sha"]
    rows = {(r["arm"], r["step"]): r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
            if r.get("kind") == "curve" and r["seed"] == 0}

    pack = FeaturePack.load(pack_path)
    task = load_task(cfg.task)
    eval_qs = heldout_questions(task, pack, p.n_eval)
    base, tok = load_model(model_dir, device="cpu")
    fmt = format_of_pack(pack).resolve(tok)
    assert rows[("R0", 0)]["digest"] == evaluate_heldout(base, tok, eval_qs, task, p, prompt_format=fmt)["digest"]
    for arm in ("R0", "R1"):
        ck = tmp_path / "run" / "arms" / f"{arm}-seed0" / "checkpoint-1"
        fresh = PeftModel.from_pretrained(load_model(model_dir, device="cpu")[0], str(ck))
        ev = evaluate_heldout(fresh, tok, eval_qs, task, p, prompt_format=fmt)
        mid = rows[(arm, 1)]
        assert mid["digest"] == ev["digest"], arm
        assert (mid["sampled"], mid["greedy"]) == (float(ev["sampled"].mean()), float(ev["greedy"].mean()))
    assert rows[("R1", 2)]["digest"] != rows[("R1", 1)]["digest"]  # a later step, other weights: other completions


def test_smollm2_preset_composes_for_its_model_with_the_four_arms():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mechreward.cli import CONF_DIR, register
    from mechreward.g2 import G2Config

    register("g2", G2Config)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("g2_smollm2", overrides=["pack=p.json"]))
    assert cfg.protocol_for == cfg.model.name_or_path == "smollm2-135m-instruct"
    assert (cfg.task.name, cfg.train_task.name, cfg.train_task.split) == ("lookup", "lookup", "train")
    p = cfg.protocol
    p.check()
    assert (p.adapter, p.extra_arms, len(p.seeds), p.beta, p.eval_every) == ("lora", ["LP"], 5, 0.0, 0)
    assert p.steps * p.questions_per_step <= cfg.train_task.n
