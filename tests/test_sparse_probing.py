"""Sparse probing: the logistic regression optimum, feature ranking, held-out accuracy, and the command."""

import json

import numpy as np
import pytest
import torch

from mechreward.errors import DataError
from mechreward.sparse_probing import (LogisticModel, SparseProbingConfig, pooled_features, probe_accuracies,
                                       run_sparse_probing, stratified_split)
from mechreward.run import Run
from tiny import tiny_model, tiny_tokenizer



def test_logistic_fit_satisfies_the_l2_optimality_conditions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * [1, 2, 3, 0.5, 1, 10] + 4
    y = (x[:, 0] - 0.5 * x[:, 2] + rng.normal(size=200) > 2.5).astype(int)
    m = LogisticModel(l2=0.01).fit(x, y)
    z = (x - x.mean(0)) / x.std(0)
    p = 1 / (1 + np.exp(-(z @ m.w + m.b)))
    # The penalised log-loss is convex: zero gradient ⇔ the unique optimum.
    np.testing.assert_allclose(z.T @ (p - y) / len(y) + 0.01 * m.w, 0, atol=1e-6)
    assert abs(np.mean(p - y)) < 1e-6
    assert m.converged
    np.testing.assert_array_equal(m.predict(x), (m.decision(x) > 0).astype(int))


def test_stratified_split_keeps_class_proportions_and_is_disjoint():
    y = np.array([1] * 30 + [0] * 70)
    tr, te = stratified_split(y, 0.3, seed=1)
    assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == 100
    assert y[te].sum() == 9 and (1 - y[te]).sum() == 21


def test_one_informative_sae_feature_is_found_at_k1_while_random_residual_dims_are_not_informative():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    sae = np.abs(rng.normal(size=(n, 50))) * (rng.random((n, 50)) < 0.3)
    sae[:, 17] = y * (1 + rng.random(n))  # fires only on positives
    resid = rng.normal(size=(n, 16))
    res = probe_accuracies(sae, resid, y, ks=[1, 2, 5], test_fraction=0.3, seed=0)
    assert res["per_k"][0]["sae_features"] == [17]
    assert res["per_k"][0]["sae_accuracy"] == 1.0
    assert res["resid_full_accuracy"] < 0.7 and 0.45 < res["majority_accuracy"] < 0.6
    assert [r["k"] for r in res["per_k"]] == [1, 2, 5]
    with pytest.raises(DataError):
        probe_accuracies(sae, resid, np.ones(n, dtype=int), ks=[1])


def test_command_on_labelled_texts_pools_each_text_without_padding_effects(tmp_path):
    from mechreward.models import ResidualCapture
    from mechreward.sae.formats import load_sae, save_sae
    from mechreward.sae.model import SAEConfig, SparseAutoencoder

    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    save_sae(SparseAutoencoder.from_config(SAEConfig(d_in=64, d_sae=40, k=8, metadata={"layer": 2}), seed=0),
             tmp_path / "sae")
    rng = np.random.default_rng(0)
    words = ["quick", "brown", "lazy", "dog", "over", "the", "12+7", "19"]
    rows = []
    for i in range(60):
        text = " ".join(rng.choice(words, rng.integers(2, 7)))
        fox = i % 3 == 0
        rows.append({"text": text + (" fox" if fox else " cat"), "label": int(fox)})
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = SparseProbingConfig(texts=str(path), pooling="last", ks=[1, 2, 5])
    cfg.model.name_or_path, cfg.sae.path = str(mdir), str(tmp_path / "sae")
    report = run_sparse_probing(cfg, Run(tmp_path / "run", "sparse_probing"))
    assert report["n_texts"] == 60 and report["n_train"] + report["n_test"] == 60
    assert [r["k"] for r in report["per_k"]] == [1, 2, 5]
    # The label is the last word, read at the last token: the full residual separates it perfectly.
    assert report["resid_full_accuracy"] == 1.0
    # Batched, right-padded pooling equals running each text alone.
    sae = load_sae(tmp_path / "sae")
    texts = [r["text"] for r in rows[:7]]
    codes, resid = pooled_features(model, tok, sae, 2, texts, "mean", batch_size=4)
    for i, t in enumerate(texts):
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        h = ResidualCapture(model, [2]).run(input_ids=ids, use_cache=False)[2][0]
        np.testing.assert_allclose(resid[i], h.mean(0).detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(codes[i], sae.encode_dense(h).mean(0).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "run" / "sparse_probing.png").exists()
