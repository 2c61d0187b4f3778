"""Feature Rivalry: entropy, pairwise correlations, group comparison, and the command on a tiny model."""

import json

import numpy as np
import pytest
import torch
from scipy import stats as sps

from mechreward.errors import DataError
from mechreward.rivalry import RivalryConfig, compare_groups, empirical_entropy, pairwise_correlations, run_rivalry
from mechreward.run import Run
from tiny import tiny_model, tiny_tokenizer



def test_empirical_entropy_in_nats():
    assert empirical_entropy(["a"] * 20) == 0.0
    assert empirical_entropy(["a"] * 10 + ["b"] * 10) == pytest.approx(np.log(2))
    assert empirical_entropy(list(range(20))) == pytest.approx(np.log(20))
    assert empirical_entropy([None, None, "7", "7"]) == pytest.approx(np.log(2))  # a missing answer is an outcome


def test_split_puts_questions_above_the_quantile_in_the_ambiguous_group_even_with_ties():
    from mechreward.rivalry import split_by_entropy

    t, amb = split_by_entropy(np.array([0.0, 0.0, 0.5, 1.0, 2.0]), 0.5)
    assert t == 0.5 and amb.tolist() == [False, False, False, True, True]
    t, amb = split_by_entropy(np.array([0.0, 0.3, 2.0, 2.0, 2.0]), 0.5)
    assert t == 2.0 and amb.tolist() == [False, False, True, True, True]


def test_pairwise_correlations_are_every_pearson_pair_once():
    x = np.random.default_rng(0).normal(size=(12, 5))
    got = pairwise_correlations(x)
    want = [sps.pearsonr(x[:, i], x[:, j])[0] for i in range(5) for j in range(i + 1, 5)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_anticorrelated_features_in_ambiguous_questions_lower_the_5th_percentile():
    rng = np.random.default_rng(0)
    q, f = 60, 12
    codes = np.abs(rng.normal(size=(q, f))) + 0.1
    amb = np.arange(q) < 30
    # In ambiguous questions features 0-5 compete with features 6-11: one rises as the other falls.
    s = rng.uniform(0, 2, size=30)
    for i in range(6):
        codes[:30, i] = s + 0.05 * rng.random(30)
        codes[:30, i + 6] = 2 - s + 0.05 * rng.random(30)
    codes[40:, 11] = 0  # fires in only 10 unambiguous questions: still kept at min_fire=3
    codes[35:, 10] = 0
    codes[:, 9][~amb] = 0  # never fires in unambiguous questions: dropped
    res = compare_groups(codes, amb, min_fire=3, n_perm=50, seed=0)
    assert 9 not in res["features"] and 10 in res["features"] and res["n_features"] == 11
    assert res["n_pairs"] == 11 * 10 // 2 == res["r_ambiguous"].size
    assert res["p5_ambiguous"] < -0.9 < res["p5_unambiguous"]
    assert res["p5_ambiguous"] == pytest.approx(np.percentile(res["r_ambiguous"], 5))
    u = sps.mannwhitneyu(res["r_ambiguous"], res["r_unambiguous"], alternative="two-sided")
    assert (res["mannwhitney_u"], res["mannwhitney_p"]) == pytest.approx((u.statistic, u.pvalue))
    assert res["permutation_p"] == pytest.approx(1 / 51)
    with pytest.raises(DataError, match="each group needs >= 3"):
        compare_groups(codes, np.arange(q) < 2)


def test_rivalry_command_groups_by_sampled_entropy_and_reads_the_last_prompt_token(tmp_path):
    from mechreward.models import ResidualCapture
    from mechreward.prompts import prompt_ids
    from mechreward.sae.formats import save_sae
    from mechreward.sae.model import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae
    from mechreward.tasks import load_task

    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    with torch.no_grad():  # peaked next-token distributions, so questions differ in entropy
        model.lm_head.weight.mul_(40)
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    sae = SparseAutoencoder.from_config(SAEConfig(d_in=64, d_sae=32, k=8, metadata={"layer": 1}), seed=0)
    with torch.no_grad():
        sae.b_enc.add_(0.3)
    save_sae(sae, tmp_path / "sae")
    cfg = RivalryConfig(n_samples=8, entropy_of="first_token", n_perm=20, min_fire=2)
    cfg.model.name_or_path, cfg.sae.path, cfg.task.n = str(mdir), str(tmp_path / "sae"), 16
    report = run_rivalry(cfg, Run(tmp_path / "run", "rivalry"))
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["n_ambiguous"] + on_disk["n_unambiguous"] == 16
    ent = np.array(report["entropies"])
    assert np.all(ent >= 0) and np.all(ent <= np.log(8) + 1e-9) and np.unique(ent).size > 1
    t = np.quantile(ent, 0.5)
    assert report["ambiguous"] == ((ent > t) if (ent > t).any() else (ent >= t)).tolist()
    # Brute force: codes at each prompt's last token, each prompt run alone (no padding).
    sae = load_sae(tmp_path / "sae")
    qs = load_task(cfg.task).questions
    codes = []
    for ids in prompt_ids(tok, qs, chat=False):
        h = ResidualCapture(model, [1]).run(input_ids=torch.tensor([ids]), use_cache=False)[1][0, -1]
        codes.append(sae.encode_dense(h).detach().numpy())
    want = compare_groups(np.stack(codes), np.array(report["ambiguous"]), min_fire=2)
    assert report["features"] == want["features"]
    assert report["p5_ambiguous"] == pytest.approx(want["p5_ambiguous"], abs=1e-5)
    assert report["p5_unambiguous"] == pytest.approx(want["p5_unambiguous"], abs=1e-5)
    assert (tmp_path / "run" / "rivalry.png").stat().st_size > 5000
