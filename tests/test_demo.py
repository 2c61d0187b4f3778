"""The end-to-end demo on the organism, at a tiny scale: every stage runs, the report links them,
a rerun reuses them, and a failing stage stops the chain cleanly with earlier results kept.

G2 (three GRPO arms) is left to its own tests and to the real `python -m mechreward.demo`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mechreward.demo import DONE, STAGES, DemoConfig, g2_sentence, run_demo
from mechreward.errors import MechrewardError
from mechreward.run import Run
from mechreward.sae_train import SAEShape

MODEL = "organism"



def tiny_demo(cache: Path, **kw) -> DemoConfig:
    kw = {"n_discovery": 24, "stages": [s for s in STAGES if s != "g2"], **kw}
    cfg = DemoConfig(sae=SAEShape(d_sae=256, k=8), sae_tokens=8192, sae_batch_size=1024, layermap_questions=40,
                     rollout_questions=60, n_random_packs=20, n_boot=50, n_perm=200,
                     feature_tokens=1500, cache_dir=str(cache), **kw)
    cfg.model.name_or_path = MODEL
    return cfg


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = tiny_demo(root / "cache")
    first = run_demo(cfg, Run(root / "first", "demo"))
    second = run_demo(cfg, Run(root / "second", "demo"))
    return root, first, second


def test_demo_runs_every_stage_and_links_each_run_dir(demo_runs):
    root, first, _ = demo_runs
    wanted = [s for s in STAGES if s != "g2"]
    assert list(first["stages"]) == wanted
    assert all(first["stages"][s]["status"] == "ran" for s in wanted)
    assert first["verdicts"]["g1"] in ("PASS-EXCELLENT", "PASS", "WEAK", "FAIL")
    assert first["failed"] is None
    html = (root / "first" / "report.html").read_text()
    md = (root / "first" / "report.md").read_text()
    for s in wanted:
        rel = first["stages"][s]["run dir"]
        stage_dir = (root / "first" / rel).resolve()
        assert stage_dir.parent == (root / "cache").resolve() and stage_dir.name.startswith(s + "-")
        assert (stage_dir / "report.json").exists() and (stage_dir / DONE).exists()
        assert f"href='{rel}/report.md'" in html and rel in md
    assert first["verdicts"]["g1"] in html
    # the report leads with G1's own one-sentence conclusion, from within-question evidence of several rollouts
    g1 = first["reports"]["g1"]
    assert first["conclusion"].startswith(g1["conclusion"]) and g1["n_mixed_questions"] > 0
    assert g1["n_validation_responses"] == 4 * g1["n_validation"]  # rollouts_per_question = 4
    assert md.index("What the gates concluded") < md.index("| stage")
    assert g1["conclusion"].split(";")[0] in html
    for png in ("layermap_layermap.png", "g1_score_by_outcome.png", "g1_null_distribution.png",
                "features_feature_density.png"):
        assert (root / "first" / "plots" / png).stat().st_size > 5000
        assert f"plots/{png}" in html
    browser = root / "first" / first["stages"]["features"]["run dir"] / "browser" / "index.html"
    assert browser.exists()
    # The probe stage's pack is built on G1's discovery split: the same features as G1's pack.
    reports = first["reports"]
    g1_pack = json.loads(Path(reports["g1"]["pack_path"]).read_text())
    assert [f["index"] for f in reports["probe"]["features"]] == [f["index"] for f in g1_pack["features"]]
    # The features stage marks exactly the G1 pack's features in the browser data.
    rows = json.loads((browser.parent.parent / "features.json").read_text())["features"]
    assert {r["index"] for r in rows if r["pack_role"]} == {f["index"] for f in g1_pack["features"]}


def test_rerun_reuses_every_stage_with_identical_results(demo_runs):
    _, first, second = demo_runs
    assert all(v["status"] == "reused" for v in second["stages"].values())
    assert second["reports"] == first["reports"]
    assert second["seconds"] < 0.25 * first["seconds"]


def test_failing_stage_stops_the_chain_and_keeps_earlier_results(demo_runs, tmp_path):
    root, first, _ = demo_runs
    cache = root / "cache"
    # 58 of 60 questions for discovery leaves 2 for validation: G1's split refuses it, so the probe stage fails.
    cfg = tiny_demo(cache, n_discovery=58)
    with pytest.raises(MechrewardError, match="stage probe failed: .*G1 needs"):
        run_demo(cfg, Run(tmp_path / "fail", "demo"))
    rep = json.loads((tmp_path / "fail" / "report.json").read_text())
    assert rep["failed"]["stage"] == "probe"
    assert [s for s, v in rep["stages"].items() if v["status"] == "reused"] == ["sae_train", "layermap", "rollouts"]
    assert "probe" in (tmp_path / "fail" / "report.html").read_text()
    failed_dir = (tmp_path / "fail" / rep["failed"]["dir"]).resolve()
    assert failed_dir.exists() and not (failed_dir / DONE).exists()
    for s in ("sae_train", "layermap", "rollouts", "probe", "g1", "features"):  # the good run is untouched
        assert ((root / "first" / first["stages"][s]["run dir"]) / DONE).exists()


def test_demo_command_exits_non_zero_with_the_stage_error_and_no_traceback(demo_runs, tmp_path):
    root, _, _ = demo_runs
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1"}
    overrides = ["sae.d_sae=256", "sae.k=8", "sae_tokens=8192", "sae_batch_size=1024", "layermap_questions=40",
                 "rollout_questions=60", "n_discovery=58", "stages=[sae_train,layermap,rollouts,probe]",
                 f"cache_dir={root / 'cache'}", f"hydra.run.dir={tmp_path / 'cli'}", f"model.name_or_path={MODEL}",
                 "controls=[]"]
    p = subprocess.run([sys.executable, "-m", "mechreward.demo", *overrides], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "mechreward demo: error: stage probe failed" in p.stderr
    assert "Traceback" not in p.stderr
    assert "reusing" in p.stderr  # the first three stages came from the cache


def test_g2_sentence_reads_no_learning_and_the_minimum_detectable_effect_when_present():
    rep = {"verdict": "FAIL", "acc_before": 0.615, "arms": {"R0": {"acc_mean": 0.62}},
           "delta_r1_r0": {"mean": 0.002, "ci95": [-0.01, 0.01]}}
    s = g2_sentence(rep)
    assert s == "G2 FAIL: outcome-only RL (R0) moved held-out accuracy from 0.615 to 0.620, R1−R0 +0.002 (CI -0.010..+0.010)."
    s = g2_sentence({**rep, "verdict": "INCONCLUSIVE", "flags": ["NO_LEARNING"], "minimum_detectable_effect": 0.041})
    assert "NO_LEARNING" in s and "could detect is 0.041" in s and s.startswith("G2 INCONCLUSIVE")
    s = g2_sentence({**rep, "mde_r1_r0": {"mde": 0.033, "seed_sd": 0.004}})  # G2's own report key
    assert s.endswith("the smallest R1−R0 difference these seeds could detect is 0.033.")
    s = g2_sentence({**rep, "pack_check": {"verdict": "FAIL", "refusal_overridden": True}})
    assert s.startswith("G2 FAIL (run on a pack whose G1 verdict is FAIL, as a check of the machinery): ")


def test_sampling_and_prompt_settings_reach_the_layer_map_and_the_rollouts(demo_runs, tmp_path):
    root, first, _ = demo_runs
    template = tmp_path / "template.txt"  # the organism's own format, read from a file: the file is recorded
    template.write_text("{prompt}")
    cfg = tiny_demo(root / "cache", temperature=0.5, max_new_tokens=40, stages=["sae_train", "layermap", "rollouts"])
    cfg.prompt.prompt_template_file = str(template)
    rep = run_demo(cfg, Run(tmp_path / "sampled", "demo"))
    assert rep["stages"]["sae_train"]["status"] == "reused"  # the SAE does not depend on sampling or prompts
    assert rep["stages"]["rollouts"]["status"] == "ran" and rep["stages"]["layermap"]["status"] == "ran"
    roll_dir = (tmp_path / "sampled" / rep["stages"]["rollouts"]["run dir"]).resolve()
    header = json.loads((roll_dir / "rollouts" / "manifest.json").read_text())
    assert header["sampling"]["temperature"] == 0.5 and header["sampling"]["max_new_tokens"] == 40
    assert header["prompt_format"]["prompt_template_file"] == str(template)
    assert rep["reports"]["layermap"]["prompt_format"]["prompt_template_file"] == str(template)
    default = json.loads(((root / "first" / first["stages"]["rollouts"]["run dir"]) / "rollouts" / "manifest.json")
                         .resolve().read_text())
    assert default["sampling"]["temperature"] == 1.0 and default["sampling"]["max_new_tokens"] == 64
    assert default["prompt_format"]["prompt_template_file"] is None


def test_a_real_model_on_the_organisms_demo_settings_is_refused_before_anything_runs(tmp_path):
    cfg = DemoConfig(cache_dir=str(tmp_path / "cache"))
    cfg.model.name_or_path = str(tmp_path / "my-model")  # never loaded: the settings are refused first
    with pytest.raises(MechrewardError) as e:
        run_demo(cfg, Run(tmp_path / "run", "demo"))
    msg = str(e.value)
    assert "task=arithmetic" in msg and "set layer=<L>" in msg and "g2 stage" in msg and "demo_smollm2" in msg
    assert not (tmp_path / "cache").exists()
    cfg.task.name, cfg.layer, cfg.stages = "lookup", 3, ["sae_train", "layermap"]
    with pytest.raises(MechrewardError) as e:  # set for the model: it gets past the check, to the missing model
        run_demo(cfg, Run(tmp_path / "run2", "demo"))
    assert "organism" not in str(e.value)


def _control_report(verdict, flags, within, logprob, length, direction, truth=None, g2=None, beaten_by=()):
    g1 = {"verdict": verdict, "flags": flags, "spearman_rho": 0.4, "n_mixed_questions": 120, "beaten_by": list(beaten_by),
          "within": {"pack": {"auroc": within, "ci95": [within - 0.05, within + 0.05]},
                     "controls": {"logprob": {"auroc": logprob}, "length": {"auroc": length},
                                  "direction": {"auroc": direction}, "random_packs": {"auroc_p95": 0.6}}}}
    if truth is not None:
        g1["ground_truth_mode"] = {"best_pack_latent": {"index": 17, "separation": truth}}
    reports = {"g1": g1, **({"g2": g2} if g2 else {})}
    return {"reports": reports, "seconds": 100.0}


def test_controls_table_and_lead_read_both_organisms_from_their_reports():
    from mechreward.demo import control_row, controls_lead, controls_table
    from mechreward.gates.g1 import beaten_by

    g2 = {"verdict": "PASS-PARTIAL", "flags": [], "r0_gain": {"mean": 0.08, "ci95_two_level": [0.04, 0.12]},
          "delta_r1_r0": {"mean": 0.03, "ci95_two_level": [0.01, 0.05]},
          "delta_r1_r2": {"mean": 0.0, "ci95_two_level": [-0.02, 0.02]}, "mde_r1_r0": {"mde": 0.015}}
    pos = control_row("organism_planted", _control_report("PASS", [], 0.93, 0.55, 0.5, 0.6, truth=0.96, g2=g2))
    neg = control_row("organism", _control_report("FAIL", ["BEATEN_BY_BASELINE"], 0.54, 0.78, 0.52, 0.6))
    assert pos["planted_latent"] == 17 and pos["r0_gain_ci95"] == [0.04, 0.12] and neg["planted_latent"] is None
    table = controls_table([pos, neg])
    assert "| planted latent: AUROC vs true mode | 0.960 (latent 17) | n/a (no ground truth) |" in table
    assert "| G2 R0 gain (95% CI) | +0.080 [+0.040, +0.120] | n/a |" in table
    lead = controls_lead([pos, neg])
    assert lead.startswith("The gates separate a true mechanism from a false one: ")
    assert ("G1's published verdict is PASS (detected), its within-question evidence beats every cheap signal (pack "
            "AUROC 0.93 [0.88, 0.98] against 0.55 for mean log-prob, 0.50 for length, 0.60 for random packs' 95th pct)"
            ) in lead
    assert "best latent separates the true modes at AUROC 0.96 (at least the 0.9" in lead
    assert "the raw diff-of-means direction does worse (within-question AUROC 0.60)" in lead
    assert "outcome RL learns (R0 gain +0.080" in lead and "G1 rejects the pack (FAIL, BEATEN_BY_BASELINE" in lead
    # the raw direction as good as the pack: a finding stated in the lead, not a failure of the positive control
    tie = control_row("organism_planted", _control_report(
        "PASS-EXCELLENT", ["BEATEN_BY_BASELINE"], 0.99, 0.64, 0.5, 0.99, truth=1.0,
        beaten_by=beaten_by(0.85, 0.99, {"direction": (None, 0.99)})))  # G1's own entries
    lead = controls_lead([tie, neg])
    assert lead.startswith("The gates separate a true mechanism from a false one: ")
    assert ("the raw diff-of-means direction does as well (within-question AUROC 0.99, so G1 flags BEATEN_BY_BASELINE: "
            "the SAE adds nothing over a linear probe here)") in lead
    # beaten by a cheap signal (mean log-prob): not detected
    cheap = control_row("organism_planted", _control_report(
        "PASS", ["BEATEN_BY_BASELINE"], 0.80, 0.85, 0.5, 0.6, truth=0.95,
        beaten_by=beaten_by(0.4, 0.80, {"mean log-prob": (None, 0.85)})))
    assert "PASS (not detected)" in controls_lead([cheap, neg])
    # a positive control whose latent is not found: the lead says the gates are not shown to work
    weak = control_row("organism_planted", _control_report("WEAK", [], 0.71, 0.30, 0.5, 0.68, truth=0.65))
    assert controls_lead([weak, neg]).startswith("The gates do not yet separate a true mechanism from a false one")
    # within-question evidence above every baseline, but no latent at 0.9 and a WEAK verdict: said as such
    part = control_row("organism_planted", _control_report("WEAK", [], 0.81, 0.57, 0.5, 0.72, truth=0.73))
    lead = controls_lead([part, neg])
    assert lead.startswith("Within questions the gates tell the planted mechanism from the natural one, but the")
    assert "(below the 0.9 a planted latent should reach)" in lead


def test_controls_refuse_a_real_model_and_an_unknown_organism(tmp_path):
    cfg = DemoConfig(cache_dir=str(tmp_path / "cache"), controls=["organism_planted", "organism"])
    cfg.model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(MechrewardError, match="controls=\\[\\]"):
        run_demo(cfg, Run(tmp_path / "r", "demo"))
    cfg = DemoConfig(cache_dir=str(tmp_path / "cache"), controls=["organism", "nope"])
    with pytest.raises(MechrewardError, match="'nope'"):
        run_demo(cfg, Run(tmp_path / "r2", "demo"))
