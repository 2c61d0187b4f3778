"""`python -m mechreward.sae_eval`: loss recovered is 1 for an identity "SAE" and 0 for a zero one,
the report keeps the training report's keys, and mismatched SAEs fail with one clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechreward.errors import ShapeError
from mechreward.run import Run
from mechreward.sae import SAEConfig, SparseAutoencoder
from mechreward.sae.formats import save_sae
from mechreward.sae_eval import SAEEvalConfig, run_sae_eval

import tiny

ROOT = Path(__file__).resolve().parent.parent
D = 128  # the organism's hidden size
TRAIN_KEYS = {"variance_explained", "l0", "dead_fraction", "alive_fraction", "healthy_fraction", "loss_recovered",
              "kl_sae", "ce_increase", "ce_increase_relative", "loss_recovered_all", "kl_sae_all", "flags", "positions",
              "tokens", "sae_path"}



def identity_sae(layer=3):
    return tiny.identity_sae(D, model_name="organism", layer=layer)


def zero_sae(layer=3):
    sae = SparseAutoencoder(SAEConfig(D, 256, 8, metadata={"model_name": "organism", "layer": layer}))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.zero_()
    return sae


def _run(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CI": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mechreward.sae_eval", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_identity_recovers_all_loss_and_zero_none_through_the_command(tmp_path):
    ident, zero = save_sae(identity_sae(), tmp_path / "ident"), save_sae(zero_sae(layer=1), tmp_path / "zero")
    out = tmp_path / "run"
    r = _run([f"saes=[{ident},{zero}]", "heldout_sequences=24", "model.device=cpu", f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert TRAIN_KEYS <= set(report)
    rows = {Path(row["sae_path"]).name: row for row in report["saes"]}
    i, z = rows["ident"], rows["zero"]
    assert (i["layer"], z["layer"]) == (3, 1)
    assert i["loss_recovered"] == pytest.approx(1.0, abs=1e-3) and i["kl_sae"] < 1e-5
    assert i["variance_explained"] == pytest.approx(1.0, abs=1e-5)
    assert z["loss_recovered"] == pytest.approx(0.0, abs=1e-6) and z["ce_sae"] == pytest.approx(z["ce_zero"])
    assert z["ce_zero"] > z["ce_clean"] + 0.1 and z["l0"] == 0 and z["dead_fraction"] == 1.0
    # top level = worst over SAEs, as in the training report
    assert report["loss_recovered"] == z["loss_recovered"] and report["dead_fraction"] == 1.0
    assert report["sae_path"] == [str(ident), str(zero)]
    assert (out / "feature_density_0_L3.png").stat().st_size > 1000 and (out / "feature_density_1_L1.png").exists()
    assert "| sae" in (out / "report.md").read_text()


def test_default_run_evaluates_the_organism_sae(tmp_path):
    from mechreward import organism

    shipped = getattr(organism, "ORGANISM_SAE_DIR", None)
    out = tmp_path / "run"
    args = ["model.device=cpu", "heldout_sequences=64", f"hydra.run.dir={out}"]
    if shipped is None or not Path(shipped).exists():  # until the organism ships its SAE: one saved here
        args.append(f"sae.path={save_sae(identity_sae(), tmp_path / 'sae')}")
    r = _run(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert TRAIN_KEYS <= set(report) and len(report["saes"]) == 1
    assert 0 < report["loss_recovered"] <= 1.01 and report["tokens"] > 1000
    row = report["saes"][0]
    # the organism: one problem per row, headline CE on the completion, all-token CE beside it
    assert row["scored"] == "completion" and row["ce_clean"] < 0.3 < 1.0 < row["ce_clean_all"]
    assert row["ce_increase"] == pytest.approx(row["ce_sae"] - row["ce_clean"])
    assert row["ce_increase_relative"] == pytest.approx(row["ce_increase"] / row["ce_clean"])
    ex = row["positions"]["excluded"]
    n = report["heldout_sequences"]
    assert ex["first_position"] == n and ex["special"] == n  # position 0 and the EOS closing each row
    assert row["positions"]["spliced"] == row["tokens"] == row["positions"]["seen"] - sum(ex.values())
    assert "completion targets" in report["positions"]
    md = (out / "report.md").read_text()
    assert "ce_increase" in md and all(f"FLAG {code}" in md for code in report["flags"])


def test_sae_for_another_hidden_size_is_a_shape_error_naming_both(tmp_path):
    small = save_sae(SparseAutoencoder(SAEConfig(64, 128, 4, metadata={"layer": 2})), tmp_path / "s")
    with pytest.raises(ShapeError, match=r"d_in=64 but model 'organism' has hidden size 128"):
        run_sae_eval(SAEEvalConfig(saes=[str(small)]), Run(tmp_path / "run"))
    r = _run([f"sae.path={small}", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert r.returncode == 2 and "hidden size 128" in r.stderr and "Traceback" not in r.stderr


def test_layer_comes_from_the_config_when_the_sae_does_not_say(tmp_path):
    sae = identity_sae()
    sae.cfg.metadata.pop("layer")
    path = save_sae(sae, tmp_path / "nolayer")
    cfg = SAEEvalConfig(saes=[f"{path}@2"], heldout_sequences=8, splice=False)
    report = run_sae_eval(cfg, Run(tmp_path / "run"))
    assert report["saes"][0]["layer"] == 2 and report["variance_explained"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(Exception, match="does not say which layer"):
        run_sae_eval(SAEEvalConfig(saes=[str(path)], heldout_sequences=8), Run(tmp_path / "run2"))
