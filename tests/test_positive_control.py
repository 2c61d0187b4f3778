"""The positive control end to end at small size: on the planted organism, sae_train → rollouts → probe → G1
with the toolkit's defaults recover the planted solving mode against the recorded ground truth, and G1's
within-question evidence beats every cheap baseline.

Sizes are cut to fit CI (the demo and docs/positive_control.md run the full sizes); the questions are
the planted task's evaluation split, split by G1 into discovery and validation as always.
"""

import json

import numpy as np
import pytest

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
    scfg = SAETrainRunConfig(model=ModelConfig(name_or_path=PLANTED), layers=[2], sae=SAEShape(d_sae=512, k=16),
                             tokens=40_960, batch_size=1024, checkpoint_every=0, name="sae", output_dir=str(root / "sae"))
    run_sae_train(scfg, Run(root / "sae_run", "sae_train"))
    gcfg = G1Config(model=ModelConfig(name_or_path=PLANTED), task=TaskConfig(name="planted", n=100),
                    sampling=SamplingConfig(n=4, max_new_tokens=48), sae=SAERef(str(root / "sae" / "sae")),
                    n_discovery=40, n_validation=None, n_random_packs=100, n_boot=300, n_perm=1000)
    report = run_g1(gcfg, Run(root / "g1", "g1"))
    return root, report


def test_the_pack_recovers_the_true_mode(chain):
    """Measured here (100 questions x 4): pack score 0.86 within questions against the true mode, best pack
    latent 0.75 across responses; at the demo's size (320 x 4) 0.87 and 0.73. The issue's target of one
    latent at >= 0.9 is not reached by this organism (docs/positive_control.md)."""
    _, rep = chain
    truth = rep["ground_truth_mode"]
    assert truth["n_determined"] >= 150
    assert truth["pack_score_within_auroc_right_mode"] >= 0.75, truth
    best = truth["best_pack_latent"]
    assert best["separation"] >= 0.65, truth
    assert best["index"] in [f["index"] for f in json.loads(open(rep["pack_path"]).read())["features"]]
    assert truth["best_alive_latent"]["separation"] >= best["separation"]


def test_g1_within_question_evidence_beats_length_logprob_and_random_packs(chain):
    """G1's within-question CI lies above length, mean log-prob and the random packs' 95th percentile, and the
    pack adds to them (conditional LRT); the published across-question rho stays low (WEAK here, 0.17), because
    the mean-pooled codes vary with each question's digits far more than with the mode."""
    _, rep = chain
    assert rep["verdict"] != "FAIL", (rep["verdict"], rep["flags"])
    assert "BEATEN_BY_BASELINE" not in rep["flags"] and "UNINFORMATIVE_WITHIN" not in rep["flags"]
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
