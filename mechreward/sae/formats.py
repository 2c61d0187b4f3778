"""SAE checkpoints on disk: one loader per public format, all into `SparseAutoencoder`.

native = the SAELens v6 layout, so `sae_lens.SAE.load_from_disk(path)` reads what we write:

    <dir>/cfg.json                  {architecture, d_in, d_sae, k, apply_b_dec_to_input,
                                     normalize_activations: "none", metadata{model_name, hook_name,
                                     layer, ..., mechreward{...}}, ...}
    <dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

act_scale is folded into the weights at save. BatchTopK SAEs are written the way SAELens writes
them for inference: architecture "jumprelu" with a per-latent `threshold` tensor (all equal);
`metadata.mechreward.architecture` brings them back as batchtopk.

Adding a format: write `_detect_<name>(path) -> bool` and `_load_<name>(path, device) ->
SparseAutoencoder` (and optionally `_save_<name>`), then register them in `READERS` / `WRITERS`.
Every loader validates shapes, keys and finiteness through `_checked` and records provenance
through `_provenance`, so all formats report the same metadata keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import SAEFormatError
from ..io import save_safetensors, write_json
from .model import SAEConfig, SparseAutoencoder

NATIVE_CFG = "cfg.json"
NATIVE_WEIGHTS = "sae_weights.safetensors"
FORMAT_VERSION = 1
SAELENS_LAYOUT_VERSION = "6.54.12"
"""Written as metadata.sae_lens_version: SAELens reads configs older than 6.0 (or without a
version) through its pre-6.0 converter, which drops our metadata. This is the release whose
layout was verified (tests/test_sae_formats.py)."""
_DERIVED_KEYS = ("format", "sha256", "path", "d_in", "d_sae", "k", "model", "hook")
"""Metadata keys filled in by loaders; never written back into a checkpoint."""


# --------------------------------------------------------------------------- shared helpers

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _require(cfg: dict, key: str, file: Path, kind: type | tuple = int) -> Any:
    if key not in cfg:
        raise SAEFormatError(f"{file}: missing key {key!r}")
    v = cfg[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise SAEFormatError(f"{file}: key {key!r} has invalid value {v!r}")
    return v


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise SAEFormatError(f"{path}: cannot read safetensors ({e})") from None


def _checked(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], file: Path) -> dict[str, Tensor]:
    """The tensors named in `shapes`, verified present, of that shape, floating and finite."""
    out = {}
    for key, shape in shapes.items():
        if key not in tensors:
            raise SAEFormatError(f"{file}: missing tensor {key!r} (has {sorted(tensors)})")
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise SAEFormatError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():
            raise SAEFormatError(f"{file}: tensor {key!r} has non-float dtype {t.dtype}")
        if not torch.isfinite(t).all():
            raise SAEFormatError(f"{file}: tensor {key!r} contains NaN or infinite values")
        out[key] = t
    return out


def _provenance(sae: SparseAutoencoder, fmt: str, weights_file: Path, root: Path) -> SparseAutoencoder:
    """Fill the metadata every loader reports: format, sizes, model, layer, hook, sha256."""
    md = sae.cfg.metadata
    md.update({
        "format": fmt, "path": str(root), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
        "model": md.get("model_name"), "layer": md.get("layer"), "hook": md.get("hook_name"),
        "sha256": sha256_file(weights_file),
    })
    return sae


def _build(cfg: SAEConfig, params: dict[str, Tensor], device, file: Path) -> SparseAutoencoder:
    """An SAE whose parameters are `params` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec)."""
    sae = SparseAutoencoder(cfg, device="cpu")
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(params[name].to(torch.float32))
        if "threshold" in params:
            sae.threshold.copy_(params["threshold"])
    return sae.to(device) if device is not None else sae


@torch.no_grad()
def _fold_decoder_norm(params: dict[str, Tensor]) -> None:
    """SAELens `rescale_acts_by_decoder_norm`: fold ‖W_dec[i]‖ into W_enc, b_enc and W_dec."""
    norm = params["W_dec"].norm(dim=1)  # [d_sae]
    params["W_enc"] = params["W_enc"] * norm[None, :]
    params["b_enc"] = params["b_enc"] * norm
    params["W_dec"] = params["W_dec"] / norm[:, None]


# --------------------------------------------------------------------------- atomic directory

def _write_dir_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp_dir)` then rename tmp_dir onto `path` (an existing `path` is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- native (SAELens v6)

def _native_cfg(sae: SparseAutoencoder) -> dict:
    c = sae.cfg
    md = {k: v for k, v in c.metadata.items() if k not in _DERIVED_KEYS}
    md["sae_lens_version"] = SAELENS_LAYOUT_VERSION
    layer = md.get("layer")
    md.setdefault("model_name", md.get("model_name") or "unknown")
    md.setdefault("hook_name", f"model.layers.{layer}" if layer is not None else "unknown")
    md["mechreward"] = {
        **(md.get("mechreward") or {}),
        "format_version": FORMAT_VERSION,
        "architecture": c.architecture,
        "relu": c.relu,
        "relu_before_topk": c.relu_before_topk,
    }
    cfg: dict[str, Any] = {
        "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",  # act_scale is folded into the weights
        "reshape_activations": "none",
        "metadata": md,
    }
    if c.architecture == "topk":
        cfg.update({"k": c.k, "rescale_acts_by_decoder_norm": False, "architecture": "topk"})
    else:  # BatchTopK at inference is a JumpReLU with one shared threshold (as SAELens saves it)
        cfg.update({"architecture": "jumprelu"})
        md["mechreward"]["k"] = c.k
    return cfg


def _save_native(sae: SparseAutoencoder, path: Path) -> None:
    sae = copy.deepcopy(sae).to("cpu").float()
    sae.fold_activation_scale()
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.cfg.architecture == "batchtopk":
        tensors["threshold"] = sae.threshold.clamp_min(0).expand(sae.cfg.d_sae)
    cfg = _native_cfg(sae)

    def write(tmp: Path) -> None:
        save_safetensors(tmp / NATIVE_WEIGHTS, tensors)
        write_json(tmp / NATIVE_CFG, cfg)

    _write_dir_atomically(path, write)


def _detect_native(path: Path) -> bool:
    return path.is_dir() and (path / NATIVE_CFG).is_file() and (path / NATIVE_WEIGHTS).is_file()


def _load_native(path: Path, device=None) -> SparseAutoencoder:
    cfg_file, w_file = path / NATIVE_CFG, path / NATIVE_WEIGHTS
    cfg = _read_json(cfg_file)
    arch = _require(cfg, "architecture", cfg_file, str)
    d_in = _require(cfg, "d_in", cfg_file)
    d_sae = _require(cfg, "d_sae", cfg_file)
    md = dict(cfg.get("metadata") or {})
    ours = md.get("mechreward") or {}
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise SAEFormatError(f"{cfg_file}: normalize_activations={norm!r} is not supported "
                             "(only 'none'; fold the normalisation into the weights first)")
    if arch == "topk":
        k = _require(cfg, "k", cfg_file)
        architecture = "topk"
    elif arch == "jumprelu" and ours.get("architecture") == "batchtopk":
        k = _require(ours, "k", cfg_file)
        architecture = "batchtopk"
    else:
        raise SAEFormatError(f"{cfg_file}: key 'architecture' is {arch!r}; the native loader reads "
                             "TopK SAEs ('topk', or 'jumprelu' written by mechreward for BatchTopK)")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "batchtopk":
        shapes["threshold"] = (d_sae,)
    params = _checked(_load_safetensors(w_file), shapes, w_file)
    if architecture == "batchtopk":
        thr = params["threshold"]
        if not torch.equal(thr, thr[:1].expand_as(thr)):
            raise SAEFormatError(f"{w_file}: tensor 'threshold' is not one shared BatchTopK threshold")
        params["threshold"] = thr[0]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        _fold_decoder_norm(params)
    try:
        sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture=architecture,
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            relu=bool(ours.get("relu", True)),
                            relu_before_topk=bool(ours.get("relu_before_topk", False)), metadata=md)
    except Exception as e:
        raise SAEFormatError(f"{cfg_file}: inconsistent SAE config: {e}") from None
    return _provenance(_build(sae_cfg, params, device, w_file), "native", w_file, path)


# --------------------------------------------------------------------------- registry

WRITERS: dict[str, Callable[[SparseAutoencoder, Path], None]] = {"native": _save_native}
"""format name → writer(sae, directory)."""

READERS: dict[str, tuple[Callable[[Path], bool], Callable[..., SparseAutoencoder]]] = {
    "native": (_detect_native, _load_native),
}
"""format name → (detect(path) -> bool, load(path, device) -> SparseAutoencoder). Detection is
tried in this order when no format is given."""


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike, format: str = "native") -> Path:
    """Write `sae` to directory `path` atomically (act_scale folded; `sae` itself unchanged)."""
    if format not in WRITERS:
        raise SAEFormatError(f"cannot write SAE format {format!r}; writable formats: {sorted(WRITERS)}")
    path = Path(path)
    WRITERS[format](sae, path)
    return path


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.exists():
        raise SAEFormatError(f"{path}: no such SAE checkpoint")
    for name, (detect, _) in READERS.items():
        if detect(path):
            return name
    raise SAEFormatError(f"{path}: unknown SAE format (known: {sorted(READERS)}; native needs "
                         f"{NATIVE_CFG} and {NATIVE_WEIGHTS})")


def load_sae(path: str | os.PathLike, format: str | None = None,
             device: torch.device | str | None = None) -> SparseAutoencoder:
    """Load an SAE from `path` (format detected unless given), in eval mode.

    The result's `cfg.metadata` carries: format, path, d_in, d_sae, k, model, layer, hook and
    sha256 (of the weights file), plus whatever provenance the checkpoint stored.
    """
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in READERS:
        raise SAEFormatError(f"unknown SAE format {fmt!r}; known: {sorted(READERS)}")
    return READERS[fmt][1](path, device).eval()
