"""Native checkpoints are SAELens v6 directories: both libraries read each other's TopK SAEs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechreward.errors import SAEFormatError
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.formats import load_sae, save_sae, sha256_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trained_like(d_in=16, d_sae=64, k=4, scale=0.37, **kw):
    sae = SparseAutoencoder.from_config(SAEConfig(d_in, d_sae, k, metadata={"model_name": "tiny-qwen3", "layer": 2,
                                                                            "tokens": 12345}, **kw), seed=3)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.act_scale.fill_(scale)
    return sae


def test_native_round_trip_keeps_codes_and_reports_provenance(tmp_path):
    sae = trained_like()
    x = torch.randn(20, 16) * 3
    path = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert sae.act_scale.item() == pytest.approx(0.37)  # saving folds a copy, not the caller's SAE
    loaded = load_sae(path)
    assert loaded.act_scale.item() == 1.0
    torch.testing.assert_close(loaded.encode_dense(x), sae.encode_dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(*loaded.encode(x)), sae.decode(*sae.encode(x)), rtol=1e-5, atol=1e-5)
    md = loaded.cfg.metadata
    assert md["format"] == "native" and (md["d_in"], md["d_sae"], md["k"]) == (16, 64, 4)
    assert md["model"] == "tiny-qwen3" and md["layer"] == 2 and md["hook"] == "model.layers.2"
    assert md["tokens"] == 12345
    assert md["sha256"] == sha256_file(path / "sae_weights.safetensors")
    # no temp directories left beside it; overwriting replaces atomically
    save_sae(trained_like(scale=1.0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert load_sae(path).cfg.metadata["sha256"] != md["sha256"]


def test_sae_lens_loads_our_checkpoint_with_identical_codes(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like()
    save_sae(sae, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == 4
    assert theirs.cfg.metadata.model_name == "tiny-qwen3"
    x = torch.randn(50, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode_dense(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), sae.decode(*sae.encode(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_sae_lens_topk_checkpoint_loads_with_identical_codes(tmp_path, rescale):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=16, d_sae=64, k=5, dtype="float32", device="cpu", rescale_acts_by_decoder_norm=rescale)
    cfg.metadata.model_name = "m"
    cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    theirs = TopKSAE(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (theirs.W_enc, theirs.W_dec, theirs.b_enc, theirs.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
    theirs.save_model(str(tmp_path / "sl"))
    ours = load_sae(tmp_path / "sl")
    x = torch.randn(40, 16) * 2
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_dense(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(*ours.encode(x)), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours.cfg.metadata["hook"] == "blocks.3.hook_resid_post" and ours.cfg.metadata["model"] == "m"


def test_batchtopk_round_trips_through_sae_lens_jumprelu(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like(architecture="batchtopk", scale=1.0)
    sae.train()
    sae(torch.randn(64, 16) * 3)  # sets the inference threshold
    sae.eval()
    save_sae(sae, tmp_path / "b")
    x = torch.randn(30, 16) * 3
    loaded = load_sae(tmp_path / "b")
    assert loaded.cfg.architecture == "batchtopk" and loaded.cfg.k == 4
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "b"))
    with torch.no_grad():
        ref = sae.encode_dense(x)
        assert (ref != 0).any()
        torch.testing.assert_close(loaded.encode_dense(x), ref)
        torch.testing.assert_close(theirs.encode(x), ref)


def test_broken_checkpoints_raise_format_errors_naming_file_and_key(tmp_path):
    path = save_sae(trained_like(), tmp_path / "s")
    cfg = json.loads((path / "cfg.json").read_text())
    weights = load_file(str(path / "sae_weights.safetensors"))

    bad = dict(cfg)
    del bad["d_sae"]
    (path / "cfg.json").write_text(json.dumps(bad))
    with pytest.raises(SAEFormatError, match=r"cfg\.json: missing key 'd_sae'"):
        load_sae(path)
    (path / "cfg.json").write_text(json.dumps(cfg))

    for key, tensor, msg in [("W_dec", weights["W_dec"].t().contiguous(), r"'W_dec' has shape \(16, 64\)"),
                             ("b_enc", torch.full((64,), float("nan")), "'b_enc' contains NaN"),
                             ("W_enc", None, "missing tensor 'W_enc'")]:
        broken = dict(weights)
        if tensor is None:
            del broken[key]
        else:
            broken[key] = tensor
        save_file(broken, str(path / "sae_weights.safetensors"))
        with pytest.raises(SAEFormatError, match=f"sae_weights.safetensors: .*{msg}"):
            load_sae(path)

    with pytest.raises(SAEFormatError, match="no such SAE checkpoint"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError, match="unknown SAE format"):
        load_sae(tmp_path / "empty")
