"""The registry of public SAEs, hub sources that fail fast offline and say what to put where, and
`mechreward sae list`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mechreward
from mechreward.errors import SAEFormatError
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae import registry as reg
from mechreward.sae.formats import save_sae

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHREWARD_SAE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "store"


def _qwenscope_file(path, d_in=16, d_sae=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {"W_enc": torch.randn(d_sae, d_in, generator=g), "W_dec": torch.randn(d_in, d_sae, generator=g),
          "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    torch.save(sd, path)
    return sd


def test_shipped_registry_has_the_public_saes_with_their_card_facts():
    r = reg.load_registry()
    q = r["qwenscope-qwen3.5-35b-a3b-base-w128k-l0_100"]
    assert (q.repo, q.format, q.d_in, q.d_sae, q.k, q.layers) == (
        "Qwen/SAE-Res-Qwen3.5-35B-A3B-Base-W128K-L0_100", "qwenscope", 2048, 131072, 100, list(range(40)))
    assert q.files(39) == ["layer39.sae.pt"]
    two_b = r["qwenscope-qwen3.5-2b-base-w32k-l0_100"]
    assert (two_b.d_in, two_b.d_sae, two_b.k, two_b.layers[-1]) == (2048, 32768, 100, 23)
    assert r["qwenscope-qwen3.5-35b-a3b-base-w32k-l0_50"].k == 50
    assert r["qwenscope-qwen3.5-27b-w80k-l0_50"].d_sae == 80 * 1024
    zac = [e for e in r.values() if e.repo == "zactheaipm/qwen35-a3b-saes"]
    assert sorted((e.layers[0], e.d_sae, e.k, e.lr) for e in zac) == [
        (6, 8192, 128, 3e-5), (7, 8192, 128, 3e-5), (14, 16384, 96, 2e-5), (15, 16384, 96, 2e-5),
        (21, 16384, 64, 1e-5), (22, 16384, 64, 1e-5), (23, 16384, 64, 1e-5), (34, 16384, 64, 8e-6),
        (35, 16384, 64, 8e-6)]
    assert r["zactheaipm-qwen35-a3b-delta-mid-pos1"].files(21) == ["sae_delta_mid_pos1/config.json",
                                                                   "sae_delta_mid_pos1/weights.safetensors"]
    multi = r["caiovicentino-qwen36-27b-multilayer"]
    assert multi.files(55) == ["sae_L55_n4096_k32.pt"] and (multi.d_in, multi.layers) == (5120, [11, 31, 55])
    l23 = r["caiovicentino-qwen36-35b-a3b-l23"]
    assert (l23.files(23), l23.d_sae, l23.k) == (["sae_step_22674_92M_tokens.pt"], 32768, 128)
    four_b = r["caiovicentino-qwen35-4b-l18"]
    assert not four_b.verified and "UNVERIFIED" in four_b.notes and four_b.layers == [18]
    with pytest.raises(SAEFormatError, match="file name is not known"):
        four_b.files(18)
    with pytest.raises(SAEFormatError, match="has no SAE for layer 12"):
        multi.pick_layer(12)


def test_registry_with_an_unknown_key_names_the_entry(tmp_path):
    (tmp_path / "r.yaml").write_text("saes:\n  - {name: a, repo: x/y, format: qwenscope, model: m, layers: [1], "
                                     "widht: 3}\n")
    with pytest.raises(SAEFormatError, match=r"entry 'a' has unknown keys \['widht'\]"):
        reg.load_registry(tmp_path / "r.yaml")


def test_offline_hub_source_fails_fast_naming_repo_file_and_local_path(store):
    t0 = time.time()
    with pytest.raises(SAEFormatError) as e:
        mechreward.load_sae("Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_100", layer=3)
    assert time.time() - t0 < 10
    msg = str(e.value)
    mirror = store / "hub" / "Qwen" / "SAE-Res-Qwen3.5-2B-Base-W32K-L0_100"
    assert "Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_100" in msg and "'layer3.sae.pt'" in msg
    assert "HF_HUB_OFFLINE" in msg and f"load_sae('{mirror / 'layer3.sae.pt'}')" in msg
    # Put the file where the message says: the same call now works offline, k from the release name.
    _qwenscope_file(mirror / "layer3.sae.pt")
    sae = mechreward.load_sae("Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_100", layer=3)
    md = sae.cfg.metadata
    assert (md["format"], md["k"], md["layer"]) == ("qwenscope", 100, 3)


def test_registry_names_resolve_with_hints_and_checks(store, tmp_path, monkeypatch):
    (tmp_path / "r.yaml").write_text(
        "saes:\n"
        "  - {name: tiny-scope, repo: acme/tiny-scope, format: qwenscope, file: 'layer{layer}.sae.pt',\n"
        "     model: acme/tiny, layers: '0-3', d_in: 16, d_sae: 128, k: 7}\n"
        "  - {name: wrong-width, repo: acme/tiny-scope, format: qwenscope, file: 'layer{layer}.sae.pt',\n"
        "     model: acme/tiny, layers: [2], d_in: 32, d_sae: 128, k: 7}\n")
    monkeypatch.setattr(reg, "REGISTRY_FILE", tmp_path / "r.yaml")
    with pytest.raises(SAEFormatError, match="covers layers 0-3; pass layer="):
        mechreward.load_sae("registry:tiny-scope")
    with pytest.raises(SAEFormatError, match=r"acme/tiny-scope.*'layer2\.sae\.pt'"):
        mechreward.load_sae("tiny-scope", layer=2)
    sd = _qwenscope_file(store / "hub" / "acme" / "tiny-scope" / "layer2.sae.pt")
    sae = mechreward.load_sae("tiny-scope", layer=2)
    md = sae.cfg.metadata
    assert (md["k"], md["model"], md["layer"], md["hook"]) == (7, "acme/tiny", 2, "model.layers.2")
    x = torch.randn(5, 16)
    v, i = (x @ sd["W_enc"].T + sd["b_enc"]).topk(7, dim=-1)
    torch.testing.assert_close(sae.encode_dense(x), torch.zeros(5, 128).scatter(-1, i, v), rtol=1e-5, atol=1e-5)
    with pytest.raises(SAEFormatError, match="d_in is 16, but the registry says 32"):
        mechreward.load_sae("registry:wrong-width")
    with pytest.raises(SAEFormatError, match="no SAE named 'nope'"):
        mechreward.load_sae("registry:nope")


def test_sae_list_prints_the_registry_and_local_saes(store):
    sae = SparseAutoencoder(SAEConfig(16, 64, 4, metadata={"model_name": "organism", "layer": 2}))
    save_sae(sae, store / "organism-L2-k4-64")
    save_sae(sae, store / "sparse-run" / "layers.5", format="sparsify")
    env = {**os.environ, "MECHREWARD_SAE_DIR": str(store)}
    r = subprocess.run([sys.executable, "-m", "mechreward", "sae", "list"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "qwenscope-qwen3.5-35b-a3b-base-w128k-l0_100" in out and "zactheaipm/qwen35-a3b-saes" in out
    assert "caiovicentino1/Qwen3.6-35B-A3B-SAE-L23-topk-wip" in out
    local = out.split("Local SAEs")[1]
    row = next(line for line in local.splitlines() if line.startswith("organism-L2-k4-64"))
    assert row.split()[:5] == ["organism-L2-k4-64", "organism", "2", "64", "4"]
    assert any(line.startswith("sparse-run/layers.5") and " 5 " in line for line in local.splitlines())
    bad = subprocess.run([sys.executable, "-m", "mechreward", "sae", "list", "--registry", str(store / "none.yaml")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "registry not found" in bad.stderr and "Traceback" not in bad.stderr
