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

from mechreward import stats
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
            f"sae.path={tmp_path / 'sae'}", "sampling.n=2", "sampling.max_new_tokens=16", "sampling.batch_size=70",
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
    assert report["n_validation_responses"] == 80  # two rollouts per question
    assert report["conclusion"].startswith(f"G1 {report['verdict']}") and "within" in report
    assert report["verdict"] == verdict(report["spearman_rho"])
    pack = FeaturePack.load(report["pack_path"])
    assert pack.validation["flags"] == report["flags"]
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


# --------------------------------------------------------------------------- within questions, flags, selection

def _grouped(seed, G=150, m=4, within=1.2):
    """G questions x m rollouts, P(correct) = sigmoid(easiness_q + within * x); returns x, easiness, y, groups."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), m)
    easy = rng.normal(scale=1.5, size=G)
    x = rng.normal(size=G * m)
    y = (rng.random(G * m) < 1 / (1 + np.exp(-(easy[g] + within * x)))).astype(int)
    return x, easy[g] + rng.normal(scale=0.3, size=G * m), y, g.astype(str), rng


def _brute_within(s, y, g):
    wins = pairs = 0.0
    for q in np.unique(g):
        m = g == q
        d = s[m][y[m] == 1][:, None] - s[m][y[m] == 0][None, :]
        wins += (d > 0).sum() + 0.5 * (d == 0).sum()
        pairs += d.size
    return wins / pairs


def test_within_numbers_for_the_pack_and_every_control_and_no_flags_for_a_real_within_signal():
    x, _, y, g, rng = _grouped(0)
    length, logprob, direction = rng.normal(size=y.size), rng.normal(size=y.size), rng.normal(size=y.size)
    r = g1_statistics(x, y, g, length, logprob, direction, rng.normal(scale=0.02, size=100), n_boot=300, n_perm=500,
                      random_within_aurocs=0.5 + rng.normal(scale=0.02, size=100))
    assert r["within"]["pack"]["auroc"] == pytest.approx(_brute_within(x, y, g), abs=1e-12)
    for name, v in [("length", length), ("logprob", logprob), ("direction", direction)]:
        assert r["within"]["controls"][name]["auroc"] == pytest.approx(_brute_within(v, y, g), abs=1e-12)
    assert r["n_mixed_questions"] == sum(0 < y[g == q].sum() < 4 for q in np.unique(g))
    want = stats.incremental_lrt(x, y, np.column_stack([length, logprob]), groups=g)
    assert r["incremental"]["within"]["chi2"] == pytest.approx(want.chi2) and r["incremental"]["within"]["p"] < 1e-3
    assert r["incremental"]["across"]["p"] < 1e-3
    assert not {"BEATEN_BY_BASELINE", "NOT_SIGNIFICANT", "UNINFORMATIVE_WITHIN"} & set(r["flags"]), r["flags"]
    assert r["beaten_by"] == [] and "supports it as a GRPO reward" in r["conclusion"]


def test_across_only_signal_is_flagged_uninformative_within():
    x, easy, y, g, rng = _grouped(1)
    r = g1_statistics(easy, y, g, rng.normal(size=y.size), rng.normal(size=y.size), rng.normal(size=y.size), [],
                      n_boot=300, n_perm=500)
    assert r["spearman_rho"] > 0.3 and r["verdict"] in ("PASS", "PASS-EXCELLENT") and r["p_value"] < 1e-6
    lo, hi = r["within"]["pack"]["ci95"]
    assert lo < 0.5 < hi and "UNINFORMATIVE_WITHIN" in r["flags"] and "NOT_SIGNIFICANT" not in r["flags"]
    assert "does not support" in r["conclusion"]


def test_a_better_cheap_signal_flags_beaten_by_baseline_naming_it():
    x, _, y, g, rng = _grouped(2)
    score = x + rng.normal(scale=2.0, size=y.size)  # a noisy copy of the signal
    r = g1_statistics(score, y, g, rng.normal(size=y.size), x, rng.normal(size=y.size), [], n_boot=300, n_perm=500)
    assert "BEATEN_BY_BASELINE" in r["flags"]
    assert any(b.startswith("mean log-prob: |rho|") for b in r["beaten_by"])
    assert any(b.startswith("mean log-prob: within-question AUROC") for b in r["beaten_by"])
    # a control with a strong *negative* within-question AUROC beats the pack too (it can be used negated)
    r2 = g1_statistics(score, y, g, -x, rng.normal(size=y.size), rng.normal(size=y.size), [], n_boot=300, n_perm=500)
    assert any(b.startswith("length: within-question AUROC") for b in r2["beaten_by"])
    assert r2["within"]["controls"]["length"]["auroc"] < 0.4


def test_no_signal_is_not_significant_and_one_rollout_per_question_is_uninformative_within():
    x, _, y, g, rng = _grouped(3)
    r = g1_statistics(rng.normal(size=y.size), y, g, rng.normal(size=y.size), rng.normal(size=y.size),
                      rng.normal(size=y.size), [], n_boot=300, n_perm=500)
    assert r["p_value"] >= 0.05 and "NOT_SIGNIFICANT" in r["flags"]
    one = np.arange(y.size).astype(str)  # every response its own question: nothing within
    r1 = g1_statistics(x, y, one, rng.normal(size=y.size), rng.normal(size=y.size), rng.normal(size=y.size), [],
                       n_boot=300, n_perm=500)
    assert r1["n_mixed_questions"] == 0 and r1["within"]["pack"]["auroc"] is None
    assert "UNINFORMATIVE_WITHIN" in r1["flags"] and r1["incremental"]["within"] is None
    assert r1["incremental"]["across"]["p"] < 1e-3 and "sample several rollouts" in r1["conclusion"]


def _grouped_rollouts(path: Path, seed=0, G=160, m=4, d_sae=30):
    """Rollouts where latent 5 ranks completions within a question and latent 7 only marks easy questions."""
    x, easy, y, g, rng = _grouped(seed, G, m, within=1.5)
    n = y.size
    codes = rng.exponential(size=(n, d_sae)) * (rng.random((n, d_sae)) < 0.3)
    codes[:, 5] = np.maximum(0, 1 + x + rng.normal(scale=0.5, size=n)) * 0.3
    q_easy = np.array([easy[g == q].mean() for q in g])  # one value per question: ties within it
    codes[:, 7] = np.maximum(0, 2 + q_easy) * 2.0
    lengths = rng.integers(5, 50, size=n)
    codes[:, 9] = lengths * 0.1 + rng.random(n) * 0.1  # a latent that counts tokens
    header = {"schema": "mechreward.rollouts", "version": 1, "model": "m", "d_model": 4, "n_layers": 4,
              "layers": [2], "sae_layer": 2, "sae": {"sha256": "s" * 64, "d_sae": d_sae, "layer": 2, "hook": "h"},
              "task": {}, "sampling": {}}
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps(header))
    records = [{"question_id": f"q{g[i]}", "correct": bool(y[i]), "length": int(lengths[i]),
                "logprobs": list(rng.normal(-1, 0.3, size=5)), "finish_reason": "eos"} for i in range(n)]
    t = {"codes.mean": torch.tensor(codes, dtype=torch.float32),
         "resid.mean.L2": torch.tensor(rng.normal(size=(n, 4))).float()}
    write_shard(path / "shard-00000.safetensors", t, records)
    return RolloutSet(path)


def test_within_contrast_selects_the_feature_that_ranks_completions_of_a_question(tmp_path):
    rs = _grouped_rollouts(tmp_path / "r")
    base = dict(n_discovery=80, n_validation=80, n_random_packs=50, n_boot=200, n_perm=300)
    pooled = run_gate(rs, G1Protocol(**base, selection=SelectionConfig(1, 0)), rs.header["sae"], "m", 2)
    within = run_gate(rs, G1Protocol(**base, selection=SelectionConfig(1, 0, contrast="within")), rs.header["sae"], "m", 2)
    assert pooled.pack.indices == [7] and within.pack.indices == [5]
    assert pooled.report["spearman_rho"] > 0.3 and "UNINFORMATIVE_WITHIN" in pooled.report["flags"]
    assert pooled.report["within"]["pack"]["auroc"] == 0.5  # constant within every question
    assert within.report["within"]["pack"]["ci95"][0] > 0.5 and "UNINFORMATIVE_WITHIN" not in within.report["flags"]
    assert within.pack.provenance["selection"]["contrast"] == "within"
    assert within.pack.validation["flags"] == within.report["flags"]
    assert within.pack.validation["within"]["pack"]["auroc"] == within.report["within"]["pack"]["auroc"]


def test_selection_within_and_residualised_statistics_equal_a_direct_computation(tmp_path):
    from mechreward.probe import feature_stats

    rs = _grouped_rollouts(tmp_path / "r")
    codes, y, g, L = rs.codes("mean").numpy().astype(np.float64), rs.labels, rs.question_ids, rs.lengths
    fs = feature_stats(codes, y, contrast="within", groups=g)
    mixed = np.array([0 < y[g == q].sum() < (g == q).sum() for q in g])
    c = codes[mixed][:, fs.index]
    qm = {q: c[g[mixed] == q].mean(0) for q in np.unique(g[mixed])}
    cc = c - np.stack([qm[q] for q in g[mixed]])
    ym = y[mixed]
    a, b = cc[ym == 1], cc[ym == 0]
    sd = np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    d = np.divide(a.mean(0) - b.mean(0), sd, out=np.zeros(sd.shape), where=sd > 1e-9)  # latent 7: 0 within
    assert fs.d == pytest.approx(d, abs=1e-9) and fs.d[fs.index == 7] == 0
    assert fs.fire_count == pytest.approx((codes[:, fs.index] != 0).sum(0))  # fire counts stay those of raw codes
    # length-residualised: the token-counting latent 9 loses its length-driven effect
    fr = feature_stats(codes, y, lengths=L, residualise_length=True)
    j = int(np.flatnonzero(fr.index == 9)[0])
    res = codes[:, 9] - np.polyval(np.polyfit(L, codes[:, 9], 1), L)
    want = (res[y == 1].mean() - res[y == 0].mean()) / np.sqrt((res[y == 1].var(ddof=1) + res[y == 0].var(ddof=1)) / 2)
    assert fr.d[j] == pytest.approx(want, abs=1e-9) and abs(fr.d[j]) < 0.25
    with pytest.raises(Exception, match="contrast=within needs"):
        feature_stats(codes, y, contrast="within")
    with pytest.raises(Exception, match="unknown selection.contrast 'across'"):
        feature_stats(codes, y, contrast="across", groups=g)
    one = np.arange(len(y)).astype(str)
    with pytest.raises(DataError, match="sampling.n"):
        feature_stats(codes, y, contrast="within", groups=one)


def test_incremental_validity_leaves_out_a_constant_covariate():
    """Every completion the same length (the planted organism): the LRTs run on mean log-prob alone."""
    from mechreward.gates.g1 import incremental_validity

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 4).astype(str)
    labels = (rng.random(160) < 0.5).astype(int)
    score = labels + rng.normal(size=160)
    out = incremental_validity(score, labels, groups, np.full(160, 38.0), rng.normal(size=160))
    assert out["covariates"] == ["mean_logprob"] and out["dropped_constant"] == ["length"]
    assert out["within"]["p"] < 0.01 and out["across"]["p"] < 0.01 and out["partial_rho"] is not None
