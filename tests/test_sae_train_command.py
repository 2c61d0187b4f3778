"""`python -m mechreward.sae_train`: end to end, dry run, crash-safe resume, clean errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechreward.activations import FilterConfig, TensorSource
from mechreward.data import DataConfig
from mechreward.errors import DataError
from mechreward.models import ModelConfig
from mechreward.run import Run
from mechreward.sae.train import TrainerConfig
from mechreward.sae_train import SAEShape, SAETrainRunConfig, heldout_activations, run_sae_train, train_saes
from tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
WORDS = "red green blue cyan magenta yellow black white one two three four five six seven".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sae_train")
    save_tiny(d / "model", "qwen3", seed=0)
    lines = [" ".join(WORDS[(i * 5 + 3 * j) % len(WORDS)] for j in range(4 + i % 11)) for i in range(3000)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    return d


def _argv(setup, out, extra=()):
    return [sys.executable, "-m", "mechreward.sae_train", f"model.name_or_path={setup / 'model'}", "model.device=cpu",
            f"data.source={setup / 'corpus.txt'}", "data.context_length=32", "data.batch_size=8",
            "data.heldout_sequences=16", "layers=[1]", "sae.d_sae=256", "sae.k=8", "batch_size=128",
            "trainer.dead_tokens=2000", "eval_splice=false", f"output_dir={out / 'sae'}", f"hydra.run.dir={out / 'run'}",
            *extra]


def _env():
    return {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(argv):
    return subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def test_train_end_to_end_report_and_sae_lens_loads_the_output(setup, tmp_path):
    cfg = SAETrainRunConfig(
        model=ModelConfig(name_or_path=str(setup / "model"), device="cpu"),
        data=DataConfig(source=str(setup / "corpus.txt"), context_length=32, batch_size=8, heldout_sequences=16),
        sae=SAEShape(d_sae=256, k=8), trainer=TrainerConfig(dead_tokens=4000), layers=[1, -1],
        tokens=128 * 60, batch_size=128, output_dir=str(tmp_path / "sae"), log_every=10)
    report = run_sae_train(cfg, Run(tmp_path / "run"))
    for key in ("variance_explained", "l0", "dead_fraction", "alive_fraction", "healthy_fraction", "loss_recovered",
                "tokens", "tokens_per_second", "sae_path"):
        assert key in report, key
    assert report["tokens"] == 128 * 60 and [r["layer"] for r in report["layers"]] == [1, 3]
    assert abs(report["l0"] - 8) < 1e-6  # TopK: exactly k active
    assert 0.0 < report["variance_explained"] <= 1.0
    assert report["token_filter"]["first_position"] > 0
    # packed corpus: the metrics score the positions training keeps, and say what was excluded
    from mechreward.data import token_batches
    from mechreward.models import load_model as _load

    _, tok0 = _load(str(setup / "model"), device="cpu")
    held = token_batches(tok0, cfg.data)[0]
    for row in report["layers"]:
        assert row["scored"] == "all" and row["loss_recovered_all"] == row["loss_recovered"]
        ex = row["positions"]["excluded"]
        assert ex["first_position"] == 16 and ex["special"] == int((held[:, 1:] == tok0.eos_token_id).sum()) > 0
        assert row["positions"]["spliced"] == row["heldout_tokens"] == 16 * 32 - sum(ex.values())
        assert row["ce_increase"] == pytest.approx(row["ce_sae"] - row["ce_clean"])
        assert isinstance(row["flags"], dict)
    assert report["ce_increase"] == max(r["ce_increase"] for r in report["layers"])
    assert "excluded: first position 16, special" in report["positions"]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["sae_path"] == [str(tmp_path / "sae" / "model-L1-k8-256"), str(tmp_path / "sae" / "model-L3-k8-256")]
    assert (tmp_path / "run" / "training_curve.png").exists() and (tmp_path / "run" / "feature_density_L1.png").exists()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"fvu", "l0", "dead_fraction", "auxk_loss", "lr", "tokens_per_second"} <= set(rows[-1])

    # The real sae_lens package loads our output and gives the same codes on held-out activations.
    from sae_lens import SAE

    from mechreward.models import load_model
    from mechreward.sae.formats import load_sae

    model, tok = load_model(str(setup / "model"), device="cpu")
    ids = torch.tensor([tok("red green blue one two three four five six seven cyan")["input_ids"]])
    acts = heldout_activations(model, [1], ids, tok, FilterConfig())[1]
    theirs = SAE.load_from_disk(str(tmp_path / "sae" / "model-L1-k8-256"), device="cpu")
    ours = load_sae(tmp_path / "sae" / "model-L1-k8-256")
    torch.testing.assert_close(theirs.encode(acts), ours.encode_dense(acts), rtol=1e-5, atol=1e-5)
    assert ours.cfg.metadata.get("layer") == 1


def test_dry_run_reads_only_the_config(setup, tmp_path):
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((setup / "model" / "config.json").read_text())  # no weights at all
    r = _run([sys.executable, "-m", "mechreward.sae_train", f"model.name_or_path={cfg_only}", "dry_run=true",
              "layers=[1,-1]", "sae.d_sae=1024", "sae.k=16", "tokens=1000000", "batch_size=1000",
              f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "run" / "report.json").read_text())
    assert plan["layers"] == [1, 3] and plan["d_model"] == 64 and plan["steps"] == 1000
    assert plan["sae_params"] == 2 * 64 * 1024 + 1024 + 64
    assert "d_sae 1024 k 16" in r.stdout


def _weights(d):
    return load_file(Path(d) / "sae_weights.safetensors")


def test_sigkill_then_resume_gives_bitwise_identical_weights(setup, tmp_path):
    extra = ["tokens=64000", "checkpoint_every=2560", "log_every=5"]
    a = _run(_argv(setup, tmp_path / "a", extra))
    assert a.returncode == 0, a.stderr[-3000:]
    b_dir = tmp_path / "b"
    proc = subprocess.Popen(_argv(setup, b_dir, extra), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = b_dir / "run" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (b_dir / "run" / "report.json").exists(), "the kill must land mid-run"
    r = _run(_argv(setup, b_dir, [*extra, "resume=true"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    wa, wb = _weights(tmp_path / "a" / "sae" / "model-L1-k8-256"), _weights(b_dir / "sae" / "model-L1-k8-256")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert not ckpt.exists()  # a finished run leaves no checkpoint to resume by mistake


@pytest.mark.parametrize("override,needle", [
    ("sae.k=256", "k=256"),
    ("layers=[7]", "layer 7 is out of range"),
    ("no_such_key=1", "no_such_key"),
    ("data.source=/nonexistent/corpus.txt", "/nonexistent/corpus.txt"),
])
def test_bad_input_is_one_clear_error_and_no_output(setup, tmp_path, override, needle):
    r = _run(_argv(setup, tmp_path, ["tokens=1280", override]))
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "sae").exists()


def test_organism_without_the_special_token_filter_is_refused(tmp_path):
    from mechreward.errors import ConfigError

    cfg = SAETrainRunConfig(filters=FilterConfig(drop_special=False), output_dir=str(tmp_path / "sae"))
    with pytest.raises(ConfigError, match="filters.drop_special"):
        run_sae_train(cfg, Run(tmp_path / "run"))
    assert not (tmp_path / "sae").exists()


def test_in_memory_tensor_source_trains_and_rejects_nonfinite(tmp_path):
    x = torch.randn(4096, 16)
    x[100, 3] = float("nan")
    with pytest.raises(DataError, match="finite"):
        TensorSource(x)
    cfg = SAETrainRunConfig(sae=SAEShape(d_sae=64, k=4), tokens=2048, batch_size=256, log_every=4)
    saes = train_saes(TensorSource(torch.randn(4096, 16), block_tokens=1024), cfg, Run(tmp_path))
    assert saes[0].W_dec.shape == (64, 16)


def test_harvest_then_train_from_the_store(setup, tmp_path):
    common = [f"model.name_or_path={setup / 'model'}", "model.device=cpu", f"data.source={setup / 'corpus.txt'}",
              "data.context_length=32", "data.batch_size=8", "data.heldout_sequences=16", "layers=[1,2]"]
    store = tmp_path / "store"
    h = _run([sys.executable, "-m", "mechreward.harvest", *common, "tokens=3000", "batches_per_shard=4",
              f"store_dir={store}", f"hydra.run.dir={tmp_path / 'h'}"])
    assert h.returncode == 0, h.stderr[-2000:]
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["layers"] == [1, 2] and manifest["tokens"] >= 3000 and manifest["complete"]
    assert manifest["model"] == str(setup / "model")
    cfg = SAETrainRunConfig(
        model=ModelConfig(name_or_path=str(setup / "model"), device="cpu"),
        data=DataConfig(source=str(setup / "corpus.txt"), context_length=32, batch_size=8, heldout_sequences=16),
        sae=SAEShape(d_sae=128, k=4), layers=[2], tokens=256 * 20, batch_size=256, activations=str(store),
        output_dir=str(tmp_path / "sae"), eval_splice=False)
    report = run_sae_train(cfg, Run(tmp_path / "run"))
    assert report["tokens"] == 256 * 20 and report["token_filter"]["seen"] > 0
    # a store of another layer or model is refused with a clear error
    from mechreward.errors import MismatchError

    cfg.layers = [0]
    with pytest.raises(MismatchError, match=r"\[0\]"):
        run_sae_train(cfg, Run(tmp_path / "run2"))
    cfg.layers, cfg.model.name_or_path = [2], str(tmp_path / "elsewhere")
    save_tiny(tmp_path / "elsewhere", "qwen3", seed=0)
    with pytest.raises(MismatchError, match="elsewhere"):
        run_sae_train(cfg, Run(tmp_path / "run3"))
