"""Rollouts: exact sampled ids, capture on completion tokens == an independent forward, resume, mismatch."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mechreward.errors import MismatchError, ShapeError
from mechreward.generate import sample
from mechreward.models import ModelConfig, load_model
from mechreward.rollouts import (POOLINGS, RolloutsConfig, RolloutSet, SAERef, SamplingConfig, generate_rollouts,
                                 load_rollouts, pool_dense, pool_sparse, prompt_ids)
from mechreward.run import Run
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.formats import load_sae, save_sae
from mechreward.tasks import TaskConfig, load_task
from tiny import save_tiny

LAYER = 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "m", "qwen3"))


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    sae = SparseAutoencoder.from_config(SAEConfig(64, 96, 8, metadata={"model_name": "tiny", "layer": LAYER}), seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    return str(save_sae(sae, tmp_path_factory.mktemp("sae") / "sae"))


def _cfg(tiny_dir, sae_dir, out, n_questions=5, **kw):
    sampling = kw.pop("sampling", SamplingConfig(n=2, max_new_tokens=10, batch_size=3, temperature=1.0))
    return RolloutsConfig(model=ModelConfig(name_or_path=tiny_dir, device="cpu"),
                          task=TaskConfig(name="arithmetic", n=n_questions), sampling=sampling, sae=SAERef(sae_dir),
                          layers=[0, LAYER], output=str(out), **kw)


def test_captured_residuals_and_codes_equal_an_independent_forward_on_completion_tokens(tiny_dir, sae_dir, tmp_path):
    cfg = _cfg(tiny_dir, sae_dir, tmp_path / "r", questions_per_shard=3)
    out = generate_rollouts(cfg, Run(tmp_path / "run"))
    rs = RolloutSet(out)
    model, tok = load_model(cfg.model)
    sae = load_sae(sae_dir)
    assert len(rs) == 10 and len(rs.shards) == 2
    # completion ids are exactly those `generate.sample` draws (same seed per shard)
    task = load_task(cfg.task)
    s0 = sample(model, tok, prompt_ids(tok, task.questions[:3], False), n=2, temperature=1.0, max_new_tokens=10,
                batch_size=3, seed=0)
    assert [r["completion_ids"] for r in rs.records[:6]] == [s.completion_ids for s in s0]
    assert [r["logprobs"] for r in rs.records[:6]] == [s.logprobs for s in s0]
    lengths = {len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rs.records}
    assert len(lengths) > 1  # right padding is exercised
    for i, r in enumerate(rs.records):
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        p = len(r["prompt_ids"])
        assert r["length"] == len(r["completion_ids"]) == ids.shape[1] - p
        for layer in (0, LAYER):
            h = hs[layer + 1][0, p:]  # [T, d] completion tokens only
            torch.testing.assert_close(rs.resid(layer, "mean")[i], h.mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rs.resid(layer, "last")[i], h[-1], atol=1e-5, rtol=1e-5)
        h = hs[LAYER + 1][0, p:]
        dense = sae.encode_dense(h)  # [T, d_sae]
        for how in POOLINGS:
            torch.testing.assert_close(rs.codes(how)[i], pool_dense(dense, how), atol=1e-5, rtol=1e-5)
        ptr, idx, val = rs.token_codes(i)
        assert ptr.shape[0] == h.shape[0] + 1
        rebuilt = torch.zeros_like(dense)
        for t in range(h.shape[0]):
            rebuilt[t, idx[ptr[t]:ptr[t + 1]].long()] = val[ptr[t]:ptr[t + 1]]
        torch.testing.assert_close(rebuilt, dense, atol=1e-5, rtol=1e-5)
    header = json.loads((out / "manifest.json").read_text())
    assert header["sae"]["sha256"] == sae.cfg.metadata["sha256"] and header["sae_layer"] == LAYER
    assert header["layers"] == [0, LAYER] and header["model"] == tiny_dir


def test_resume_skips_done_questions_and_appends_new_ones(tiny_dir, sae_dir, tmp_path):
    out = tmp_path / "r"
    cfg = _cfg(tiny_dir, sae_dir, out, n_questions=4, questions_per_shard=2)
    generate_rollouts(cfg, Run(tmp_path / "a"))
    first = load_file(str(out / "shard-00000.safetensors"))
    full = RolloutSet(out).records
    (out / "shard-00001.safetensors").unlink()  # a crash lost the second shard
    cfg.task.n = 6  # and the rerun asks for two more questions
    generate_rollouts(cfg, Run(tmp_path / "b"))
    rs = RolloutSet(out)
    assert sorted(p.name for p in rs.shards) == ["shard-00000.safetensors", "shard-00001.safetensors",
                                                 "shard-00002.safetensors"]
    again = load_file(str(out / "shard-00000.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)  # done shard untouched
    qids = [r["question_id"] for r in rs.records]
    assert len(qids) == 12 and sorted(set(qids)) == sorted({q.id for q in load_task(cfg.task).questions})
    assert all(qids.count(q) == 2 for q in set(qids))
    # the redone shard is the same draw as the lost one (seed per shard number)
    assert [r["completion_ids"] for r in rs.records[4:8]] == [r["completion_ids"] for r in full[4:8]]
    generate_rollouts(cfg, Run(tmp_path / "c"))  # nothing left to do
    assert len(RolloutSet(out).shards) == 3


def test_rollouts_for_another_model_sae_or_sampling_are_refused(tiny_dir, sae_dir, tmp_path):
    out = tmp_path / "r"
    cfg = _cfg(tiny_dir, sae_dir, out, n_questions=2)
    generate_rollouts(cfg, Run(tmp_path / "a"))
    with pytest.raises(MismatchError, match="temperature"):
        generate_rollouts(_cfg(tiny_dir, sae_dir, out, n_questions=2,
                               sampling=SamplingConfig(n=2, max_new_tokens=10, temperature=0.5)), Run(tmp_path / "b"))
    with pytest.raises(MismatchError, match="other/model"):
        load_rollouts(out, model="other/model")
    with pytest.raises(MismatchError, match="sha256"):
        load_rollouts(out, model=tiny_dir, sae_sha256="0" * 64)
    with pytest.raises(MismatchError, match="layer 3"):
        load_rollouts(out, layer=3)
    assert len(load_rollouts(out, model=tiny_dir, sae_sha256=load_sae(sae_dir).cfg.metadata["sha256"])) == 4


def test_sae_whose_width_differs_from_the_hidden_size_is_a_shape_error(tiny_dir, tmp_path):
    bad = SparseAutoencoder.from_config(SAEConfig(32, 64, 4, metadata={"layer": 1}))
    path = save_sae(bad, tmp_path / "bad")
    with pytest.raises(ShapeError, match="d_in=32.*hidden size is 64"):
        generate_rollouts(_cfg(tiny_dir, str(path), tmp_path / "r", n_questions=1), Run(tmp_path / "a"))


@pytest.mark.parametrize("how", POOLINGS)
def test_sparse_pooling_equals_dense_pooling_including_negative_codes(how):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 1, 5])
    n, d_sae, w = int(lengths.sum()), 12, 4
    # latent 7 is selected on every token: its max over negative values must not be clamped to 0
    idx = torch.stack([torch.cat([torch.tensor([7]), 8 + torch.randperm(d_sae - 8, generator=g)[:w - 1]])
                       for _ in range(n)])
    idx[::2, 1:] -= 8  # and some tokens select low latents too
    vals = torch.randn(n, w, generator=g)
    dense = torch.zeros(n, d_sae).scatter(1, idx, vals)
    row = torch.repeat_interleave(torch.arange(3), lengths)
    got = pool_sparse(vals, idx, row, lengths, d_sae, how)
    starts = [0, 3, 4]
    want = torch.stack([pool_dense(dense[s:s + l], how) for s, l in zip(starts, lengths.tolist())])
    torch.testing.assert_close(got, want)
