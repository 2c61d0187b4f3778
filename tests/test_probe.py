"""Probe and pack: planted features are the ones selected; the pack round-trips; the scorer is Σ w·pooled."""

import json

import numpy as np
import pytest
import torch
from scipy import stats as sps

from mechreward.errors import DataError, MismatchError
from mechreward.probe import FeaturePack, SelectionConfig, build_pack, feature_stats, select_features
from mechreward.rollouts import pool_dense
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.formats import load_sae, save_sae

HELPFUL = [3, 11, 40]
HARMFUL = [7, 25]


def _planted(n=120, F=60, seed=0):
    """Sparse non-negative pooled codes; HELPFUL fire more on correct, HARMFUL more on wrong."""
    rng = np.random.default_rng(seed)
    labels = np.array([1, 0] * (n // 2))
    x = rng.exponential(1.0, size=(n, F)) * (rng.random((n, F)) < 0.3)
    for j, f in enumerate(HELPFUL):
        x[:, f] += (2.0 + j) * labels * rng.random(n)
    for j, f in enumerate(HARMFUL):
        x[:, f] += (2.0 + j) * (1 - labels) * rng.random(n)
    x[:, 50] = 0.0  # never fires
    x[:3, 51], x[3:, 51] = 1.0, 0.0  # fires in 3 responses only
    return x, labels


def _ref(d_sae=60):
    return {"path": "/x", "sha256": "a" * 64, "format": "native", "d_in": 16, "d_sae": d_sae, "k": 4,
            "architecture": "topk", "hook": "model.layers.2"}


def test_feature_statistics_match_scipy_and_drop_never_firing_features():
    x, labels = _planted()
    fs = feature_stats(x, labels, min_fire_count=1)
    assert 50 not in fs.index and 51 in fs.index and fs.n_features == 60
    assert 51 not in feature_stats(x, labels, min_fire_count=4).index
    j = int(np.flatnonzero(fs.index == 11)[0])
    pos, neg = x[labels == 1, 11], x[labels == 0, 11]
    d = (pos.mean() - neg.mean()) / np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2)
    assert fs.d[j] == pytest.approx(d)
    assert fs.p[j] == pytest.approx(sps.mannwhitneyu(pos, neg, alternative="two-sided").pvalue)
    assert fs.auroc[j] == pytest.approx(sps.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))
    assert fs.fire_rate_pos[j] == pytest.approx(np.mean(pos != 0))
    assert fs.mean_neg[j] == pytest.approx(neg.mean())
    np.testing.assert_allclose(fs.q, sps.false_discovery_control(fs.p, method="bh"))


def test_selection_picks_exactly_the_planted_helpful_and_harmful_features():
    x, labels = _planted()
    fs = feature_stats(x, labels)
    feats = select_features(fs, SelectionConfig(n_positive=3, n_negative=2))
    assert {f["index"] for f in feats if f["weight"] == 1.0} == set(HELPFUL)
    assert {f["index"] for f in feats if f["weight"] == -1.0} == set(HARMFUL)
    assert all(f["role"] == ("helpful" if f["weight"] > 0 else "harmful") for f in feats)
    by_d = select_features(fs, SelectionConfig(n_positive=3, n_negative=2, weights="d"))
    assert all(f["weight"] == pytest.approx(f["d"]) for f in by_d)
    # default 10 + 10: the planted ones lead each list (largest |d| first)
    top = select_features(fs, SelectionConfig())
    assert {f["index"] for f in top[:3]} == set(HELPFUL) and len(top) <= 20


def test_one_class_labels_are_refused():
    x, _ = _planted()
    with pytest.raises(DataError, match="all wrong"):
        feature_stats(x, np.zeros(len(x)))
    with pytest.raises(DataError, match="at least 2 of each"):
        feature_stats(x, np.array([1] + [0] * (len(x) - 1)))


def test_pack_round_trip_and_empty_packs_are_errors(tmp_path):
    x, labels = _planted()
    pack, _ = build_pack(x, labels, _ref(), "organism", 2, "mean", SelectionConfig(3, 2),
                         provenance={"discovery": ["q1"], "seed": 0})
    path = pack.save(tmp_path / "p.json")
    back = FeaturePack.load(path)
    assert back == pack and back.indices == pack.indices
    r = pack.score_pooled(x)
    assert back.normalisation["mean"] == pytest.approx(r.mean())
    assert back.normalisation["std"] == pytest.approx(r.std(ddof=1))
    with pytest.raises(DataError, match="0"):
        FeaturePack(model="m", layer=0, hook="h", sae=_ref(), features=[])
    obj = json.loads(path.read_text())
    obj["features"] = []
    (tmp_path / "empty.json").write_text(json.dumps(obj))
    with pytest.raises(DataError, match="0 features"):
        FeaturePack.load(tmp_path / "empty.json")
    obj["schema"] = "something_else"
    (tmp_path / "other.json").write_text(json.dumps(obj))
    with pytest.raises(DataError, match="not a feature pack"):
        FeaturePack.load(tmp_path / "other.json")


@pytest.fixture()
def sae_pair(tmp_path):
    a = SparseAutoencoder.from_config(SAEConfig(16, 60, 6, metadata={"layer": 2}), seed=1)
    b = SparseAutoencoder.from_config(SAEConfig(16, 60, 6, metadata={"layer": 2}), seed=2)
    return load_sae(save_sae(a, tmp_path / "a")), load_sae(save_sae(b, tmp_path / "b"))


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "sum"])
def test_scorer_equals_weighted_sum_of_pooled_dense_codes(sae_pair, pooling):
    sae, _ = sae_pair
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g) * 2  # [B, T, d]
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:7], mask[1, 4:6], mask[2, 0:7] = True, True, True
    with torch.no_grad():
        last = sae.encode_dense(hidden[:, -1])  # features active on last tokens, and a never-active one
        chosen = last.sum(0).topk(3).indices.tolist() + [int(last.sum(0).argmin())]
    ref = {**_ref(), "sha256": sae.cfg.metadata["sha256"]}
    pack = FeaturePack(model="m", layer=2, hook="model.layers.2", sae=ref, pooling=pooling,
                       features=[{"index": i, "weight": w} for i, w in zip(chosen, [1.0, -1.0, 0.5, 2.0])])
    got = pack.scorer(sae, model="m")(hidden, mask)
    want = []
    for b in range(3):
        with torch.no_grad():
            dense = sae.encode_dense(hidden[b][mask[b]])  # [T_b, d_sae]
        pooled = pool_dense(dense, pooling)
        want.append(sum(w * pooled[i] for i, w in zip(pack.indices, pack.weights)))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    assert any(abs(float(v)) > 1e-3 for v in want)  # the features do fire: the comparison means something


def test_pack_refuses_another_sae_or_model(sae_pair):
    a, b = sae_pair
    pack = FeaturePack(model="organism", layer=2, hook="h", sae={**_ref(), "sha256": a.cfg.metadata["sha256"]},
                       features=[{"index": 1, "weight": 1.0}])
    pack.scorer(a, model="organism")
    with pytest.raises(MismatchError, match="sha256"):
        pack.scorer(b)
    with pytest.raises(MismatchError, match="other"):
        pack.scorer(a, model="other")
    fresh = SparseAutoencoder.from_config(SAEConfig(16, 60, 6))
    with pytest.raises(MismatchError, match="no sha256"):
        pack.scorer(fresh)
