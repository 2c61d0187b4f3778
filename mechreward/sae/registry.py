"""Where SAEs come from: the registry of known public SAEs (`sae/registry.yaml`), the local store
(`sae/`), and Hugging Face downloads that fail fast and say what to put where when offline.

A source given to `load_sae` resolves here when it is not an existing path:

    registry:<name> | <name>      an entry of sae/registry.yaml (+ layer= for multi-layer releases)
    organism                      the SAE shipped with the built-in organism
    <owner>/<repo>                a Hugging Face repo (+ file= / subfolder= / hookpoint= / layer=)

Hub files are looked for first in the local mirror `sae/hub/<owner>/<repo>/<file>` (the store root
is `$MECHREWARD_SAE_DIR`, default `sae`), then in the Hugging Face cache, then downloaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import SAEFormatError

REGISTRY_FILE = Path(__file__).resolve().parent.parent.parent / "sae" / "registry.yaml"
"""The registry shipped with the repository."""

_FILES = {  # repo-relative files of the folder formats
    "native": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "zactheaipm": ("config.json", "weights.safetensors"),
}
_FILE_FORMATS = ("qwenscope", "caiovicentino")
_QWENSCOPE_REPO = re.compile(r"SAE-Res-.+-W(\d+)K-L0_(\d+)$")


def store_dir() -> Path:
    """The local SAE store: `$MECHREWARD_SAE_DIR` or `sae` (relative to the working directory)."""
    return Path(os.environ.get("MECHREWARD_SAE_DIR", "sae"))


def hub_mirror(repo: str) -> Path:
    """Where a hub repo's files are looked for before any download: `<store>/hub/<owner>/<repo>/`."""
    return store_dir() / "hub" / repo


# --------------------------------------------------------------------------- registry

@dataclass
class RegistryEntry:
    """One known public SAE release (a file pattern may cover several layers)."""

    name: str
    """Registry name (`mechreward sae list`); load with `load_sae("registry:<name>", layer=...)`."""
    repo: str | None
    """Hugging Face repo id; None when the release's location is not known."""
    format: str
    """Checkpoint format: qwenscope, zactheaipm, caiovicentino, sparsify or native."""
    model: str
    """The model whose residual stream it was trained on (HF id)."""
    layers: list[int]
    """Decoder layers covered (the output of layer L, i.e. hidden_states[L + 1])."""
    d_in: int | None = None
    d_sae: int | None = None
    k: int | None = None
    file: str | None = None
    """File pattern inside the repo for file formats, with `{layer}`, e.g. `layer{layer}.sae.pt`."""
    subfolder: str | None = None
    """Folder inside the repo for folder formats (zactheaipm `sae_<id>`, a sparsify hookpoint)."""
    hook: str = "model.layers.{layer}"
    """Hook point, `{layer}` filled in."""
    lr: float | None = None
    """Training learning rate, where the release states one."""
    verified: bool = True
    """False when some field could not be checked against the release's model card."""
    notes: str = ""
    """Source of the facts and anything unverified."""

    def __post_init__(self) -> None:
        if self.format not in (*_FILES, *_FILE_FORMATS):
            raise SAEFormatError(f"registry entry {self.name!r}: unknown format {self.format!r}")
        if isinstance(self.layers, str):  # "0-39"
            lo, _, hi = self.layers.partition("-")
            self.layers = list(range(int(lo), int(hi or lo) + 1))
        self.layers = [int(l) for l in self.layers]
        if self.lr is not None:
            self.lr = float(self.lr)  # YAML 1.1 reads 3e-5 as a string

    def pick_layer(self, layer: int | None) -> int:
        if layer is None:
            if len(self.layers) == 1:
                return self.layers[0]
            raise SAEFormatError(f"registry entry {self.name!r} covers layers {_span(self.layers)}; pass layer=<n>")
        if layer not in self.layers:
            raise SAEFormatError(f"registry entry {self.name!r} has no SAE for layer {layer} "
                                 f"(layers {_span(self.layers)})")
        return layer

    def files(self, layer: int) -> list[str]:
        """Repo-relative files of the SAE for `layer`."""
        if self.format in _FILE_FORMATS:
            if not self.file:
                raise SAEFormatError(f"registry entry {self.name!r}: the checkpoint's file name is not known "
                                     f"({self.notes or 'no file pattern'}); download it and load it by path")
            return [self.file.format(layer=layer)]
        sub = (self.subfolder or "").format(layer=layer).strip("/")
        return [f"{sub}/{f}" if sub else f for f in _FILES[self.format]]


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def load_registry(path: str | os.PathLike | None = None) -> dict[str, RegistryEntry]:
    """Entries of the registry file by name; unknown keys and duplicate names are errors."""
    import yaml

    path = Path(path) if path is not None else REGISTRY_FILE
    if not path.is_file():
        raise SAEFormatError(f"{path}: SAE registry not found")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SAEFormatError(f"{path}: not valid YAML ({e})") from None
    allowed = {f.name for f in fields(RegistryEntry)}
    out: dict[str, RegistryEntry] = {}
    for i, row in enumerate(doc.get("saes") or []):
        if not isinstance(row, dict) or "name" not in row:
            raise SAEFormatError(f"{path}: entry {i} has no 'name'")
        extra = set(row) - allowed
        if extra:
            raise SAEFormatError(f"{path}: entry {row['name']!r} has unknown keys {sorted(extra)}")
        try:
            entry = RegistryEntry(**row)
        except TypeError as e:
            raise SAEFormatError(f"{path}: entry {row['name']!r}: {e}") from None
        if entry.name in out:
            raise SAEFormatError(f"{path}: duplicate entry name {entry.name!r}")
        out[entry.name] = entry
    return out


# --------------------------------------------------------------------------- hub

def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def fetch(repo: str, files: list[str], revision: str | None = None) -> list[Path]:
    """Local paths of `files` of hub repo `repo`: from the mirror `sae/hub/<repo>/`, the HF cache, or
    a download. Offline (HF_HUB_OFFLINE=1) or unreachable: an SAEFormatError saying where to put them."""
    mirror = hub_mirror(repo)
    if all((mirror / f).is_file() for f in files):
        return [mirror / f for f in files]
    from huggingface_hub import hf_hub_download

    offline = _offline()
    out = []
    for f in files:
        try:
            out.append(Path(hf_hub_download(repo, f, revision=revision, local_files_only=offline, etag_timeout=5)))
        except Exception as e:  # offline, no network, no such repo/file, auth: one clear message
            why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            local = mirror / files[0] if len(files) == 1 else mirror / Path(files[0]).parent
            raise SAEFormatError(
                f"cannot get {f!r} from the Hugging Face repo {repo!r} ({why}). Download "
                f"{', '.join(repr(x) for x in files)} from https://huggingface.co/{repo} (e.g. `hf download {repo} "
                f"{' '.join(files)} --local-dir {mirror}`) and put them under {mirror}/ so this same call works "
                f"offline, or load the local copy directly: load_sae({str(local)!r})") from None
    return out


# --------------------------------------------------------------------------- resolving a source

@dataclass
class Resolved:
    path: Path
    """Local checkpoint file or folder."""
    format: str | None
    hints: dict[str, Any] = field(default_factory=dict)
    """k / layer / model / hook the checkpoint may not store."""
    expect: dict[str, Any] = field(default_factory=dict)
    """Metadata the loaded SAE must have (d_in, d_sae from the registry)."""


def _organism_sae() -> Path:
    from .. import organism

    path = getattr(organism, "ORGANISM_SAE_DIR", None)
    if path is None or not Path(path).exists():
        raise SAEFormatError("the built-in organism SAE is not available (mechreward.organism.ORGANISM_SAE_DIR"
                             f"{'' if path is None else ' = ' + str(path)}); train one with "
                             "`python -m mechreward.sae_train` and pass its folder")
    return Path(path)


def _from_entry(entry: RegistryEntry, layer: int | None, revision: str | None) -> Resolved:
    layer = entry.pick_layer(layer)
    if entry.repo is None:
        raise SAEFormatError(f"registry entry {entry.name!r}: the repository is not known ({entry.notes}); "
                             "download the checkpoint and load it by path")
    files = entry.files(layer)
    paths = fetch(entry.repo, files, revision)
    path = paths[0] if entry.format in _FILE_FORMATS else paths[0].parent
    hints = {"k": entry.k, "layer": layer, "model": entry.model, "hook": entry.hook.format(layer=layer)}
    return Resolved(path, entry.format, hints, {"d_in": entry.d_in, "d_sae": entry.d_sae})


def _from_hub(repo: str, layer: int | None, file: str | None, subfolder: str | None, hookpoint: str | None,
              format: str | None, revision: str | None) -> Resolved:
    folder = (subfolder or "").strip("/")
    hints: dict[str, Any] = {}
    m = _QWENSCOPE_REPO.search(repo)
    if m:  # Qwen-Scope names carry width and k: SAE-Res-<model>-W<N>K-L0_<k>
        hints["k"] = int(m.group(2))
    if file is None and m and layer is not None:
        file, format = f"layer{layer}.sae.pt", format or "qwenscope"
    if file is not None:
        rel = f"{folder}/{file}" if folder else file
        path = fetch(repo, [rel], revision)[0]
        if path.suffix in (".json", ".safetensors"):  # a file of a folder format: take its folder
            return _from_hub(repo, layer, None, str(Path(rel).parent) if "/" in rel else None, None, format, revision)
        return Resolved(path, format, hints)
    if hookpoint:
        folder = f"{folder}/{hookpoint}" if folder else hookpoint
        format = format or "sparsify"
    fmts = [format] if format in _FILES else list(_FILES) if format is None else []
    if not fmts:
        raise SAEFormatError(f"hub repo {repo!r}: format {format!r} is a single file; pass file=<name>")
    layouts = {f: [f"{folder}/{x}" if folder else x for x in _FILES[f]] for f in fmts}
    for f, files in layouts.items():  # already local (mirror) or in the cache?
        if all((hub_mirror(repo) / x).is_file() for x in files):
            return Resolved((hub_mirror(repo) / files[0]).parent, f, hints)
    if len(fmts) > 1 and not _offline():
        try:
            from huggingface_hub import list_repo_files

            present = set(list_repo_files(repo, revision=revision))
            fmts = [f for f in fmts if all(x in present for x in layouts[f])] or fmts
        except Exception:
            pass
    if len(fmts) > 1 and _offline():  # nothing to probe: say every layout that would be read
        mirror = hub_mirror(repo)
        options = "; ".join(f"{f}: {', '.join(files)}" for f, files in layouts.items())
        raise SAEFormatError(
            f"cannot get hub repo {repo!r} (HF_HUB_OFFLINE is set, and no known SAE layout is under {mirror}/ or "
            f"in the HF cache). Download the files of its layout from https://huggingface.co/{repo} and put them "
            f"under {mirror}/ (keeping their paths), one of: {options}; or pass format=<name> / file=<name> / "
            f"hookpoint=<name> to name the layout, or load a local copy by its path")
    for f in fmts[:-1]:
        try:
            paths = fetch(repo, layouts[f], revision)
            return Resolved(paths[0].parent, f, hints)
        except SAEFormatError:
            continue
    paths = fetch(repo, layouts[fmts[-1]], revision)
    return Resolved(paths[0].parent, fmts[-1], hints)


def resolve_source(source: str, *, layer: int | None = None, file: str | None = None, subfolder: str | None = None,
                   hookpoint: str | None = None, format: str | None = None, revision: str | None = None,
                   registry: dict[str, RegistryEntry] | None = None) -> Resolved:
    """A non-local `load_sae` source → a local checkpoint path (see the module docstring)."""
    if source == "organism":
        return Resolved(_organism_sae(), None)
    name = source[len("registry:"):] if source.startswith("registry:") else source
    reg = registry if registry is not None else load_registry()
    if name in reg:
        return _from_entry(reg[name], layer, revision)
    if source.startswith("registry:"):
        raise SAEFormatError(f"no SAE named {name!r} in the registry {REGISTRY_FILE} (see `mechreward sae list`)")
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
        return _from_hub(source, layer, file, subfolder, hookpoint, format, revision)
    raise SAEFormatError(f"{source}: no such SAE checkpoint: not an existing file or folder, not a registry name (see `mechreward sae "
                         "list`) and not a Hugging Face repo id")


# --------------------------------------------------------------------------- listing

RUN_SAE_DEPTH = 6
"""How deep below a runs/ root `local_saes(deep=True)` looks for SAE folders."""


def _deep_candidates(root: Path, depth: int) -> list[Path]:
    """Folders under `root` (at most `depth` levels, hidden folders and hub mirrors skipped) that
    hold an SAE config file."""
    out, level = [], [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".") and c.name != "hub")
            except OSError:
                continue
            for c in children:
                if (c / "cfg.json").is_file() or (c / "config.json").is_file():
                    out.append(c)
                nxt.append(c)
        level = nxt
    return out


def local_saes(root: str | os.PathLike | None = None, deep: bool = False) -> list[dict[str, Any]]:
    """SAEs trained or saved under the store (`sae/<name>/`, one level of hookpoint folders below),
    or with `deep` anywhere up to `RUN_SAE_DEPTH` levels below `root` (for `runs/`, where
    sae_train runs with another `output_dir`, and the demo, save theirs): name, model, layer, d_sae,
    k, format, path. Reads only the configs; hub mirrors are skipped."""
    from .formats import READERS, _read_json

    root = Path(root) if root is not None else store_dir()
    if not root.is_dir():
        return []
    rows = []
    if deep:
        candidates = _deep_candidates(root, RUN_SAE_DEPTH)
    else:
        candidates = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name != "hub" and not p.name.startswith(".")]
        candidates += [c for p in list(candidates) for c in sorted(p.iterdir()) if c.is_dir()]
    for p in candidates:
        fmt = next((f for f in ("native", "sparsify", "zactheaipm") if READERS[f][0](p)), None)
        if fmt is None:
            continue
        try:
            cfg = _read_json(p / ("config.json" if fmt == "zactheaipm" else "cfg.json"))
        except SAEFormatError:
            continue
        md = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        from .formats import layer_from_name

        layer = md.get("layer", cfg.get("hook_point_layer", cfg.get("layer")))
        if layer is None:
            layer = layer_from_name(md.get("hook_name") or cfg.get("hook_point") or p.name)
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or (md.get("mechreward") or {}).get("k")
        rows.append({"name": str(p.relative_to(root)), "model": md.get("model_name", cfg.get("model_name")),
                     "layer": layer, "d_sae": cfg.get("d_sae", cfg.get("num_latents", cfg.get("dict_size"))),
                     "k": k, "format": fmt, "path": str(p)})
    return rows
