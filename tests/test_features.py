"""Feature characterisation: streaming counts and top contexts vs brute force, logit effect through the
final norm, rollout AUROC, the command on a tiny model, and `mechreward inspect`."""

import json

import numpy as np
import pytest
import torch

from mechreward.errors import DataError
from mechreward.features import (FeatureCounter, FeaturesConfig, characterize, density_class, format_inspection,
                                 inspect_text, logit_effects, rollout_stats)
from mechreward.models import ResidualCapture, find_final_norm
from mechreward.run import Run
from mechreward.sae.formats import load_sae, save_sae
from mechreward.sae.model import SAEConfig, SparseAutoencoder
from tiny import tiny_model, tiny_tokenizer



def _sparse_codes(g, B, T, F, p=0.15):
    z = torch.rand(B, T, F, generator=g) * (torch.rand(B, T, F, generator=g) < p)
    return z


def test_streaming_top_contexts_equal_brute_force_over_all_tokens():
    g = torch.Generator().manual_seed(0)
    F, T, N, w = 7, 9, 4, 2
    batches = [(torch.randint(0, 50, (B, T), generator=g), _sparse_codes(g, B, T, F), torch.rand(B, T, generator=g) > 0.2)
               for B in (3, 5, 2)]
    c = FeatureCounter(F, top_n=N, window=w)
    for ids, z, keep in batches:
        c.update(ids, z, keep)
    ids = torch.cat([b[0] for b in batches])  # [S, T]
    z = torch.cat([b[1] * b[2][..., None] for b in batches])  # kept codes only
    keep = torch.cat([b[2] for b in batches])
    assert c.n_tokens == int(keep.sum())
    flat = z.reshape(-1, F)
    assert torch.equal(c.fire_count, (flat != 0).sum(0))
    fired = (flat != 0).sum(0).clamp_min(1).double()
    np.testing.assert_allclose(c.mean_activation, (flat.double().sum(0) / fired).numpy(), rtol=1e-12)
    np.testing.assert_allclose(c.fire_rate, ((flat != 0).sum(0).double() / keep.sum()).numpy())
    for f in range(F):
        expect = flat[:, f].sort(descending=True).values[:N]
        assert torch.equal(c.top.values[f], expect)
        for j in range(N):
            if expect[j] == 0:
                continue
            s, p = c.top.source[f, j].tolist()
            assert z[s, p, f] == c.top.values[f, j]  # the source points at the token with that activation
            for o in range(-w, w + 1):
                t = p + o
                inside = 0 <= t < T
                assert c.top.token_ids[f, j, o + w] == (ids[s, t] if inside else -1)
                assert c.top.acts[f, j, o + w] == (z[s, t, f] if inside else 0)


def test_density_classes_use_the_healthy_range_boundaries():
    rates = np.array([0.0, 1e-6, 0.0049, 0.005, 0.1, 0.30, 0.3001, 1.0])
    assert density_class(rates).tolist() == ["dead", "rare", "rare", "healthy", "healthy", "healthy", "dense", "dense"]


def test_logit_effect_applies_the_final_norm_gain_to_the_decoder_row():
    model = tiny_model("qwen3")
    norm = find_final_norm(model)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.05)
    sae = SparseAutoencoder.from_config(SAEConfig(d_in=64, d_sae=40, k=4), seed=3)
    p_ids, p_val, s_ids, s_val = logit_effects(model, sae, top=5)
    d = sae.W_dec.detach()
    rms = d.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).rsqrt()
    expect = (norm.weight * d * rms) @ model.lm_head.weight.T  # [40, vocab]
    ev, ei = expect.topk(5, dim=1)
    assert torch.equal(p_ids, ei)
    torch.testing.assert_close(p_val, ev, rtol=1e-5, atol=1e-5)
    sv, si = expect.topk(5, dim=1, largest=False)
    assert torch.equal(s_ids, si)
    torch.testing.assert_close(s_val, sv, rtol=1e-5, atol=1e-5)
    raw = (d @ model.lm_head.weight.T).topk(5, dim=1).indices
    assert not torch.equal(raw, p_ids)  # the gain changes which tokens win: it was really applied


def test_rollout_auroc_orders_features_by_how_they_separate_correct_from_wrong():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    x = np.zeros((8, 3))
    x[:, 0] = labels * (2.0 + 0.1 * np.arange(8))  # fires only on correct
    x[:, 1] = (1 - labels) * (0.5 + 0.1 * np.arange(8))  # fires only on wrong
    x[:, 2] = [1, 0, 1, 0, 1, 0, 0, 1]  # half and half in each class
    r = rollout_stats(x, labels, "mean")
    np.testing.assert_allclose(r.auroc, [1.0, 0.0, 0.5])
    assert r.d[0] > 0 > r.d[1]
    np.testing.assert_allclose(r.fire_rate, [0.5, 0.5, 0.5])
    with pytest.raises(DataError, match="all 3 rollouts are correct"):
        rollout_stats(x[:3], labels[:3], "mean")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    sae = SparseAutoencoder.from_config(SAEConfig(d_in=64, d_sae=48, k=6, metadata={"layer": 1}), seed=0)
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    save_sae(sae, root / "sae")
    sae = load_sae(root / "sae")
    corpus = root / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["The quick brown fox", "jumps over", "the lazy dog.", "12+7=19.", "#### 19"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 4)) for _ in range(60)) + "\n")
    return root, model, tok, sae, corpus


def _brute_codes(model, tok, sae, cfg):
    """Dense codes of every kept corpus token, by running each packed row on its own."""
    from mechreward.data import iter_texts, pack

    rows = list(pack(tok, iter_texts(cfg.data), cfg.data.context_length))
    rows = rows[:-(-cfg.tokens // cfg.data.context_length)]
    out = []
    for r in rows:
        x = torch.tensor([r])
        h = ResidualCapture(model, [1]).run(input_ids=x, use_cache=False)[1][0]
        z = sae.encode_dense(h)
        keep = torch.ones(len(r), dtype=torch.bool)
        keep[0] = False
        keep &= x[0] != tok.eos_token_id
        out.append(z[keep].detach())
    return torch.cat(out)


def test_characterize_command_matches_brute_force_and_marks_pack_features(tiny_setup, tmp_path):
    from mechreward.probe import FeaturePack
    from mechreward.rollouts import sae_reference

    root, model, tok, sae, corpus = tiny_setup
    pack = FeaturePack(model="tiny", layer=1, hook="model.layers.1", sae=sae_reference(sae),
                       features=[{"index": 3, "weight": 1.0, "role": "helpful"},
                                 {"index": 5, "weight": -1.0, "role": "harmful"}])
    pack_path = pack.save(tmp_path / "pack.json")
    cfg = FeaturesConfig(tokens=1600, top_n=5, window=3, pack=str(pack_path), browser=True)
    cfg.data.source, cfg.data.context_length, cfg.data.batch_size = str(corpus), 32, 8
    run = Run(tmp_path / "run", "features")
    report = characterize(cfg, run, model=model, tokenizer=tok, sae=sae)
    z = _brute_codes(model, tok, sae, cfg)  # [n, d_sae]
    data = json.loads((tmp_path / "run" / "features.json").read_text())
    rows = data["features"]
    assert data["tokens"] == report["tokens"] == z.shape[0]
    rate = (z != 0).double().mean(0).numpy()
    np.testing.assert_allclose([r["fire_rate"] for r in rows], rate, atol=1e-12)
    np.testing.assert_allclose([r["max_activation"] for r in rows], z.max(0).values.numpy(), rtol=1e-4, atol=1e-6)
    assert [r["density"] for r in rows] == density_class(rate).tolist()
    for r in rows:
        if r["contexts"]:
            top = r["contexts"][0]
            assert top["activation"] == pytest.approx(r["max_activation"], rel=1e-4)
            assert top["acts"][top["center"]] == pytest.approx(top["activation"], rel=1e-3)
            assert len(top["tokens"]) == len(top["acts"]) <= 7
            assert [c["activation"] for c in r["contexts"]] == sorted((c["activation"] for c in r["contexts"]),
                                                                     reverse=True)
    assert rows[3]["pack_role"] == "helpful" and rows[5]["pack_role"] == "harmful"
    assert sum(r["pack_role"] is not None for r in rows) == 2
    assert len(rows[0]["promoted"]) == 10 and len(rows[0]["suppressed"]) == 10
    assert sum(report["density_classes"].values()) == 48
    assert (tmp_path / "run" / "browser" / "index.html").exists()
    assert "window.MECHREWARD_DATA" in (tmp_path / "run" / "browser" / "data.js").read_text()[:40]


def test_inspect_lists_each_tokens_top_features_under_the_exact_encoding(tiny_setup):
    _, model, tok, sae, _ = tiny_setup
    text = "the lazy dog. 12+7=19"
    rows = inspect_text(model, tok, sae, 1, text, top=3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [r["token_id"] for r in rows] == ids
    assert "".join(r["token"] for r in rows) == text
    h = ResidualCapture(model, [1]).run(input_ids=torch.tensor([ids]), use_cache=False)[1][0]
    z = sae.encode_dense(h).detach()
    for t, r in enumerate(rows):
        v, i = z[t].topk(3)
        assert [f for f, _ in r["features"]] == [int(x) for x, y in zip(i, v) if y > 0]
        assert [a for _, a in r["features"]] == pytest.approx([float(y) for y in v if y > 0], rel=1e-5)
    text_out = format_inspection(rows)
    assert len(text_out.splitlines()) == len(ids)
    f0, a0 = rows[0]["features"][0]
    assert f"{f0}:{a0:.3f}" in text_out.splitlines()[0]


def test_inspect_command_prints_one_line_per_token(tiny_setup, tmp_path, capsys):
    from mechreward.__main__ import main

    root, model, tok, sae, _ = tiny_setup
    mdir = tmp_path / "m"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    assert main(["inspect", "the lazy dog", "--model", str(mdir), "--sae", str(root / "sae"), "--top", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(tok("the lazy dog", add_special_tokens=False)["input_ids"]) + 1  # a header line
    assert main(["inspect", "x", "--model", str(mdir), "--sae", str(root / "sae"), "--layer", "9"]) == 2
