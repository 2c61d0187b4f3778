"""benchmarks/gpu_check.py in its quick CPU mode: every section runs and its report is computed.

The GPU run is rare and short, so the script must already work when a GPU is lent; this runs
the same code on tiny shapes (Triton through its CPU interpreter when installed).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_cpu_writes_a_computed_report(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(ROOT), "SPARSIFY_DISABLE_TRITON": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    secs = report["sections"]
    assert set(secs) == {"correctness", "sae_step", "harvest", "grpo"}
    assert not any("error" in s or "skipped" in s for s in secs.values())

    c = secs["correctness"]
    step = c["step_gradients_vs_reference"]
    assert step["pass"] and step["same_codes"] and step["fvu"] == pytest.approx(step["fvu_reference"], rel=1e-5)
    assert set(step["max_rel_err"]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert 0 < max(step["max_rel_err"].values()) <= 1e-4  # fp32 sparse vs dense: close, not identical
    assert c["determinism"]["pass"] and all(c["determinism"]["bitwise_equal"].values())
    assert c["bf16_vs_fp32"]["pass"] and 0 < c["bf16_vs_fp32"]["fvu_rel_diff"] < 2e-2
    tri = c["triton_vs_reference"]
    if report["versions"]["triton"] is not None:
        assert tri["pass"] and set(tri["max_rel_err"]) >= {"decode", "grad_W_dec", "enc_grad_W_enc"}
    else:
        assert "skipped" in tri

    s = secs["sae_step"]
    row = next(iter(s["shapes"].values()))
    for lib, status in s["anchors"].items():  # the dev env has both anchors; a missing one is reported
        assert (lib in row["libs"]) == (status == "ok")
    mech = row["libs"]["mechreward"]
    assert mech["tokens_per_s"] == pytest.approx(row["batch"] / (mech["ms_per_step"] / 1e3))
    assert mech["fraction_of_bound"] > 0

    h = secs["harvest"]
    assert h["model"] == "Qwen3_5MoeForCausalLM"
    assert h["variants"]["full forward"]["cost_of_full"] == 1.0
    assert {v["expected"] for v in h["variants"].values()} > {1.0}

    g = secs["grpo"]
    assert g["outcome_ms"] > 0 and g["sae_ms"] > 0
    assert g["overhead"] == pytest.approx(g["sae_ms"] / g["outcome_ms"] - 1)
    assert all("sae_reward_s" in st for st in g["steps"]["sae"])
    assert "## sae_step" in md and "mechreward" in md and report["versions"]["torch"] in md
