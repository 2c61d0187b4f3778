"""`python -m mechreward.sae_eval`: put any SAE (ours, Qwen-Scope, SAELens, sparsify, ...) through
the same held-out evaluation as a freshly trained one.

For each SAE + its model on held-out text: variance explained, L0, dead / alive / healthy
fractions, and the splice (the reconstruction in place of the hooked layer's output): CE clean /
SAE / zero-ablated, CE increase in nats and relative, KL and loss recovered, with flags when loss
recovered cannot be read as usual; a feature-density histogram, and a per-SAE table when several
are given. The positions are those training uses (the `filters`: position 0, special tokens,
norm outliers excluded and counted); on the organism one problem per row, the headline CE on its
completion. report.json has the training report's keys (worst over SAEs at the top, one row per
SAE under `saes`).

    python -m mechreward.sae_eval                                  # the organism's SAE
    python -m mechreward.sae_eval sae.path=sae/my-sae
    python -m mechreward.sae_eval model=qwen3_5_35b_a3b_base \\
        'saes=[registry:qwenscope-qwen3.5-35b-a3b-base-w32k-l0_50@23,/path/to/my_sae]'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .activations import FilterConfig
from .cli import hydra_command
from .corpora import real_model_data_default
from .data import DataConfig, heldout_set
from .errors import ConfigError, ShapeError
from .models import ModelConfig, find_layers, hidden_size, load_model, normalize_layer, resolve_device
from .rollouts import ORGANISM_SAE, SAERef, resolve_sae_path
from .run import Run, markdown_table
from .sae.evaluate import density_histogram_figure
from .sae.formats import load_sae
from .sae_train import evaluate_layer, heldout_activations, splice_markdown, worst_over


@dataclass
class SAEEvalConfig:
    """Config of `python -m mechreward.sae_eval` (see conf/sae_eval.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sae: SAERef = field(default_factory=SAERef)
    """`sae.path`: one SAE source for `load_sae` (path, registry name, hub repo, or `organism` for the
    organism's SAE); used when `saes` is empty."""
    saes: list[str] = field(default_factory=list)
    """Several SAE sources, one table row each. `<source>@<layer>` picks a layer of a multi-layer release."""
    layer: int | None = None
    """Layer for SAEs whose metadata does not say (and for picking from a multi-layer source)."""
    k: int | None = None
    """k for checkpoints that do not store it (a local Qwen-Scope file outside the registry)."""
    heldout_sequences: int | None = None
    """Override data.heldout_sequences (packed rows of data.context_length tokens; organism problems)."""
    splice: bool = True
    """Measure loss recovered and KL by splicing the reconstruction into the model."""
    batch_size: int = 16
    """Sequences per model forward."""
    seed: int = 0


def _parse_source(text: str, default_layer: int | None) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.+)@(-?\d+)", text)
    return (m.group(1), int(m.group(2))) if m else (text, default_layer)


def run_sae_eval(cfg: SAEEvalConfig, run: Run) -> dict:
    specs = cfg.saes or ([cfg.sae.path] if cfg.sae.path else [])
    if not specs:
        raise ConfigError("no SAE to evaluate: set sae.path=<source> or saes=[...]")
    sources = [_parse_source(s, cfg.layer) for s in specs]
    defaulted = real_model_data_default(cfg.data, cfg.model.name_or_path, "sae_eval")
    model, tokenizer = load_model(cfg.model)
    device = resolve_device(cfg.model.device)
    n_layers, d_model = len(find_layers(model)), hidden_size(model)
    saes = []
    for source, layer in sources:
        where = resolve_sae_path(source, run) if source == ORGANISM_SAE else source
        sae = load_sae(where, device=device, layer=layer, k=cfg.k)
        md = sae.cfg.metadata
        at = md.get("layer") if md.get("layer") is not None else layer
        if at is None:
            raise ConfigError(f"SAE {source!r} does not say which layer it reads; pass layer=<n> (or {source}@<n>)")
        if sae.cfg.d_in != d_model:
            raise ShapeError(f"SAE {source!r} has d_in={sae.cfg.d_in} but model {cfg.model.name_or_path!r} has "
                             f"hidden size {d_model}")
        saes.append((source, normalize_layer(int(at), n_layers), sae.eval()))
    data = cfg.data
    if cfg.heldout_sequences is not None:
        data.heldout_sequences = cfg.heldout_sequences
    heldout = heldout_set(tokenizer, data)
    layers = sorted({layer for _, layer, _ in saes})
    held, keep, stats = heldout_activations(model, layers, heldout.input_ids, tokenizer, cfg.filters,
                                            batch_size=cfg.batch_size, attention_mask=heldout.attention_mask,
                                            return_mask=True)
    rows = []
    for i, (source, layer, sae) in enumerate(saes):
        m, fire_rates = evaluate_layer(model, layer, sae, heldout, held[layer], keep, stats, cfg.splice,
                                       batch_size=cfg.batch_size)
        m.pop("n_tokens")
        md = sae.cfg.metadata
        rows.append({"sae": source, "layer": layer, **m,
                     "tokens": int(held[layer].shape[0]), "sae_path": md.get("path"), "format": md.get("format"),
                     "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "sha256": md.get("sha256"), "model": md.get("model")})
        fig_name = f"feature_density_{i}_L{layer}.png" if len(saes) > 1 else f"feature_density_L{layer}.png"
        run.save_figure(density_histogram_figure(fire_rates), fig_name)
        rows[-1]["density_plot"] = fig_name
    report: dict[str, Any] = worst_over(rows)
    report.update({"tokens": min(r["tokens"] for r in rows),
                   "sae_path": rows[0]["sae_path"] if len(rows) == 1 else [r["sae_path"] for r in rows],
                   "saes": rows, "model": cfg.model.name_or_path, "heldout_sequences": int(heldout.input_ids.shape[0]),
                   "heldout_filter": dict(stats),
                   "data_source": data.source, "data_source_defaulted": defaulted})
    cols = ["sae", "layer", "format", "d_sae", "k", "variance_explained", "l0", "dead_fraction", "alive_fraction",
            "healthy_fraction"] + (["loss_recovered", "ce_increase", "kl_sae"] if cfg.splice else [])
    unit = ("one problem per row (padded to the longest)" if heldout.completion_mask is not None
            else f"{heldout.input_ids.shape[1]} tokens")
    md_text = ["# SAE evaluation", "",
               f"model `{cfg.model.name_or_path}`, {heldout.input_ids.shape[0]} held-out sequences of "
               f"{unit} ({report['tokens']:,} tokens after filters)", "",
               "One row per SAE (report.json: worst over SAEs at the top, rows under `saes`):", "",
               markdown_table(rows, cols), *splice_markdown(rows)]
    if not cfg.splice:
        md_text += [rows[0]["positions"]["text"], ""]
    md_text += [f"![feature density {r['sae']} L{r['layer']}]({r['density_plot']})" for r in rows]
    run.write_report(report, "\n".join(md_text) + "\n")
    print(markdown_table(rows, cols))
    for code, why in report["flags"].items():
        print(f"FLAG {code}: {why}")
    return report


main = hydra_command("sae_eval", SAEEvalConfig, run_sae_eval)

if __name__ == "__main__":
    main()
