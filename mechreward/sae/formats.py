"""SAE checkpoints on disk: one loader per public format, all into `SparseAutoencoder`.

native = the SAELens v6 layout, so `sae_lens.SAE.load_from_disk(path)` reads what we write:

    <dir>/cfg.json                  {architecture, d_in, d_sae, k, apply_b_dec_to_input,
                                     normalize_activations: "none", metadata{model_name, hook_name,
                                     layer, ..., mechreward{...}}, ...}
    <dir>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

act_scale is folded into the weights at save. BatchTopK SAEs are written the way SAELens writes
them for inference: architecture "jumprelu" with a per-latent `threshold` tensor (all equal);
`metadata.mechreward.architecture` brings them back as batchtopk.

Adding a format: write `_detect_<name>(path) -> bool` and `_load_<name>(path, device, **hints) ->
SparseAutoencoder` (and optionally `_save_<name>`), then register them in `READERS` / `WRITERS`.
Every loader validates shapes, keys and finiteness through `_checked` and records provenance
through `_provenance`, so all formats report the same metadata keys. `hints` carry what the file
may lack (k, layer, model, hook: from the registry or the caller); a hint that contradicts the
file is an error naming the file and key.

Formats read (see ../shared/design/SAE.md for each one's encode convention):

| format | files | convention flags |
|---|---|---|
| native / SAELens v6 (and pre-6.0 flat configs) | `cfg.json` + `sae_weights.safetensors` | from cfg |
| sparsify (EleutherAI) | `<hookpoint>/cfg.json` + `sae.safetensors` | relu_before_topk |
| zactheaipm | `<sae_id>/config.json` + `weights.safetensors` | topk then ReLU |
| qwenscope (Qwen-Scope) | `layer{n}.sae.pt` | no b_dec subtraction, no ReLU |
| caiovicentino (TopKSAE) | `*.pt` state dict | topk then ReLU |

Written: native (default), `saelens` (native, refusing conventions SAELens cannot reproduce) and
`sparsify`. `.pt` files are read with `torch.load(weights_only=True)` and must hold only tensors
and plain values: loading never runs code from a file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
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


_LAYER_IN_NAME = re.compile(r"(?:blocks|layers|layer)[._]?(\d+)(?!\d)|(?:^|[_.\-/])L(\d+)(?!\d)(?!_\d)")
# The `(?!_\d)` keeps Qwen-Scope's sparsity tag "L0_100" from reading as layer 0.


def layer_from_name(name: str | None) -> int | None:
    """The layer a hook or file name encodes: `blocks.3.hook_resid_post`, `model.layers.3`,
    `layers.3`, `layer3.sae.pt`, `sae_L11_n4096_k32.pt` → 3/3/3/3/11; else None."""
    m = _LAYER_IN_NAME.search(name or "")
    return int(m.group(1) or m.group(2)) if m else None


def _fill_hints(md: dict, hints: dict, file: Path) -> dict:
    """Fill model / layer / hook the checkpoint lacks from `hints`; a contradicting layer is an error."""
    if md.get("layer") is None:
        md["layer"] = layer_from_name(md.get("hook_name"))
    for key, md_key in (("model", "model_name"), ("layer", "layer"), ("hook", "hook_name")):
        v = hints.get(key)
        if v is None:
            continue
        have = md.get(md_key)
        if have in (None, "unknown"):
            md[md_key] = v
        elif key == "layer" and int(have) != int(v):
            raise SAEFormatError(f"{file}: the checkpoint is for layer {have}, but layer={v} was asked for")
    return md


def _pick_k(file_k: Any, hints: dict, file: Path, key: str = "k") -> int:
    """k from the file, else from the hints (registry or caller); both present must agree."""
    hint = hints.get("k")
    if file_k is None:
        if hint is None:
            raise SAEFormatError(f"{file}: the checkpoint does not store {key!r} (active latents per token); "
                                 "pass k=... or load it by its registry name, which knows k")
        return int(hint)
    if not isinstance(file_k, int) or isinstance(file_k, bool):
        raise SAEFormatError(f"{file}: key {key!r} has invalid value {file_k!r}")
    if hint is not None and int(hint) != file_k:
        raise SAEFormatError(f"{file}: key {key!r} is {file_k}, but k={hint} was given")
    return file_k


def _sae_config(file: Path, **kw: Any) -> SAEConfig:
    try:
        return SAEConfig(**kw)
    except Exception as e:
        raise SAEFormatError(f"{file}: inconsistent SAE config: {e}") from None


def _provenance(sae: SparseAutoencoder, fmt: str, weights_file: Path, root: Path) -> SparseAutoencoder:
    """Fill the metadata every loader reports: format, sizes, model, layer, hook, sha256."""
    md = sae.cfg.metadata
    layer = md.get("layer")
    if layer is None:
        layer = md["layer"] = layer_from_name(md.get("hook_name"))
    hook = md.get("hook_name")
    if hook in (None, "unknown") and layer is not None:
        hook = f"model.layers.{layer}"
    model = md.get("model_name")
    md.update({
        "format": fmt, "path": str(root), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
        "model": None if model == "unknown" else model, "layer": layer, "hook": None if hook == "unknown" else hook,
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
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the folder the mode mkdir would
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


_FLAT_METADATA = ("model_name", "hook_name", "hook_layer", "hook_head_index", "dataset_path", "context_size",
                  "prepend_bos", "model_from_pretrained_kwargs", "sae_lens_training_version")


def _v6_config(cfg: dict) -> dict:
    """A pre-6.0 flat SAELens cfg.json (hook_point, activation_fn_str, activation_fn_kwargs{k}, ...) in
    the v6 shape; v6 configs (with `metadata`) are returned unchanged. Mirrors SAELens's
    `handle_pre_6_0_config`, so both libraries read old checkpoints the same way."""
    if isinstance(cfg.get("metadata"), dict):
        return cfg
    flat = {{"hook_point": "hook_name", "hook_point_layer": "hook_layer",
             "activation_fn_str": "activation_fn"}.get(k, k): v for k, v in cfg.items()}
    new = {k: v for k, v in flat.items() if k not in _FLAT_METADATA}
    kwargs = flat.get("activation_fn_kwargs") or {}
    if flat.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        new["architecture"], new["k"] = "topk", kwargs["k"]
    new.setdefault("architecture", "standard")
    norm = flat.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    md = {k: flat[k] for k in _FLAT_METADATA if k in flat}
    if md.get("hook_layer") is not None:
        md["layer"] = md.pop("hook_layer")
    new["metadata"] = md
    return new


def _load_native(path: Path, device=None, **hints: Any) -> SparseAutoencoder:
    cfg_file, w_file = path / NATIVE_CFG, path / NATIVE_WEIGHTS
    cfg = _v6_config(_read_json(cfg_file))
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
        k = _pick_k(cfg.get("k"), hints, cfg_file)
        architecture = "topk"
    elif arch == "jumprelu" and ours.get("architecture") == "batchtopk":
        k = _pick_k(ours.get("k"), hints, cfg_file)
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
    sae_cfg = _sae_config(cfg_file, d_in=d_in, d_sae=d_sae, k=k, architecture=architecture,
                          apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                          relu=bool(ours.get("relu", True)),
                          relu_before_topk=bool(ours.get("relu_before_topk", False)),
                          metadata=_fill_hints(md, hints, cfg_file))
    return _provenance(_build(sae_cfg, params, device, w_file), "native", w_file, path)


def _save_saelens(sae: SparseAutoencoder, path: Path) -> None:
    """The native layout, for SAEs whose codes SAELens reproduces. SAELens's TopK ReLUs the kept
    values, so an SAE that keeps negative codes (relu=False, Qwen-Scope) is refused. relu_before_topk
    gives the same dense codes as topk-then-ReLU, so it is written as plain TopK."""
    if not sae.cfg.relu:
        raise SAEFormatError("cannot write this SAE in the SAELens format: it keeps negative top-k values "
                             "(relu=False, the Qwen-Scope convention) and SAELens's TopK applies a ReLU, so its "
                             "codes would differ; save it as format='native'")
    _save_native(sae, path)


# --------------------------------------------------------------------------- EleutherAI sparsify

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"


def _detect_sparsify(path: Path) -> bool:
    return path.is_dir() and (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file()


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def _load_sparsify(path: Path, device=None, **hints: Any) -> SparseAutoencoder:
    """`<hookpoint>/cfg.json` {d_in, k, num_latents | expansion_factor, activation, ...} +
    `sae.safetensors` {encoder.weight [n, d_in], encoder.bias [n], W_dec [n, d_in], b_dec [d_in]}.
    sparsify encodes ReLU(encoder(x − b_dec)) and then takes the top k."""
    cfg_file, w_file = path / SPARSIFY_CFG, path / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_file)
    d_in = _require(cfg, "d_in", cfg_file)
    n = cfg.get("num_latents") or d_in * _require(cfg, "expansion_factor", cfg_file)
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{cfg_file}: key 'activation' is {cfg['activation']!r}; only 'topk' SAEs are supported")
    for key in ("transcode", "skip_connection", "signed"):
        if cfg.get(key):
            raise SAEFormatError(f"{cfg_file}: key {key!r} is true; only plain sparse autoencoders are supported")
    k = _pick_k(cfg.get("k"), hints, cfg_file)
    tensors = _load_safetensors(w_file)
    if "W_skip" in tensors:
        raise SAEFormatError(f"{w_file}: tensor 'W_skip' (skip connection) is not supported")
    t = _checked(tensors, {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)},
                 w_file)
    params = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    stored = _safetensors_metadata(w_file).get("mechreward")
    md = json.loads(stored) if stored else {}
    md.setdefault("hook_name", path.name)
    parent_cfg = path.parent / "config.json"  # sparsify's trainer writes the run config beside the hookpoints
    if md.get("model_name") is None and parent_cfg.is_file():
        with_model = _read_json(parent_cfg).get("model")
        if isinstance(with_model, str):
            md["model_name"] = with_model
    sae_cfg = _sae_config(cfg_file, d_in=d_in, d_sae=n, k=k, apply_b_dec_to_input=True, relu=True,
                          relu_before_topk=True, metadata=_fill_hints(md, hints, cfg_file))
    return _provenance(_build(sae_cfg, params, device, w_file), "sparsify", w_file, path)


def _save_sparsify(sae: SparseAutoencoder, path: Path) -> None:
    """`path/cfg.json` + `path/sae.safetensors` as sparsify writes them (path = one hookpoint folder).
    sparsify always encodes x − b_dec: an SAE without that step gets b_dec·W_enc folded into the
    encoder bias (same pre-activations). Our metadata rides in the safetensors header."""
    c = sae.cfg
    if c.architecture != "topk":
        raise SAEFormatError(f"cannot write a {c.architecture} SAE in the sparsify format (sparsify has TopK only); "
                             "save it as format='native'")
    if not c.relu:
        raise SAEFormatError("cannot write this SAE in the sparsify format: it keeps negative top-k values "
                             "(relu=False, the Qwen-Scope convention) and sparsify ReLUs before the top-k; "
                             "save it as format='native'")
    sae = copy.deepcopy(sae).to("cpu").float()
    sae.fold_activation_scale()
    b_enc = sae.b_enc.detach()
    if not c.apply_b_dec_to_input:
        b_enc = b_enc + sae.b_dec.detach() @ sae.W_enc.detach()
    tensors = {"encoder.weight": sae.W_enc.detach().t(), "encoder.bias": b_enc, "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}
    cfg = {"activation": "topk", "expansion_factor": max(1, c.d_sae // c.d_in), "normalize_decoder": True,
           "num_latents": c.d_sae, "k": c.k, "multi_topk": False, "skip_connection": False, "transcode": False,
           "d_in": c.d_in}
    md = {k: v for k, v in c.metadata.items() if k not in _DERIVED_KEYS}

    def write(tmp: Path) -> None:
        save_safetensors(tmp / SPARSIFY_WEIGHTS, tensors, metadata={"mechreward": json.dumps(md, default=str)})
        write_json(tmp / SPARSIFY_CFG, cfg)

    _write_dir_atomically(path, write)


# --------------------------------------------------------------------------- zactheaipm (qwenscope pipeline)

ZAC_CFG = "config.json"
ZAC_WEIGHTS = "weights.safetensors"


def _detect_zactheaipm(path: Path) -> bool:
    return path.is_dir() and (path / ZAC_CFG).is_file() and (path / ZAC_WEIGHTS).is_file()


def _load_zactheaipm(path: Path, device=None, **hints: Any) -> SparseAutoencoder:
    """`<sae_id>/config.json` {hidden_dim, dict_size, k} + `weights.safetensors` {encoder.weight
    [dict, hidden], encoder.bias [dict], decoder.weight [hidden, dict], pre_bias [hidden]}:
    codes = clamp(topk(encoder(x − pre_bias)), min=0); x̂ = decoder(codes) + pre_bias."""
    cfg_file, w_file = path / ZAC_CFG, path / ZAC_WEIGHTS
    cfg = _read_json(cfg_file)
    hidden = _require(cfg, "hidden_dim", cfg_file)
    n = _require(cfg, "dict_size", cfg_file)
    k = _pick_k(cfg.get("k"), hints, cfg_file)
    tensors = _load_safetensors(w_file)
    t = _checked(tensors, {"encoder.weight": (n, hidden), "encoder.bias": (n,), "decoder.weight": (hidden, n),
                           "pre_bias": (hidden,)}, w_file)
    if "decoder.bias" in tensors and bool(tensors["decoder.bias"].ne(0).any()):
        raise SAEFormatError(f"{w_file}: tensor 'decoder.bias' is non-zero; this layout decodes with pre_bias only")
    params = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].t(),
              "b_dec": t["pre_bias"]}
    md: dict[str, Any] = {"sae_id": path.name}
    for key in ("layer", "model_name", "hook_name"):
        if cfg.get(key) is not None:
            md[key] = cfg[key]
    sae_cfg = _sae_config(cfg_file, d_in=hidden, d_sae=n, k=k, apply_b_dec_to_input=True, relu=True,
                          metadata=_fill_hints(md, hints, cfg_file))
    return _provenance(_build(sae_cfg, params, device, w_file), "zactheaipm", w_file, path)


# --------------------------------------------------------------------------- torch .pt (Qwen-Scope, caiovicentino)

_PLAIN = (int, float, str, bool, type(None), torch.Size)
_QWENSCOPE_FILE = re.compile(r"^layer(\d+)\.sae\.pt$")
_QWENSCOPE_REPO = re.compile(r"W(\d+)K-L0_(\d+)")


def _plain_tree(obj: Any, file: Path, where: str = "") -> None:
    """Refuse anything in a checkpoint but tensors, numbers, strings and containers of them."""
    if isinstance(obj, (Tensor, *_PLAIN)):
        return
    if isinstance(obj, dict):
        for key, v in obj.items():
            if not isinstance(key, (str, int)):
                raise SAEFormatError(f"{file}: refused: key {key!r} is a {type(key).__name__}")
            _plain_tree(v, file, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _plain_tree(v, file, f"{where}[{i}]")
        return
    raise SAEFormatError(f"{file}: refused: entry {where or '(top level)'} is a {type(obj).__module__}."
                         f"{type(obj).__qualname__}; SAE .pt files may hold only tensors, numbers, strings and "
                         "containers of them")


def _load_pt(path: Path) -> dict[str, Any]:
    """A .pt state dict read with weights_only=True (memory-mapped when the file allows): nothing in
    the file is executed, and anything but tensors and plain values is refused."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) serialisation
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SAEFormatError(f"{path}: refused to load: the pickle holds objects other than tensors and plain "
                             f"values (read with weights_only=True; nothing in it was run): {reason}") from None
    except Exception as e:
        raise SAEFormatError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise SAEFormatError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    _plain_tree(obj, path)
    if "W_enc" not in obj:  # {"state_dict": {...}, "k": ...}: one nested dict holds the tensors
        nested = [v for v in obj.values() if isinstance(v, dict) and "W_enc" in v]
        if len(nested) == 1:
            obj = {**{k: v for k, v in obj.items() if not isinstance(v, dict)}, **nested[0]}
    return obj


def _pt_layout(state: dict) -> str | None:
    """'qwenscope' (W_enc [d_sae, d_model]) or 'caiovicentino' (W_enc [d_in, d_sae]) from the shapes."""
    we, be, bd = (state.get(k) for k in ("W_enc", "b_enc", "b_dec"))
    if not all(isinstance(t, Tensor) for t in (we, be, bd)) or we.ndim != 2 or be.ndim != 1 or bd.ndim != 1:
        return None
    if tuple(we.shape) == (bd.shape[0], be.shape[0]):
        return "caiovicentino"
    if tuple(we.shape) == (be.shape[0], bd.shape[0]):
        return "qwenscope"
    return None


def _detect_qwenscope(path: Path) -> bool:
    if not path.is_file():
        return False
    if _QWENSCOPE_FILE.match(path.name):
        return True
    return path.suffix == ".pt" and _pt_layout(_load_pt(path)) == "qwenscope"


def _detect_caiovicentino(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".pt" and not _QWENSCOPE_FILE.match(path.name)
            and _pt_layout(_load_pt(path)) == "caiovicentino")


def _dims(state: dict, file: Path, latent_bias: str, input_bias: str) -> tuple[int, int]:
    for key in (latent_bias, input_bias):
        t = state.get(key)
        if not isinstance(t, Tensor):
            raise SAEFormatError(f"{file}: missing tensor {key!r} (has {sorted(state)})")
        if t.ndim != 1:
            raise SAEFormatError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected a vector")
    return state[input_bias].shape[0], state[latent_bias].shape[0]


def _load_qwenscope(path: Path, device=None, **hints: Any) -> SparseAutoencoder:
    """Qwen-Scope `layer{n}.sae.pt`: W_enc [d_sae, d_model], W_dec [d_model, d_sae], b_enc, b_dec.
    codes = topk(x @ W_enc.T + b_enc) with NO ReLU and NO b_dec subtraction; x̂ = codes @ W_dec.T + b_dec.
    k is not in the file: it comes from the hints (registry, k=) or the repo name `...-W{N}K-L0_{k}`."""
    state = _load_pt(path)
    d_in, d_sae = _dims(state, path, "b_enc", "b_dec")
    t = _checked(state, {"W_enc": (d_sae, d_in), "W_dec": (d_in, d_sae), "b_enc": (d_sae,), "b_dec": (d_in,)}, path)
    params = {"W_enc": t["W_enc"].t(), "b_enc": t["b_enc"], "W_dec": t["W_dec"].t(), "b_dec": t["b_dec"]}
    if hints.get("k") is None and isinstance(state.get("k"), int):
        hints = {**hints, "k": state["k"]}
    if hints.get("k") is None and (m := _QWENSCOPE_REPO.search(str(path))):
        hints = {**hints, "k": int(m.group(2))}  # the release's name, e.g. a hub cache or sae/hub/ path
    k = _pick_k(None, hints, path)
    m = _QWENSCOPE_FILE.match(path.name)
    md = {"layer": int(m.group(1))} if m else {}
    sae_cfg = _sae_config(path, d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=False, relu=False,
                          metadata=_fill_hints(md, hints, path))
    return _provenance(_build(sae_cfg, params, device, path), "qwenscope", path, path)


def _load_caiovicentino(path: Path, device=None, **hints: Any) -> SparseAutoencoder:
    """caiovicentino TopKSAE `.pt`: W_enc [d_in, n], W_dec [n, d_in], b_enc [n], b_dec [d_in] (+ optional
    ints d_model, d_sae, k, step). codes = ReLU(topk((x − b_dec) @ W_enc + b_enc))."""
    state = _load_pt(path)
    d_in, d_sae = _dims(state, path, "b_enc", "b_dec")
    t = _checked(state, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}, path)
    for key, want in (("d_model", d_in), ("d_in", d_in), ("d_sae", d_sae)):
        if key in state and state[key] != want:
            raise SAEFormatError(f"{path}: key {key!r} is {state[key]!r} but the tensors give {want}")
    k = _pick_k(state.get("k"), hints, path)
    md: dict[str, Any] = {k_: state[k_] for k_ in ("step", "tokens") if isinstance(state.get(k_), (int, float))}
    if (layer := layer_from_name(path.stem)) is not None:
        md["layer"] = layer
    sae_cfg = _sae_config(path, d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=True, relu=True,
                          metadata=_fill_hints(md, hints, path))
    return _provenance(_build(sae_cfg, dict(t), device, path), "caiovicentino", path, path)


# --------------------------------------------------------------------------- registry of formats

WRITERS: dict[str, Callable[[SparseAutoencoder, Path], None]] = {
    "native": _save_native, "saelens": _save_saelens, "sparsify": _save_sparsify,
}
"""format name → writer(sae, directory)."""

READERS: dict[str, tuple[Callable[[Path], bool], Callable[..., SparseAutoencoder]]] = {
    "native": (_detect_native, _load_native),
    "sparsify": (_detect_sparsify, _load_sparsify),
    "zactheaipm": (_detect_zactheaipm, _load_zactheaipm),
    "qwenscope": (_detect_qwenscope, _load_qwenscope),
    "caiovicentino": (_detect_caiovicentino, _load_caiovicentino),
}
"""format name → (detect(path) -> bool, load(path, device, **hints) -> SparseAutoencoder). Detection
is tried in this order when no format is given."""
FORMAT_ALIASES = {"saelens": "native", "sae_lens": "native", "qwen-scope": "qwenscope", "topksae": "caiovicentino"}


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike, format: str = "native") -> Path:
    """Write `sae` to directory `path` atomically (act_scale folded; `sae` itself unchanged).

    format: `native` (SAELens v6 layout + mechreward flags; default), `saelens` (the same layout,
    refusing SAEs whose codes SAELens cannot reproduce) or `sparsify` (one hookpoint folder)."""
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
    raise SAEFormatError(f"{path}: unknown SAE format (known: {sorted(READERS)}; native needs {NATIVE_CFG} + "
                         f"{NATIVE_WEIGHTS}, sparsify {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}, zactheaipm {ZAC_CFG} + "
                         f"{ZAC_WEIGHTS}, Qwen-Scope layer<n>.sae.pt, caiovicentino a .pt state dict)")


def folder_of_weights_file(path: Path) -> Path:
    """A folder format's weights file given directly (`.../sae_weights.safetensors`, sparsify's
    `sae.safetensors`, zactheaipm's `weights.safetensors`) → its folder, when the config file
    that goes with it is beside it; any other path is returned as it is."""
    pairs = {NATIVE_WEIGHTS: NATIVE_CFG, SPARSIFY_WEIGHTS: SPARSIFY_CFG, ZAC_WEIGHTS: ZAC_CFG}
    if path.is_file() and path.name in pairs:
        if (path.parent / pairs[path.name]).is_file():
            return path.parent
        raise SAEFormatError(f"{path}: a weights file without its {pairs[path.name]} beside it; "
                             f"pass the folder holding both")
    return path


def _is_checkpoint(path: Path) -> bool:
    try:
        return any(detect(path) for detect, _ in READERS.values())
    except SAEFormatError:
        return path.is_file()  # an unreadable or refused .pt: let loading report why


def select_checkpoint(path: Path, layer: int | None = None, hookpoint: str | None = None) -> Path:
    """`path` itself when it is a checkpoint; else the one checkpoint inside the folder `path`
    (a Qwen-Scope release, a sparsify run with one folder per hookpoint, a set of .pt files), picked
    by `hookpoint` (its name) or `layer` (the layer its name encodes)."""
    if hookpoint is not None:
        path = path / hookpoint
        if not path.exists():
            raise SAEFormatError(f"{path}: no such hookpoint folder")
        return path
    if not path.is_dir() or _is_checkpoint(path):
        return path
    children = sorted(p for p in path.iterdir() if not p.name.startswith(".") and _is_checkpoint(p))
    if not children:
        return path  # detect_format reports the unknown layout
    if layer is not None:
        hits = [p for p in children if layer_from_name(p.name) == layer]
        if len(hits) == 1:
            return hits[0]
        raise SAEFormatError(f"{path}: {'no' if not hits else 'several'} checkpoints for layer {layer} among "
                             f"{[p.name for p in children]}; pass hookpoint=<name>")
    if len(children) == 1:
        return children[0]
    raise SAEFormatError(f"{path}: holds {len(children)} SAE checkpoints ({[p.name for p in children][:8]}...); "
                         "pick one with layer=<n> or hookpoint=<name>")


def load_sae(source: str | os.PathLike, format: str | None = None, device: torch.device | str | None = None, *,
             layer: int | None = None, k: int | None = None, hookpoint: str | None = None, file: str | None = None,
             subfolder: str | None = None, model: str | None = None, revision: str | None = None) -> SparseAutoencoder:
    """Load an SAE (in eval mode) from a local file or folder, a registry name (`registry:<name>` or a
    bare name from sae/registry.yaml), `organism`, or a Hugging Face repo id (+ file / subfolder /
    hookpoint / layer). The format is detected unless given.

    k, layer and model fill what the checkpoint does not store (Qwen-Scope files hold no k); they
    must agree with what it does store. The result's `cfg.metadata` carries: format, path, d_in,
    d_sae, k, model, layer, hook and sha256 (of the weights file), plus the checkpoint's own provenance.
    """
    fmt = FORMAT_ALIASES.get(format, format) if format else None
    if fmt is not None and fmt not in READERS:
        raise SAEFormatError(f"unknown SAE format {format!r}; known: {sorted(READERS)}")
    hints: dict[str, Any] = {"k": k, "layer": layer, "model": model}
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        for part in (subfolder, file):
            if part:
                path = path / part
        expect: dict[str, Any] = {}
    else:
        from .registry import resolve_source

        resolved = resolve_source(str(source), layer=layer, file=file, subfolder=subfolder, hookpoint=hookpoint,
                                  format=fmt, revision=revision)
        path, fmt = resolved.path, fmt or resolved.format
        hints = {**resolved.hints, **{key: v for key, v in hints.items() if v is not None}}
        expect, hookpoint = resolved.expect, None
    path = folder_of_weights_file(path)
    path = select_checkpoint(path, layer=layer, hookpoint=hookpoint)
    fmt = fmt or detect_format(path)
    if not path.exists():
        raise SAEFormatError(f"{path}: no such SAE checkpoint")
    sae = READERS[fmt][1](path, device, **hints).eval()
    for key, want in expect.items():
        got = sae.cfg.metadata.get(key)
        if want is not None and got != want:
            raise SAEFormatError(f"{path}: {key} is {got}, but the registry says {want} for {source!r}")
    return sae
