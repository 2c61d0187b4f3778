"""The `mechreward` console script: small utility subcommands (the pipeline steps are
`python -m mechreward.<command>` hydra entry points).

Adding a subcommand: write `_add_<group>(subparsers)` that registers its parser(s) with
`set_defaults(func=...)`, and append it to `GROUPS`. A `func(args) -> int` returns the exit code;
a `MechrewardError` it raises is printed without a traceback (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _sae_list(args: argparse.Namespace) -> int:
    from .sae.registry import _span, load_registry, local_saes, store_dir

    reg = load_registry(args.registry)
    rows = [{"name": e.name, "format": e.format, "model": e.model, "layers": _span(e.layers), "d_in": e.d_in,
             "d_sae": e.d_sae, "k": e.k, "repo": (e.repo or "(unknown)") + ("" if e.verified else " *")}
            for e in reg.values()]
    print(f"Registry ({len(rows)} public SAEs; load with mechreward.load_sae('registry:<name>', layer=<n>)):")
    print(_table(rows, ["name", "format", "model", "layers", "d_in", "d_sae", "k", "repo"]))
    if any(not e.verified for e in reg.values()):
        print("* some fields unverified: see notes in sae/registry.yaml")
    root = args.store or store_dir()
    local = local_saes(root)
    print(f"\nLocal SAEs under {root}/ ({len(local)}):")
    if local:
        print(_table(local, ["name", "model", "layer", "d_sae", "k", "format", "path"]))
    else:
        print("(none; train one with `python -m mechreward.sae_train`)")
    from pathlib import Path

    for extra in args.runs:
        found = [r for r in local_saes(extra, deep=True)
                 if not any(Path(r["path"]).resolve() == Path(x["path"]).resolve() for x in local)]
        if found:
            print(f"\nSAEs saved under {extra}/ ({len(found)}; sae_train output_dir elsewhere, demo stages):")
            print(_table(found, ["name", "model", "layer", "d_sae", "k", "format", "path"]))
    return 0


def _with_runs(args: argparse.Namespace) -> argparse.Namespace:
    if args.runs is None:
        args.runs = ["runs"]
    return args


def _add_sae(sub: argparse._SubParsersAction) -> None:
    sae = sub.add_parser("sae", help="SAE registry and local store")
    sae_sub = sae.add_subparsers(dest="sae_command", metavar="<command>")
    ls = sae_sub.add_parser("list", help="known public SAEs (sae/registry.yaml) and SAEs trained under sae/")
    ls.add_argument("--registry", default=None, help="registry YAML (default: the shipped sae/registry.yaml)")
    ls.add_argument("--store", default=None, help="local SAE store (default: $MECHREWARD_SAE_DIR or sae)")
    ls.add_argument("--runs", action="append", default=None,
                    help="also list SAEs saved anywhere below this folder (repeatable; default: runs)")
    ls.set_defaults(func=lambda args: _sae_list(_with_runs(args)))
    sae.set_defaults(func=lambda args: (sae.print_help(), 1)[1])


GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_sae]


def _inspect(args: argparse.Namespace) -> int:
    from .features import format_inspection, inspect_text
    from .models import load_model, normalize_layer, num_layers
    from .rollouts import layers_sae, load_sae_for

    model, tokenizer = load_model(args.model)
    sae = load_sae_for(args.sae, model)
    n = num_layers(model)
    layer = layers_sae(sae, n) if args.layer is None else normalize_layer(args.layer, n)
    rows = inspect_text(model, tokenizer, sae, layer, args.text, args.top)
    print(f"# {args.model} layer {layer}, SAE {sae.cfg.metadata.get('path')}: top {args.top} features per token "
          "(feature:activation)")
    print(format_inspection(rows))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print the top SAE features of each token of a text")
    p.add_argument("text", help="the text to encode")
    p.add_argument("--sae", default="organism", help="SAE directory (any format) or `organism` (default)")
    p.add_argument("--model", default="organism", help="model name or path (default: the built-in organism)")
    p.add_argument("--layer", type=int, default=None, help="decoder layer to read (default: the SAE's recorded layer)")
    p.add_argument("--top", type=int, default=5, help="features listed per token (default 5)")
    p.set_defaults(func=_inspect)


GROUPS.append(_add_inspect)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mechreward", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mechreward {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in GROUPS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import MechrewardError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except MechrewardError as e:
        print(f"mechreward: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
