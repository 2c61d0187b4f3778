"""G2: the published verdict rules, the statistics of the report, and the three-arm command end to end
on a tiny model (fresh identical starting weights per arm and seed, report keys)."""

import json

import numpy as np
import pytest
import torch

from mechreward.gates.g2 import ARMS, G2Protocol, hacked, summarise, verdict
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


def _results(acc, n_q=20, seed=0):
    """Per-arm, per-seed results with exactly `acc[arm][s] * n_q` correct questions."""
    rng = np.random.default_rng(seed)
    out = {}
    for arm, accs in acc.items():
        rows = []
        for s, a in enumerate(accs):
            c = np.zeros(n_q)
            c[rng.permutation(n_q)[:int(round(a * n_q))]] = 1
            rows.append({"seed": s, "accuracy": float(c.mean()), "correct": c.tolist(),
                         "score_mean": {"R0": None, "R1": 0.5, "R2": -0.2}[arm]})
        out[arm] = rows
    return out


def test_summary_means_paired_cis_and_hacked_flag():
    acc = {"R0": [0.40, 0.45, 0.50], "R1": [0.50, 0.55, 0.50], "R2": [0.40, 0.40, 0.45]}
    rep = summarise(_results(acc), acc_before=0.6, score_before={"R1": 0.1, "R2": 0.0},
                    protocol=G2Protocol(n_boot=2000))
    assert set(rep["arms"]) == set(ARMS)
    assert rep["arms"]["R1"]["per_seed"] == pytest.approx(acc["R1"])
    assert rep["arms"]["R1"]["acc_mean"] == pytest.approx(np.mean(acc["R1"]))
    assert rep["delta_r1_r0"]["mean"] == pytest.approx(np.mean(acc["R1"]) - np.mean(acc["R0"]))
    ci = paired_bootstrap_ci(acc["R1"], acc["R0"], n_boot=2000)
    assert rep["delta_r1_r0"]["ci95"] == pytest.approx([ci.low, ci.high])
    assert rep["verdict"] == "PASS-EXCELLENT"  # +6.7pp over R0, +10pp over R2
    # R1's held-out score rose (0.1 → 0.5) while accuracy fell from 0.6: hacked
    assert rep["arms"]["R1"]["hacked"] and not rep["arms"]["R2"]["hacked"] and rep["hacked"]
    lo, hi = rep["arms"]["R0"]["acc_ci95"]
    assert lo <= rep["arms"]["R0"]["acc_mean"] <= hi and hi - lo > 0


def test_g2_command_runs_three_arms_from_identical_fresh_weights(tmp_path):
    from mechreward.g2 import G2Config, run_g2
    from mechreward.models import ModelConfig
    from mechreward.probe import FeaturePack
    from mechreward.rollouts import sae_reference
    from mechreward.run import Run
    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae, save_sae
    from mechreward.tasks import TaskConfig
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
    pack_path = pack.save(tmp_path / "pack.json")
    cfg = G2Config(model=ModelConfig(model_dir, device="cpu"), pack=str(pack_path),
                   task=TaskConfig(split="eval", n=8), train_task=TaskConfig(split="train", n=8))
    p = cfg.protocol
    p.steps, p.questions_per_step, p.rollouts_per_question = 1, 2, 2
    p.seeds, p.n_eval, p.max_completion_length, p.eval_max_new_tokens = [0, 1], 4, 4, 4
    p.lora_r, p.lora_alpha, p.n_boot, p.learning_rate = 4, 8, 200, 1e-3
    run = Run(tmp_path / "run", "g2")
    rep = run_g2(cfg, run)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["verdict"] == rep["verdict"] and set(on_disk["arms"]) == {"R0", "R1", "R2"}
    for arm in ARMS:
        a = rep["arms"][arm]
        assert len(a["per_seed"]) == 2 and a["seeds"] == [0, 1]
        assert set(a) >= {"acc_mean", "acc_ci95", "per_seed", "hacked"}
    for k in ("delta_r1_r0", "delta_r1_r2"):
        assert set(rep[k]) >= {"mean", "ci95"}
    # identical starting weights (base + fresh LoRA) for every arm of a seed; a new seed, a new LoRA init
    sha = {arm: rep["arms"][arm]["init_weights_sha"] for arm in ARMS}
    assert sha["R0"][0] == sha["R1"][0] == sha["R2"][0]
    assert sha["R0"][1] == sha["R1"][1] == sha["R2"][1]
    assert sha["R0"][0] != sha["R0"][1]
    assert rep["verdict"] in ("PASS-EXCELLENT", "PASS-PARTIAL", "FAIL")
