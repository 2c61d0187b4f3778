"""Hydra entry points: structured configs, the run dir, and clean errors.

Each command module defines a dataclass config and a `run(cfg, run) -> report` function and
ends with `main = hydra_command("name", Config, run)`. Its primary config is `conf/<name>.yaml`,
which puts the dataclass schema first in its defaults list, so a key that the schema does not
have is an error naming the key. `hydra.run.dir=...` chooses the run dir.
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


def hydra_command(name: str, schema: type, fn: Callable[[Any, Run], Any]) -> Callable[[], None]:
    """Make `python -m mechreward.<name>` from a schema and a run function."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    register(name, schema)

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

    return _main


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
