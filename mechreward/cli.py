"""Hydra entry points: structured configs, the run dir, and clean errors.

Each command module defines a dataclass config and a `run(cfg, run) -> report` function and
ends with `main = hydra_command("name", Config, run)`. Its primary config is `conf/<name>.yaml`,
which puts the dataclass schema first in its defaults list, so a key that the schema does not
have is an error naming the key. `hydra.run.dir=...` chooses the run dir.

Pass-through dicts (a schema field typed `dict`, e.g. rl's `grpo` and g2's `protocol.grpo`, whose keys
are TRL's and validated later) take new keys without Hydra's `+`: `grpo.use_vllm=true` is rewritten
to `++grpo.use_vllm=true` (add or override) before Hydra parses the command line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import MechrewardError
from .run import Run, seed_everything

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register(name: str, schema: type) -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{name}_schema", node=schema)


def passthrough_dicts(schema: type, prefix: str = "") -> list[str]:
    """Dotted paths of the schema's fields typed `dict` (free-form keys), nested dataclasses included."""
    import dataclasses
    import typing

    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        t = hints.get(f.name)
        origin = typing.get_origin(t) or t
        if origin is dict:
            out.append(prefix + f.name)
        elif dataclasses.is_dataclass(t):
            out += passthrough_dicts(t, f"{prefix}{f.name}.")
    return out


def add_passthrough_keys(argv: list[str], dicts: list[str]) -> list[str]:
    """`grpo.use_vllm=true` → `++grpo.use_vllm=true` for keys under a pass-through dict (Hydra needs `+` for a
    key the config does not have yet, and refuses `+` for one it has; `++` does both)."""
    out = []
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and not a.startswith(("+", "~", "-")) and any(key.startswith(d + ".") for d in dicts):
            a = "++" + a
        out.append(a)
    return out


def hydra_command(name: str, schema: type, fn: Callable[[Any, Run], Any]) -> Callable[[], None]:
    """Make `python -m mechreward.<name>` from a schema and a run function."""
    import functools

    import hydra
    from omegaconf import DictConfig, OmegaConf

    register(name, schema)
    dicts = passthrough_dicts(schema)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=name)
    def _main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        logging.getLogger("httpx").setLevel(logging.WARNING)
        run = Run(HydraConfig.get().runtime.output_dir, name)
        run.save_config(cfg)
        obj = OmegaConf.to_object(cfg)
        if hasattr(obj, "seed"):
            seed_everything(obj.seed)
        from .distributed import shutdown

        try:
            fn(obj, run)
        except MechrewardError as e:
            print(f"mechreward {name}: error: {e}", file=sys.stderr)
            sys.exit(2)
        shutdown()  # under torchrun: leave the process group together
        print(f"mechreward {name}: results in {run.dir}", file=sys.stderr)

    @functools.wraps(_main)
    def main() -> None:
        sys.argv[1:] = add_passthrough_keys(sys.argv[1:], dicts)
        _main()

    return main


def primary_yaml(name: str) -> str:
    """The text of a minimal primary config (used to keep conf/<name>.yaml files uniform)."""
    return (
        "defaults:\n"
        f"  - {name}_schema\n"
        "  - _self_\n\n"
        "hydra:\n"
        "  run:\n"
        f"    dir: runs/{name}/${{now:%Y-%m-%d_%H-%M-%S}}\n"
        "  job:\n"
        "    chdir: false\n"
    )
