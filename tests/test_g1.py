"""Gate G1: numbers equal scipy's, verdict thresholds, flags, split and label errors, the command end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from mechreward.errors import DataError
from mechreward.gates.g1 import (G1Protocol, check_disjoint, g1_statistics, random_pack_rhos, run_gate,
                                 split_questions, verdict)
from mechreward.probe import FeaturePack, SelectionConfig
from mechreward.rollouts import MANIFEST, RolloutSet, write_shard

REPO = Path(__file__).resolve().parent.parent


def _stats(score, labels, length=None, logprob=None, direction=None, null=(), **kw):
    n = len(score)
    rng = np.random.default_rng(99)
    return g1_statistics(score, labels, np.arange(n).astype(str),
                         rng.normal(size=n) if length is None else length,
                         rng.normal(size=n) if logprob is None else logprob,
                         rng.normal(size=n) if direction is None else direction, np.asarray(null), **kw)


def test_report_numbers_equal_scipy_on_a_known_correlation():
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.45).astype(int)
    score = labels + rng.normal(scale=1.2, size=300)
    length = rng.normal(size=300) - 0.3 * labels
    r = _stats(score, labels, length=length, n_boot=500, n_perm=2000)
    want = sps.spearmanr(score, labels)
    assert r["spearman_rho"] == pytest.approx(want.statistic, abs=1e-12)
    assert r["p_value"] == pytest.approx(want.pvalue, rel=1e-9)
    assert 0.3 < r["spearman_rho"] < 0.45  # the planted correlation
    assert r["pearson_r"] == pytest.approx(sps.pearsonr(score, labels).statistic, abs=1e-12)
    u = sps.mannwhitneyu(score[labels == 1], score[labels == 0]).statistic
    assert r["auroc"] == pytest.approx(u / (labels.sum() * (1 - labels).sum()))
    assert r["permutation_p"] == pytest.approx(2 / 2001)  # nothing in 2000 permutations reaches it
    lo, hi = r["ci95"]
    assert lo < r["spearman_rho"] < hi and hi - lo < 0.3
    assert r["controls"]["length_rho"] == pytest.approx(sps.spearmanr(length, labels).statistic)
    rxy, rxz, ryz = (sps.spearmanr(a, b).statistic for a, b in [(score, labels), (score, length), (labels, length)])
    textbook = (rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2))
    assert r["controls"]["partial_rho_length"] == pytest.approx(textbook, abs=1e-9)
    assert r["n_correct_validation"] == labels.sum() and r["verdict"] == "PASS"


def test_permutation_p_agrees_with_scipy_when_there_is_no_signal():
    rng = np.random.default_rng(1)
    labels = (rng.random(80) < 0.5).astype(int)
    score = rng.normal(size=80)
    r = _stats(score, labels, n_boot=200, n_perm=5000)
    ref = sps.permutation_test((score,), lambda s: sps.spearmanr(s, labels).statistic, permutation_type="pairings",
                               n_resamples=5000, alternative="two-sided", rng=0).pvalue
    assert r["permutation_p"] == pytest.approx(ref, abs=0.05)
    assert r["verdict"] == ("FAIL" if r["spearman_rho"] < 0.1 else "WEAK")
    assert "CI_LOWER_BOUND_LE_0" in r["flags"]


@pytest.mark.parametrize("rho,name", [(0.50, "PASS-EXCELLENT"), (0.4999, "PASS"), (0.30, "PASS"), (0.2999, "WEAK"),
                                      (0.10, "WEAK"), (0.0999, "FAIL"), (-0.7, "FAIL")])
def test_verdict_thresholds(rho, name):
    assert verdict(rho) == name


def test_confounded_when_length_explains_the_score():
    rng = np.random.default_rng(2)
    length = rng.integers(10, 200, size=200).astype(float)
    labels = (length + rng.normal(scale=30, size=200) < 100).astype(int)  # short answers are right
    score = -length + rng.normal(scale=5, size=200)
    r = _stats(score, labels, length=length, n_boot=200, n_perm=500)
    assert r["spearman_rho"] > 0.3
    assert abs(r["controls"]["length_rho"]) >= r["spearman_rho"] and "CONFOUNDED" in r["flags"]
    assert abs(r["controls"]["partial_rho_length"]) < 0.2  # nothing left once length is controlled for
    clean = _stats(rng.normal(size=200) + 2 * labels, labels, length=rng.normal(size=200), n_boot=200, n_perm=500)
    assert "CONFOUNDED" not in clean["flags"] and "CI_LOWER_BOUND_LE_0" not in clean["flags"]


def test_random_pack_null_equals_scipy_per_pack():
    rng = np.random.default_rng(3)
    pooled = rng.exponential(size=(60, 30)) * (rng.random((60, 30)) < 0.4)
    labels = np.array([0, 1] * 30)
    alive = np.arange(30)
    rhos = random_pack_rhos(pooled, labels, alive, [1.0, 1.0, -1.0], n_packs=20, seed=5)
    rng2 = np.random.default_rng(5)
    for k in range(20):
        pick = rng2.choice(alive, size=3, replace=False)
        s = pooled[:, pick] @ np.array([1.0, 1.0, -1.0])
        assert rhos[k] == pytest.approx(sps.spearmanr(s, labels).statistic, abs=1e-12)


def test_splits_are_disjoint_and_overlap_is_an_error():
    ids = [f"q{i}" for i in range(40) for _ in range(2)]  # two rollouts per question
    disc, val = split_questions(ids, 10, 20, seed=0)
    assert len(disc) == 10 and len(val) == 20 and not set(disc) & set(val)
    assert split_questions(ids, 10, 20, seed=0) == (disc, val) != split_questions(ids, 10, 20, seed=1)
    assert len(split_questions(ids, 10, None)[1]) == 30
    with pytest.raises(DataError, match="share 1 question"):
        check_disjoint(["a", "b"], ["b", "c"])
    with pytest.raises(DataError, match="hold 40 questions; G1 needs 50"):
        split_questions(ids, 20, 30)


# --------------------------------------------------------------------------- run_gate on synthetic rollouts

def _synthetic_rollouts(path: Path, labels, seed=0, d_sae=40, d_model=8, planted=(5, 9), harmful=(13,)):
    rng = np.random.default_rng(seed)
    n = len(labels)
    codes = rng.exponential(size=(n, d_sae)) * (rng.random((n, d_sae)) < 0.3)
    for f in planted:
        codes[:, f] += 1.5 * labels * rng.random(n)
    for f in harmful:
        codes[:, f] += 1.5 * (1 - labels) * rng.random(n)
    resid = rng.normal(size=(n, d_model))
    header = {"schema": "mechreward.rollouts", "version": 1, "model": "m", "d_model": d_model, "n_layers": 4,
              "layers": [2], "sae_layer": 2, "sae": {"sha256": "s" * 64, "d_sae": d_sae, "layer": 2, "hook": "h"},
              "task": {}, "sampling": {}}
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps(header))
    records = [{"question_id": f"q{i}", "correct": bool(labels[i]), "length": int(rng.integers(5, 50)),
                "logprobs": list(rng.normal(-1, 0.3, size=5)), "finish_reason": "eos"} for i in range(n)]
    t = {"codes.mean": torch.tensor(codes, dtype=torch.float32), "resid.mean.L2": torch.tensor(resid).float()}
    write_shard(path / "shard-00000.safetensors", t, records)
    return RolloutSet(path)


def test_run_gate_finds_planted_features_on_held_out_questions(tmp_path):
    labels = np.array([0, 1, 1, 0, 0] * 40)
    rs = _synthetic_rollouts(tmp_path / "r", labels)
    proto = G1Protocol(n_discovery=80, n_validation=120, selection=SelectionConfig(2, 1), n_random_packs=300,
                       n_boot=300, n_perm=1000)
    res = run_gate(rs, proto, rs.header["sae"], "m", 2)
    assert {f["index"] for f in res.pack.features} == {5, 9, 13}
    val = set(res.pack.provenance["validation"])
    assert len(val) == 120 and not val & set(res.pack.provenance["discovery"])
    r = res.report
    assert r["spearman_rho"] > r["controls"]["random_pack_rho_p95"] and r["verdict"] in ("PASS", "PASS-EXCELLENT")
    rows = np.isin(rs.question_ids, sorted(val))
    score = rs.codes("mean").numpy()[rows][:, [5, 9, 13]] @ np.array([1.0, 1.0, -1.0])
    assert r["spearman_rho"] == pytest.approx(sps.spearmanr(score, labels[rows]).statistic, abs=1e-9)
    assert res.pack.validation["spearman_rho"] == r["spearman_rho"]
    res.pack.save(tmp_path / "pack.json")
    assert FeaturePack.load(tmp_path / "pack.json").validation["verdict"] == r["verdict"]


@pytest.mark.parametrize("which", ["discovery", "validation"])
def test_one_class_split_is_an_error_naming_the_split(tmp_path, which):
    labels = np.array([0, 1] * 30)
    rs = _synthetic_rollouts(tmp_path / "r", labels)
    disc, val = split_questions(rs.question_ids, 20, 40, seed=0)
    flip = set(disc if which == "discovery" else val)
    for shard_labels in [rs.records]:
        for rec in shard_labels:
            if rec["question_id"] in flip:
                rec["correct"] = False
    with pytest.raises(DataError, match=f"{which} split.*all wrong"):
        run_gate(rs, G1Protocol(n_discovery=20, n_validation=40, n_random_packs=10), rs.header["sae"], "m", 2)


# --------------------------------------------------------------------------- the command end to end

def _letter_writing_model(path: Path) -> None:
    """A tiny random model nudged to write standalone `A`/`B` letters, so an MCQ verifier grades some
    responses right and some wrong (a random model alone almost never states an answer)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    with torch.no_grad():  # embedding dim 0 ≡ 1 makes lm_head column 0 a per-token bias
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        for s, bias in [("A", 6.0), ("B", 6.0), (" ", 6.5), (")", 3.0)]:
            model.lm_head.weight[tok(s, add_special_tokens=False)["input_ids"][0], 0] = bias
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_g1_command_end_to_end_on_a_tiny_model(tmp_path):
    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import save_sae

    _letter_writing_model(tmp_path / "model")
    save_sae(SparseAutoencoder.from_config(SAEConfig(64, 128, 8, metadata={"model_name": "tiny", "layer": 1}), seed=1),
             tmp_path / "sae")
    rows = [{"question": f"Is {i} even?", "options": ["yes", "no"], "answer_letter": "AB"[i % 2]} for i in range(70)]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "true"}
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mechreward.g1", f"hydra.run.dir={out}", f"model.name_or_path={tmp_path / 'model'}",
            "model.device=cpu", "task.name=mcq", f"task.source={tmp_path / 'q.jsonl'}", "task.n=null",
            f"sae.path={tmp_path / 'sae'}", "sampling.max_new_tokens=16", "sampling.batch_size=35",
            "questions_per_shard=35", "n_discovery=30", "n_validation=40", "n_random_packs=100", "n_boot=200",
            "n_perm=500"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("spearman_rho", "p_value", "ci95", "permutation_p", "auroc", "n_discovery", "n_validation",
                "n_correct_validation", "verdict", "flags", "controls", "pack_path"):
        assert key in report, key
    assert set(report["controls"]) >= {"length_rho", "logprob_rho", "direction_rho", "random_pack_rho_p95",
                                       "partial_rho_length"}
    assert report["n_discovery"] == 30 and report["n_validation"] == 40
    assert report["verdict"] == verdict(report["spearman_rho"])
    pack = FeaturePack.load(report["pack_path"])
    assert pack.validation["spearman_rho"] == report["spearman_rho"] and pack.layer == 1
    rs = RolloutSet(out / "rollouts")
    val = np.isin(rs.question_ids, pack.provenance["validation"])
    score = pack.score_pooled(rs.codes("mean").numpy()[val])
    assert report["spearman_rho"] == pytest.approx(sps.spearmanr(score, rs.labels[val]).statistic, abs=1e-9)
    for name in ("report.md", "score_by_outcome.png", "null_distribution.png", "feature_pack.json"):
        assert (out / name).exists(), name
    # reusing the rollouts for another model is refused with a clear message
    bad = subprocess.run(args[:3] + [f"hydra.run.dir={tmp_path / 'run2'}", "model.name_or_path=other/model",
                                      f"rollouts={out / 'rollouts'}", f"sae.path={tmp_path / 'sae'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "other/model" in bad.stderr and "Traceback" not in bad.stderr
