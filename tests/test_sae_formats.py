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
        torch.testing.assert_close(ours.decode(*ours.encode(x)), theirs(x), rtol=1e-5, atol=1e-4)  # float32 sums
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


# --------------------------------------------------------------------------- public formats
# Each layout is written from random weights exactly as SAE.md documents it, and the codes are
# checked against an encode written here from that table (not by calling our loader).

def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _dense(values, indices, d_sae):
    return torch.zeros(values.shape[0], d_sae).scatter(-1, indices, values)


def _check_codes(sae, x, dense_ref, recon_ref):
    torch.testing.assert_close(sae.encode_dense(x), dense_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(*sae.encode(x)), recon_ref, rtol=1e-5, atol=1e-4)


def write_qwenscope(path, d_in=16, d_sae=96, seed=0):
    sd = {"W_enc": _rand(d_sae, d_in, seed=seed, scale=0.1), "W_dec": _rand(d_in, d_sae, seed=seed + 1),
          "b_enc": _rand(d_sae, seed=seed + 2) - 2.0, "b_dec": _rand(d_in, seed=seed + 3, scale=5.0)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def qwenscope_reference(sd, x, k):
    pre = x @ sd["W_enc"].T + sd["b_enc"]  # no b_dec subtraction
    v, i = pre.topk(k, dim=-1)  # no ReLU
    z = _dense(v, i, sd["W_enc"].shape[0])
    return z, z @ sd["W_dec"].T + sd["b_dec"]


def test_qwenscope_file_keeps_negative_codes_and_skips_b_dec(tmp_path):
    sd = write_qwenscope(tmp_path / "layer5.sae.pt")
    x = _rand(40, 16, seed=7, scale=2.0)
    sae = load_sae(tmp_path / "layer5.sae.pt", k=6)
    z, recon = qwenscope_reference(sd, x, 6)
    assert (z < 0).any(), "the test needs negative top-k values to tell no-ReLU from ReLU"
    _check_codes(sae, x, z, recon)
    md = sae.cfg.metadata
    assert (md["format"], md["layer"], md["hook"], md["k"], md["d_in"], md["d_sae"]) == \
        ("qwenscope", 5, "model.layers.5", 6, 16, 96)
    assert md["sha256"] == sha256_file(tmp_path / "layer5.sae.pt")
    with pytest.raises(SAEFormatError, match=r"layer5\.sae\.pt: the checkpoint does not store 'k'"):
        load_sae(tmp_path / "layer5.sae.pt")
    # k from the release's name (as in the hub cache path), and a directory of layers picked by layer=
    rel = tmp_path / "SAE-Res-Qwen3.5-2B-Base-W0K-L0_9"
    write_qwenscope(rel / "layer0.sae.pt", seed=1)
    write_qwenscope(rel / "layer3.sae.pt", seed=2)
    got = load_sae(rel, layer=3)
    assert got.cfg.k == 9 and got.cfg.metadata["layer"] == 3
    with pytest.raises(SAEFormatError, match="pick one with layer="):
        load_sae(rel)


def test_zactheaipm_folder_matches_its_documented_encode(tmp_path):
    d, n, k = 16, 80, 5
    folder = tmp_path / "sae_attn_mid"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_dim": d, "dict_size": n, "k": k}))
    w = {"encoder.weight": _rand(n, d, seed=1, scale=0.1), "encoder.bias": _rand(n, seed=2) - 4.0,
         "decoder.weight": _rand(d, n, seed=3), "pre_bias": _rand(d, seed=4, scale=3.0)}
    save_file(w, str(folder / "weights.safetensors"))
    x = _rand(30, d, seed=5, scale=2.0)
    pre = (x - w["pre_bias"]) @ w["encoder.weight"].T + w["encoder.bias"]
    v, i = pre.topk(k, dim=-1)
    z = _dense(v.clamp(min=0), i, n)
    assert (v < 0).any() and (z != 0).any()
    sae = load_sae(folder, layer=23, model="Qwen/Qwen3.5-35B-A3B")
    _check_codes(sae, x, z, z @ w["decoder.weight"].T + w["pre_bias"])
    md = sae.cfg.metadata
    assert (md["format"], md["layer"], md["model"], md["sae_id"]) == ("zactheaipm", 23, "Qwen/Qwen3.5-35B-A3B",
                                                                      "sae_attn_mid")
    (folder / "config.json").write_text(json.dumps({"hidden_dim": d, "dict_size": n, "k": k, "layer": 23}))
    with pytest.raises(SAEFormatError, match=r"config\.json: the checkpoint is for layer 23, but layer=3"):
        load_sae(folder, layer=3)
    (folder / "config.json").write_text(json.dumps({"hidden_dim": d, "k": k}))
    with pytest.raises(SAEFormatError, match=r"config\.json: missing key 'dict_size'"):
        load_sae(folder)


def test_caiovicentino_pt_matches_its_documented_encode(tmp_path):
    d, n = 16, 64
    sd = {"W_enc": _rand(d, n, seed=1, scale=0.1), "W_dec": _rand(n, d, seed=2), "b_enc": _rand(n, seed=3) - 2.5,
          "b_dec": _rand(d, seed=4, scale=3.0), "d_model": d, "d_sae": n, "k": 7, "step": 22674}
    torch.save(sd, tmp_path / "sae_L11_n64_k7.pt")
    x = _rand(30, d, seed=5, scale=2.0)
    v, i = ((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]).topk(7, dim=-1)
    z = _dense(v.relu(), i, n)
    sae = load_sae(tmp_path / "sae_L11_n64_k7.pt")
    _check_codes(sae, x, z, z @ sd["W_dec"] + sd["b_dec"])
    md = sae.cfg.metadata
    assert (md["format"], md["k"], md["layer"], md["step"]) == ("caiovicentino", 7, 11, 22674)
    with pytest.raises(SAEFormatError, match="key 'k' is 7, but k=8 was given"):
        load_sae(tmp_path / "sae_L11_n64_k7.pt", k=8)
    torch.save({**sd, "d_sae": 65}, tmp_path / "bad.pt")
    with pytest.raises(SAEFormatError, match=r"bad\.pt: key 'd_sae' is 65"):
        load_sae(tmp_path / "bad.pt")


class _RunsCode:
    """Unpickling this object calls open(marker, 'w'): code execution a loader must never allow."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    sd = {"W_enc": _rand(16, 64), "W_dec": _rand(64, 16), "b_enc": _rand(64), "b_dec": _rand(16), "k": 4,
          "payload": _RunsCode(marker)}
    torch.save(sd, tmp_path / "sae.pt")
    torch.load(tmp_path / "sae.pt", weights_only=False)  # proof the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    for path in (tmp_path / "sae.pt", tmp_path / "layer2.sae.pt"):
        if path.name != "sae.pt":
            os.replace(tmp_path / "sae.pt", path)
        with pytest.raises(SAEFormatError, match=rf"{path.name}: refused to load: the pickle holds objects other"):
            load_sae(path, k=4)
        assert not marker.exists()


def test_broken_pt_checkpoints_name_file_and_key(tmp_path):
    sd = write_qwenscope(tmp_path / "layer1.sae.pt")
    for key, t, msg in [("W_dec", sd["W_dec"].T.contiguous(), r"'W_dec' has shape \(96, 16\), expected \(16, 96\)"),
                        ("b_enc", torch.full((96,), float("nan")), "'b_enc' contains NaN"),
                        ("W_enc", None, "missing tensor 'W_enc'")]:
        broken = dict(sd)
        if t is None:
            del broken[key]
        else:
            broken[key] = t
        torch.save(broken, tmp_path / "layer1.sae.pt")
        with pytest.raises(SAEFormatError, match=rf"layer1\.sae\.pt: .*{msg}"):
            load_sae(tmp_path / "layer1.sae.pt", k=4)
    torch.save([1, 2, 3], tmp_path / "layer1.sae.pt")
    with pytest.raises(SAEFormatError, match="expected a dict of tensors"):
        load_sae(tmp_path / "layer1.sae.pt", k=4)
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(SAEFormatError, match="unknown SAE format"):
        load_sae(tmp_path / "junk.bin")


# --------------------------------------------------------------------------- the real packages

def _random_sparsify(d_in=16, n=64, k=6, seed=0):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sc = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k))
    with torch.no_grad():
        sc.encoder.bias.copy_(_rand(n, seed=seed + 1) - 0.5)
        sc.b_dec.copy_(_rand(d_in, seed=seed + 2, scale=2.0))
    return sc


def _sparsify_codes(sc, x):
    with torch.no_grad():
        out = sc.encode(x)
        return _dense(out.top_acts, out.top_indices, sc.num_latents), sc.decode(out.top_acts, out.top_indices)


def test_sparsify_checkpoints_load_with_identical_codes_and_pick_hookpoints(tmp_path):
    pytest.importorskip("sparsify")
    run = tmp_path / "run"
    coders = {"layers.1": _random_sparsify(seed=1), "layers.4": _random_sparsify(seed=4)}
    for hp, sc in coders.items():
        sc.save_to_disk(run / hp)
    x = _rand(50, 16, seed=9, scale=2.0)
    ours = load_sae(run, layer=4)
    z, recon = _sparsify_codes(coders["layers.4"], x)
    assert (z != 0).sum(-1).float().mean() > 0
    _check_codes(ours, x, z, recon)
    md = ours.cfg.metadata
    assert (md["format"], md["layer"], md["hook"], md["k"]) == ("sparsify", 4, "layers.4", 6)
    assert md["sha256"] == sha256_file(run / "layers.4" / "sae.safetensors")
    assert load_sae(run, hookpoint="layers.1").cfg.metadata["layer"] == 1
    with pytest.raises(SAEFormatError, match="holds 2 SAE checkpoints"):
        load_sae(run)


def test_sparsify_loads_what_we_write_with_identical_codes(tmp_path):
    from sparsify import SparseCoder

    x = _rand(50, 16, seed=3, scale=3.0)
    for sae in (trained_like(), trained_like(apply_b_dec_to_input=False)):  # the second folds b_dec into the bias
        save_sae(sae, tmp_path / "layers.2", format="sparsify")
        theirs = SparseCoder.load_from_disk(tmp_path / "layers.2")
        z, recon = _sparsify_codes(theirs, x)
        torch.testing.assert_close(z, sae.encode_dense(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recon, sae.decode(*sae.encode(x)), rtol=1e-5, atol=1e-4)
        back = load_sae(tmp_path / "layers.2")
        assert back.cfg.metadata["model"] == "tiny-qwen3" and back.cfg.metadata["tokens"] == 12345


@pytest.mark.parametrize("fmt", ["native", "saelens", "sparsify"])
def test_round_trip_through_each_writable_format_keeps_codes(tmp_path, fmt):
    sae = trained_like()
    x = _rand(60, 16, seed=4, scale=3.0)
    back = load_sae(save_sae(sae, tmp_path / "s", format=fmt))
    assert back.cfg.metadata["format"] == ("sparsify" if fmt == "sparsify" else "native")
    torch.testing.assert_close(back.encode_dense(x), sae.encode_dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.decode(*back.encode(x)), sae.decode(*sae.encode(x)), rtol=1e-5, atol=1e-4)


def test_qwenscope_sae_saves_native_but_is_refused_by_formats_that_would_relu_it(tmp_path):
    sd = write_qwenscope(tmp_path / "layer0.sae.pt")
    sae = load_sae(tmp_path / "layer0.sae.pt", k=6)
    x = _rand(20, 16, seed=2, scale=2.0)
    back = load_sae(save_sae(sae, tmp_path / "n"))
    torch.testing.assert_close(back.encode_dense(x), qwenscope_reference(sd, x, 6)[0], rtol=1e-5, atol=1e-5)
    for fmt in ("saelens", "sparsify"):
        with pytest.raises(SAEFormatError, match="keeps negative top-k values"):
            save_sae(sae, tmp_path / fmt, format=fmt)


def test_pre_6_flat_sae_lens_config_loads_like_sae_lens_reads_it(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    d, n = 16, 64
    w = {"W_enc": _rand(d, n, seed=1), "W_dec": _rand(n, d, seed=2), "b_enc": _rand(n, seed=3) - 1.0,
         "b_dec": _rand(d, seed=4)}
    (tmp_path / "old").mkdir()
    save_file(w, str(tmp_path / "old" / "sae_weights.safetensors"))
    (tmp_path / "old" / "cfg.json").write_text(json.dumps({
        "d_in": d, "d_sae": n, "model_name": "gpt2", "hook_point": "blocks.7.hook_resid_post", "hook_point_layer": 7,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True,
        "normalize_activations": False, "dtype": "float32", "device": "cpu", "context_size": 128}))
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "old"))
    ours = load_sae(tmp_path / "old")
    x = _rand(40, d, seed=6, scale=2.0)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_dense(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(*ours.encode(x)), theirs(x), rtol=1e-5, atol=1e-4)
    md = ours.cfg.metadata
    assert (md["model"], md["layer"], md["hook"], md["k"]) == ("gpt2", 7, "blocks.7.hook_resid_post", 5)
