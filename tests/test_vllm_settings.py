"""vLLM settings that need no engine: dtype resolution, the CPU KV-cache size, errors without vLLM."""

import json

import pytest

from mechreward.errors import ConfigError
from mechreward.models import ModelConfig, resolve_model_path
from mechreward.rollouts import SamplingConfig, draw_samples
from mechreward.vllm_backend import VLLMSettings, kvcache_gib, served_dtype


def test_served_dtype_is_the_model_configs_and_auto_is_the_checkpoints(tmp_path):
    organism = resolve_model_path("organism")
    assert served_dtype(None, "float32", organism) == "float32"
    assert served_dtype(None, "auto", organism) == "float32"  # config.json says float32, not vLLM's bf16 choice
    assert served_dtype("bf16", "float32", organism) == "bfloat16"  # the setting wins
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert served_dtype(None, "auto", str(tmp_path)) == "bfloat16"
    with pytest.raises(ConfigError, match="int8"):
        served_dtype("int8", None, organism)


def test_cpu_kvcache_size_setting_then_environment_then_one_gib(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert kvcache_gib(VLLMSettings()) == 1
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert kvcache_gib(VLLMSettings()) == 3
    assert kvcache_gib(VLLMSettings(cpu_kvcache_space_gib=2)) == 2
    with pytest.raises(ConfigError, match="cpu_kvcache_space_gib"):
        kvcache_gib(VLLMSettings(cpu_kvcache_space_gib=0))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(ConfigError, match="'lots'"):
        kvcache_gib(VLLMSettings())


def test_backend_vllm_without_vllm_names_the_install():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("this interpreter has vLLM; the scenario tests cover it")
    with pytest.raises(ConfigError, match="vllm_cpu_env.sh"):
        draw_samples(None, None, ModelConfig(), [[1, 2]], SamplingConfig(backend="vllm"), seed=0)
