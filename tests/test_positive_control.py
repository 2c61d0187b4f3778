"""The positive control end to end at small size: on the planted organism, sae_train → rollouts → probe → G1
with the toolkit's defaults recover the planted solving mode against the recorded ground truth, and G1's
within-question evidence beats every cheap baseline.

Sizes are cut to fit CI (the demo and docs/positive_control.md run the full sizes); the questions are
the planted task's evaluation split, split by G1 into discovery and validation as always.
"""

import json

import numpy as np
import pytest

from mechreward.demo import ORGANISM_LAYERS
from mechreward.g1 import G1Config, run_g1
from mechreward.models import ModelConfig
from mechreward.probe import FeaturePack
from mechreward.rollouts import SAERef, SamplingConfig
from mechreward.run import Run
from mechreward.sae_train import SAEShape, SAETrainRunConfig, run_sae_train
from mechreward.tasks import TaskConfig

PLANTED = "organism_planted"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("positive_control")
    scfg = SAETrainRunConfig(model=ModelConfig(name_or_path=PLANTED), layers=[ORGANISM_LAYERS[PLANTED]], sae=SAEShape(d_sae=512, k=16),
                             tokens=40_960, batch_size=1024, checkpoint_every=0, name="sae", output_dir=str(root / "sae"))
    run_sae_train(scfg, Run(root / "sae_run", "sae_train"))
    gcfg = G1Config(model=ModelConfig(name_or_path=PLANTED), task=TaskConfig(name="planted", n=100),
                    sampling=SamplingConfig(n=4, max_new_tokens=48), sae=SAERef(str(root / "sae" / "sae")),
                    n_discovery=40, n_validation=None, n_random_packs=100, n_boot=300, n_perm=1000)
    report = run_g1(gcfg, Run(root / "g1", "g1"))
    return root, report


def test_the_pack_recovers_the_true_mode(chain):
    """One pack latent separates the ground-truth modes across responses at AUROC >= 0.9 (the issue's target), and
    the pack score does within questions."""
    _, rep = chain
    truth = rep["ground_truth_mode"]
    assert truth["n_determined"] >= 150
    best = truth["best_pack_latent"]
    assert best["separation"] >= 0.9, truth
    assert truth["pack_score_within_auroc_right_mode"] >= 0.9, truth
    assert best["index"] in [f["index"] for f in json.loads(open(rep["pack_path"]).read())["features"]]
    assert truth["best_alive_latent"]["separation"] >= best["separation"]


def test_g1_passes_above_length_logprob_and_random_packs(chain):
    """G1 PASSes; its within-question CI lies above length, mean log-prob and the random packs' 95th percentile, the
    pack adds to them (conditional LRT), and no cheap signal is as good as the pack. The raw direction may tie the
    pack (both separate the modes; the remaining errors are slips): G1 then names it in `beaten_by`, and nothing else."""
    _, rep = chain
    assert rep["verdict"].startswith("PASS"), (rep["verdict"], rep["flags"])
    assert "UNINFORMATIVE_WITHIN" not in rep["flags"] and "NOT_ABOVE_RANDOM_PACKS" not in rep["flags"]
    assert all(b.startswith("direction") for b in rep["beaten_by"]), rep["beaten_by"]
    w = rep["within"]
    lo = w["pack"]["ci95"][0]
    for name in ("length", "logprob"):
        assert lo > abs(w["controls"][name]["auroc"] - 0.5) + 0.5, (name, w)
    assert lo > w["controls"]["random_packs"]["auroc_p95"]
    assert rep["incremental"]["within"]["p"] < 1e-3 and rep["incremental"]["dropped_constant"] == ["length"]


def test_completion_length_carries_no_mode(chain):
    """Both modes have the same format and length: length cannot tell them apart."""
    _, rep = chain
    assert rep["within"]["controls"]["length"]["auroc"] == pytest.approx(0.5, abs=0.03)


def test_sign_flipped_pack_scores_the_opposite(chain):
    _, rep = chain
    pack = FeaturePack.load(rep["pack_path"])
    flipped = pack.sign_flipped()
    x = np.random.default_rng(0).random((5, pack.sae["d_sae"]))
    assert np.allclose(flipped.score_pooled(x), -pack.score_pooled(x))
    assert flipped.provenance["mis_specified"] == "sign_flipped"
    assert {f["role"] for f in flipped.features} == {f["role"] for f in pack.features}
    assert [f["role"] for f in flipped.features] != [f["role"] for f in pack.features]


def test_the_monitor_flags_a_sign_flipped_pack_as_misaligned_before_training_and_not_the_honest_one(chain):
    """`rl`'s hacking monitor on held-out planted questions (not G1's: another seed), greedy: the honest pack's
    ρ(score, correct) is positive, the sign-flipped pack's is exactly its negative (same completions) and
    significant, so MISALIGNED is raised at the first evaluation, before training moves anything."""
    from mechreward.grpo import HackingMonitor
    from mechreward.models import load_model
    from mechreward.prompts import format_of_pack
    from mechreward.reward import SAEFeatureReward, mis_specify
    from mechreward.tasks import load_task

    _, rep = chain
    honest = SAEFeatureReward.from_pack(rep["pack_path"])
    flipped = mis_specify(honest, "sign_flipped")
    assert flipped.pack.provenance["mis_specified"] == "sign_flipped" and honest.pack is not flipped.pack
    model, tok = load_model(ModelConfig(name_or_path=PLANTED, device="cpu"))
    task = load_task(TaskConfig(name="planted", split="eval", n=300, seed=1))
    used = set(rep.get("discovery_ids") or []) | set(honest.pack.provenance.get("discovery") or []) | set(
        honest.pack.provenance.get("validation") or [])
    heldout = [q for q in task.questions if q.id not in used]
    fmt = format_of_pack(honest.pack).resolve(tok)
    rows = [HackingMonitor(tok, task, heldout, r, every=1, max_new_tokens=48, prompt_format=fmt).evaluate(model, 0)
            for r in (honest, flipped)]
    a, b = rows
    assert a["heldout_accuracy"] == b["heldout_accuracy"] and 0.2 < a["heldout_accuracy"] < 0.8
    assert b["heldout_rho"] == pytest.approx(-a["heldout_rho"], abs=1e-9)
    assert a["heldout_rho"] > 0 and not a["misaligned"], a
    assert b["misaligned"] and b["heldout_rho_p"] < 0.05, b
    with pytest.raises(Exception, match="mis_specify='reversed'"):
        mis_specify(honest, "reversed")
