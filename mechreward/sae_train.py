"""`python -m mechreward.sae_train`: train TopK SAEs on residual-stream activations.

One model forward (early exit at the deepest layer) feeds one SAE per requested layer.
Activations come live from the model (default), from an activation store written by
`python -m mechreward.harvest` (`activations=<store dir>`), or from a tensor (`train_saes`
from Python). Checkpoints hold everything for a bitwise-identical resume on CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import io
from .distributed import World, init as init_distributed, layers_for_rank
from .activations import (ActivationSource, FilterConfig, LiveSource, StoreSource, TokenStats,
                          keep_mask, sae_batches)
from .cli import hydra_command
from .corpora import real_model_data_default
from .data import ORGANISM_SOURCES, DataConfig, HeldOut, heldout_set, token_batches
from .errors import ConfigError, DataError
from .models import (ModelConfig, ResidualCapture, find_layers, hidden_size, load_config, load_model, normalize_layer,
                     resolve_device)
from .run import Run, markdown_table, progress, read_metrics, show_progress
from .sae.evaluate import activation_metrics, density_histogram_figure, splice_metrics
from .sae.formats import save_sae
from .sae.model import SAEConfig, SparseAutoencoder
from .sae.train import SAETrainer, TrainerConfig

CHECKPOINT = "checkpoint.pt"


@dataclass
class SAEShape:
    """The dictionary to learn (one per layer)."""

    d_sae: int = 2048
    """Number of latents."""
    k: int = 32
    """Active latents per token."""
    architecture: str = "topk"
    """`topk` or `batchtopk`."""


@dataclass
class SAETrainRunConfig:
    """Config of `python -m mechreward.sae_train` (see conf/sae_train.yaml and conf/recipe/)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sae: SAEShape = field(default_factory=SAEShape)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    layers: list[int] = field(default_factory=lambda: [2])
    """Decoder layers (0-based, negative allowed) whose outputs get an SAE each."""
    tokens: int = 800_000
    """Training tokens per SAE."""
    batch_size: int = 4096
    """Tokens per SAE step."""
    activations: str = "live"
    """`live` (run the model) or the directory of an activation store (`mechreward.harvest`)."""
    batches_per_block: int = 16
    """Model batches mixed and shuffled together in one block (live source)."""
    prefetch: bool = True
    """Compute the next block (model forward, or store read) in a background thread while the
    SAEs train on the current one; results are identical either way."""
    checkpoint_every: int = 500_000
    """Checkpoint every this many tokens (0 = only at the end)."""
    resume: bool = False
    """Continue from the checkpoint in this run dir, or else the latest unfinished sae_train run."""
    name: str | None = None
    """SAE name; default `<model>-L<layer>-k<k>-<d_sae>`. Written to `<output_dir>/<name>/`."""
    output_dir: str = "sae"
    """Where trained SAEs go (native / SAELens v6 layout)."""
    log_every: int = 25
    """Log metrics every this many steps (the only host syncs of the loop)."""
    progress_every: int | None = None
    """When stderr is not a terminal (CI, a log file), print one progress line (tokens, tokens/s,
    fvu, ETA) every this many steps; None = every `log_every` steps, 0 = never."""
    eval_splice: bool = True
    """Measure loss recovered / KL by splicing the reconstruction into the model on held-out text."""
    tensorboard: bool = False
    """Also log to TensorBoard in the run dir (needs the `tensorboard` package)."""
    wandb: str | None = None
    """Also log to this Weights & Biases project (needs `wandb`)."""
    dry_run: bool = False
    """Read only the model config and print what the run would do."""
    seed: int = 0
    distributed: str = "data"
    """Under torchrun: `data` (every SAE data parallel: each rank trains on its slice of every
    global batch of `batch_size`) or `layers` (each rank trains its own layers' SAEs)."""


def sae_name(cfg: SAETrainRunConfig, layer: int) -> str:
    if cfg.name:
        return cfg.name if len(cfg.layers) == 1 else f"{cfg.name}-L{layer}"
    model = Path(cfg.model.name_or_path.rstrip("/")).name or "model"
    return f"{model}-L{layer}-k{cfg.sae.k}-{cfg.sae.d_sae}"


# --------------------------------------------------------------------------- dry run

def plan(cfg: SAETrainRunConfig) -> dict:
    """What a run would do, from the model config alone (no weights)."""
    mcfg = load_config(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.revision)
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    n_layers, d_in = text.num_hidden_layers, text.hidden_size
    layers = sorted({normalize_layer(l, n_layers) for l in cfg.layers})
    _check_shape(cfg, d_in)
    params = 2 * d_in * cfg.sae.d_sae + cfg.sae.d_sae + d_in
    # fp32 weights + grads + two Adam moments; activations of one step (pre-acts dominate)
    per_sae = params * 4 * 4
    step_acts = cfg.batch_size * (cfg.sae.d_sae + 3 * d_in) * 4
    steps = cfg.tokens // cfg.batch_size
    types = getattr(text, "layer_types", None)
    return {
        "model": cfg.model.name_or_path, "model_type": getattr(text, "model_type", "?"), "n_layers": n_layers,
        "d_model": d_in, "layers": layers, "layer_types": [types[l] for l in layers] if types else None,
        "deepest_layer_forward_fraction": (max(layers) + 1) / n_layers,
        "d_sae": cfg.sae.d_sae, "k": cfg.sae.k, "architecture": cfg.sae.architecture,
        "sae_params": params, "memory_bytes_per_sae": per_sae, "memory_bytes_total": per_sae * len(layers) + step_acts,
        "tokens": cfg.tokens, "batch_size": cfg.batch_size, "steps": steps,
        "outputs": [str(Path(cfg.output_dir) / sae_name(cfg, l)) for l in layers],
    }


def _check_shape(cfg: SAETrainRunConfig, d_in: int) -> None:
    if not 0 < cfg.sae.k < cfg.sae.d_sae:
        raise ConfigError(f"sae.k must be in 1..d_sae-1, got k={cfg.sae.k} with d_sae={cfg.sae.d_sae}")
    if cfg.tokens < cfg.batch_size:
        raise ConfigError(f"tokens={cfg.tokens} is less than one batch (batch_size={cfg.batch_size})")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _plan_text(p: dict) -> str:
    lines = [f"model {p['model']} ({p['model_type']}, {p['n_layers']} layers, d_model {p['d_model']})",
             f"layers {p['layers']}" + (f" types {p['layer_types']}" if p["layer_types"] else "")
             + f"; forward runs {p['deepest_layer_forward_fraction']:.0%} of the layers (early exit)",
             f"SAE {p['architecture']} d_sae {p['d_sae']} k {p['k']}: {p['sae_params']:,} params, "
             f"{_gib(p['memory_bytes_per_sae'])} with grads + Adam each; total with one step's activations "
             f"{_gib(p['memory_bytes_total'])}",
             f"{p['tokens']:,} tokens per SAE in {p['steps']:,} steps of {p['batch_size']}",
             "outputs: " + ", ".join(p["outputs"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- training loop

class _Loggers:
    def __init__(self, cfg: SAETrainRunConfig, run: Run):
        self.run, self.tb, self.wb = run, None, None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard=true needs the `tensorboard` package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(run.dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb=... needs the `wandb` package (pip install wandb)") from None
            self.wb = wandb.init(project=cfg.wandb, dir=str(run.dir), config=asdict(cfg))

    def log(self, step: int, row: dict) -> None:
        self.run.log(step, **row)
        for k, v in row.items():
            if isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def train_saes(source: ActivationSource, cfg: SAETrainRunConfig, run: Run, checkpoint: dict | None = None,
               device: torch.device | None = None, world: World | None = None) -> dict[int, SparseAutoencoder]:
    """Train one SAE per layer of `source`; checkpoints to `run.dir/checkpoint.pt`.

    Under several ranks (`world`) every rank reads the same source; with `cfg.distributed`
    `data` each rank steps on its slice of each batch, with `layers` on its own layers (the
    SAEs returned are this rank's). Rank 0 writes logs and checkpoints.
    """
    device = device or torch.device("cpu")
    world = world or World()
    if cfg.distributed not in ("data", "layers"):
        raise ConfigError(f"distributed={cfg.distributed!r}; expected data or layers")
    by_layer = world.enabled and cfg.distributed == "layers"
    d_in = source.d_in
    _check_shape(cfg, d_in)
    steps = cfg.tokens // cfg.batch_size
    saes, trainers = {}, {}
    for layer in (layers_for_rank(source.layers, world) if by_layer else source.layers):
        scfg = SAEConfig(d_in=d_in, d_sae=cfg.sae.d_sae, k=cfg.sae.k, architecture=cfg.sae.architecture,
                         metadata={"model_name": cfg.model.name_or_path, "layer": layer,
                                   "hook_name": f"model.layers.{layer}"})
        torch.manual_seed(cfg.seed + layer)
        saes[layer] = SparseAutoencoder.from_config(scfg).to(device)
        trainers[layer] = SAETrainer(saes[layer], cfg.trainer, total_steps=steps, device=device,
                                     world=None if by_layer else world)
    step, position = 0, (0, 0)
    if checkpoint is not None:
        for layer, state in checkpoint["trainers"].items():
            if int(layer) in trainers:
                trainers[int(layer)].load_state_dict(state)
        step, position = checkpoint["step"], tuple(checkpoint["position"])
        source.stats = TokenStats(checkpoint["stats"])
        torch.set_rng_state(checkpoint["torch_rng"])
    loggers = _Loggers(cfg, run)
    every = max(1, cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else 0
    bar = progress(total=steps * cfg.batch_size, desc="sae_train", unit="tok", lines=False)  # own lines
    bar.update(step * cfg.batch_size)
    t0, step0 = time.time(), step
    batches = sae_batches(source, cfg.batch_size, position, prefetch=cfg.prefetch)
    for position, batch in batches:
        outs = {}
        for layer, trainer in trainers.items():
            x = batch[layer].to(device, torch.float32)
            if step == 0:
                trainer.initialize(x)  # the global batch: identical on every rank
            outs[layer] = trainer.step(x if by_layer else world.local_slice(x))
        step += 1
        bar.update(cfg.batch_size)
        if (step % cfg.log_every == 0 or step == steps) and world.is_main:
            rate = (step - step0) * cfg.batch_size / max(time.time() - t0, 1e-9)
            for layer, o in outs.items():
                row = {k: float(v) for k, v in o._asdict().items()
                       if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)}
                loggers.log(step, {"layer": layer, "tokens": step * cfg.batch_size, "tokens_per_second": rate, **row})
            fvu = float(next(iter(outs.values())).fvu)
            bar.set_postfix(fvu=f"{fvu:.3f}")
            every_line = cfg.log_every if cfg.progress_every is None else cfg.progress_every
            if every_line and not show_progress() and (step % every_line == 0 or step == steps):
                print(progress_line(step, steps, cfg.batch_size, rate, fvu), file=sys.stderr, flush=True)
        if every and step % every == 0 and step < steps:
            save_checkpoint(run, trainers, step, position, source.checkpoint_stats, cfg, world, gather=by_layer)
        if step >= steps:
            break
    batches.close()  # stops (and waits for) a prefetching producer before the model is used again
    bar.close()
    loggers.close()
    if step < steps and world.is_main:
        run.log(step, warning=f"data ran out after {step * cfg.batch_size} tokens (asked for {cfg.tokens})")
    elapsed = time.time() - t0
    for sae in saes.values():
        sae.metadata_extra = {"tokens": step * cfg.batch_size, "steps": step,
                              "dead_tokens": next(iter(trainers.values())).dead_tokens if trainers else None,
                              "tokens_per_second": (step - step0) * cfg.batch_size / max(elapsed, 1e-9)}
    return saes


def progress_line(step: int, steps: int, batch_size: int, rate: float, fvu: float) -> str:
    """One line of training progress for logs: step, tokens, tokens/s, fvu (first SAE), ETA."""
    left = (steps - step) * batch_size / rate if rate > 0 else float("nan")
    eta = f"{int(left // 60)}m{int(left % 60):02d}s" if left == left else "?"
    return (f"sae_train: step {step}/{steps}, tokens {step * batch_size:,}/{steps * batch_size:,} "
            f"({step / steps:.0%}), {rate:,.0f} tokens/s, fvu {fvu:.4f}, ETA {eta}")


def save_checkpoint(run: Run, trainers: dict, step: int, position: tuple, stats: dict, cfg,
                    world: World | None = None, gather: bool = False) -> None:
    """Rank 0 writes; with `gather` (layers split over ranks) it first collects every rank's trainers."""
    world = world or World()
    states = {int(l): t.state_dict() for l, t in trainers.items()}
    if gather:
        states = {l: s for part in world.all_gather_object(states) for l, s in part.items()}
    if not world.is_main:
        return
    state = {"trainers": states, "step": step,
             "position": list(position), "stats": dict(stats), "torch_rng": torch.get_rng_state(),
             "config": json.loads(json.dumps(asdict(cfg), default=str))}
    io.torch_save(run.path(CHECKPOINT), state)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _find_resume(run: Run) -> tuple[Run, dict] | None:
    if run.path(CHECKPOINT).exists():
        return run, load_checkpoint(run.path(CHECKPOINT))
    root = run.dir.parent
    candidates = sorted((p for p in root.glob(f"*/{CHECKPOINT}") if p.parent != run.dir
                         and not (p.parent / "report.json").exists()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        return None
    old = Run(candidates[-1].parent, run.command)
    # The fresh dir hydra made for this invocation holds nothing but its config: drop it.
    if all(p.name in ("config.yaml", ".hydra") or p.suffix == ".log" for p in run.dir.iterdir()):
        shutil.rmtree(run.dir, ignore_errors=True)
    return old, load_checkpoint(candidates[-1])


# --------------------------------------------------------------------------- evaluation + outputs

@torch.no_grad()
def heldout_activations(model, layers, input_ids: torch.Tensor, tokenizer, filters: FilterConfig,
                        batch_size: int = 16, attention_mask: torch.Tensor | None = None,
                        return_mask: bool = False):
    """{layer: [n, d]} of the held-out tokens that pass the training filters (`filters`: position
    0, special tokens, norm outliers; positions where `attention_mask` is 0 are padding). With
    `return_mask`, also the [H, T] keep mask and the TokenStats of what was dropped."""
    device = next(model.parameters()).device
    cap = ResidualCapture(model, layers)
    parts: dict[int, list] = {l: [] for l in layers}
    stats, masks = TokenStats(), []
    for i in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[i:i + batch_size]
        acts = {l: a.float() for l, a in cap.run(input_ids=ids.to(device), use_cache=False).items()}
        keep = keep_mask(ids, acts, filters, _special_ids(tokenizer), stats,
                         valid=None if attention_mask is None else attention_mask[i:i + batch_size] > 0)
        masks.append(keep)
        flat = keep.flatten()
        for l in layers:
            parts[l].append(acts[l].reshape(flat.shape[0], -1)[flat.to(acts[l].device)])
    acts = {l: torch.cat(p) for l, p in parts.items()}
    return (acts, torch.cat(masks), stats) if return_mask else acts


def positions_text(stats: dict, completion: bool) -> str:
    """One sentence: which held-out positions the metrics score and what was excluded."""
    dropped = ", ".join(f"{k.replace('_', ' ')} {stats.get(k, 0):,}" for k in
                        ("first_position", "special", "outlier", "nonfinite", "padding") if stats.get(k, 0))
    text = (f"Activation metrics use the {stats['kept']:,} of {stats['seen']:,} held-out positions the training "
            f"filters keep (excluded: {dropped or 'none'}); the splice replaces the layer output at exactly those "
            "positions and leaves the others clean. ")
    if completion:
        text += ("Headline CE / KL / loss recovered score the completion targets (worked solution + EOS, what the "
                 "organism was trained to predict); the `_all` keys score every next-token target of the rows "
                 "predicted from a spliced position (the prediction made at an excluded position, e.g. position 0, "
                 "is not scored: the SAE does not touch it).")
    else:
        text += ("CE / KL / loss recovered score every next-token target predicted from a spliced position "
                 "(the prediction made at an excluded position, e.g. position 0 or a separator, is not scored).")
    return text


SPLICE_KEYS = ("ce_clean", "ce_sae", "ce_zero", "loss_recovered", "ce_increase", "ce_increase_relative", "kl_sae",
               "kl_zero", "n_tokens")


def evaluate_layer(model, layer: int, sae: SparseAutoencoder, held: HeldOut, acts: torch.Tensor, keep: torch.Tensor,
                   stats: dict, splice: bool, batch_size: int = 16) -> tuple[dict[str, Any], torch.Tensor]:
    """Held-out metrics of one SAE: activation metrics on `acts` (the kept positions `keep`), and
    with `splice` the CE / KL / loss recovered of splicing it in at those positions (headline on
    the completion when `held` has one, `_all` over every target). Returns (row, fire_rates)."""
    m = activation_metrics(sae, acts.to(sae.W_enc.device))
    fire_rates = m.pop("fire_rates")
    row: dict[str, Any] = {k: float(v) for k, v in m.items()}
    row["n_tokens"] = int(m["n_tokens"])
    completion = held.completion_mask is not None
    flags: dict[str, str] = {}
    if splice:
        s = splice_metrics(model, layer, sae, held.input_ids, held.attention_mask, splice_mask=keep,
                           score_mask=held.completion_mask, batch_size=batch_size)
        flags = s.pop("flags")
        row.update({k: (int(v) if isinstance(v, int) else float(v)) for k, v in s.items() if k != "n_tokens"})
        row["scored_tokens"] = s["n_tokens"]
        if not completion:  # the headline already is every target
            row.update({f"{k}_all": row[k] if k != "n_tokens" else s["n_tokens"] for k in SPLICE_KEYS})
        row["scored"] = "completion" if completion else "all"
    row["positions"] = {"activation_tokens": int(acts.shape[0]), "spliced": int(keep.sum()),
                        "excluded": {k: int(stats.get(k, 0)) for k in
                                     ("first_position", "special", "outlier", "nonfinite", "padding")},
                        "seen": int(stats["seen"]), "text": positions_text(stats, completion)}
    row["flags"] = flags
    return row, fire_rates


def worst_over(rows: list[dict]) -> dict[str, Any]:
    """The report's top level: each metric's worst value over the rows (layers or SAEs), every
    row's flags (prefixed by the row when several), and the shared position description."""
    worst = {"variance_explained": min, "l0": max, "dead_fraction": max, "alive_fraction": min,
             "healthy_fraction": min, "loss_recovered": min, "kl_sae": max, "ce_increase": max,
             "ce_increase_relative": max, "loss_recovered_all": min, "kl_sae_all": max, "ce_increase_all": max,
             "ce_increase_relative_all": max}
    out: dict[str, Any] = {k: f(r[k] for r in rows) for k, f in worst.items() if k in rows[0]}
    for k in ("ce_clean", "ce_sae", "ce_zero", "ce_clean_all", "ce_sae_all", "ce_zero_all", "scored",
              "scored_tokens"):
        if k in rows[0] and len(rows) == 1:
            out[k] = rows[0][k]
    flags: dict[str, str] = {}
    for r in rows:
        tag = f"L{r['layer']}" + (f" {r['sae']}" if "sae" in r else "")
        for code, why in r.get("flags", {}).items():
            flags[code if len(rows) == 1 else f"{tag}: {code}"] = why
    out["flags"] = flags
    out["positions"] = rows[0]["positions"]["text"]
    return out


def splice_markdown(rows: list[dict]) -> list[str]:
    """Markdown lines: the splice numbers per row and every flag's sentence."""
    if "ce_clean" not in rows[0]:
        return []
    cols = ["layer"] + (["sae"] if "sae" in rows[0] else []) + [
        "scored", "scored_tokens", "ce_clean", "ce_sae", "ce_zero", "ce_increase", "ce_increase_relative", "kl_sae",
        "loss_recovered", "ce_clean_all", "ce_sae_all", "ce_increase_all", "kl_sae_all", "loss_recovered_all"]
    out = ["Splice (the SAE reconstruction, or zeros, in place of the layer output; CE in nats):", "",
           markdown_table(rows, cols), rows[0]["positions"]["text"], ""]
    for r in rows:
        for code, why in r.get("flags", {}).items():
            out += [f"**FLAG {code}** (layer {r['layer']}): {why}", ""]
    return out


def _special_ids(tokenizer) -> list[int]:
    ids = {tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


def training_curve_figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for layer in sorted({r["layer"] for r in rows if "layer" in r}):
        rs = [r for r in rows if r.get("layer") == layer and "fvu" in r]
        t = [r["tokens"] for r in rs]
        for ax, key in zip(axes, ("fvu", "l0", "dead_fraction")):
            ax.plot(t, [r.get(key, float("nan")) for r in rs], label=f"L{layer}")
            ax.set_xlabel("tokens")
            ax.set_title(key)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    return fig


def run_sae_train(cfg: SAETrainRunConfig, run: Run) -> dict:
    if cfg.dry_run:
        p = plan(cfg)
        print(_plan_text(p))
        run.write_report({"dry_run": True, **p}, "# sae_train dry run\n\n```\n" + _plan_text(p) + "\n```\n")
        return p
    checkpoint = None
    if cfg.resume:
        found = _find_resume(run)
        if found is None:
            raise ConfigError(f"resume=true but no unfinished sae_train checkpoint under {run.dir.parent}")
        run, checkpoint = found
        print(f"resuming {run.dir} at step {checkpoint['step']}")
    world = init_distributed()
    device = world.device(resolve_device(cfg.model.device))
    defaulted = real_model_data_default(cfg.data, cfg.model.name_or_path, "sae_train")  # held-out text too
    model, tokenizer = load_model(cfg.model)
    n_layers = len(find_layers(model))
    layers = sorted({normalize_layer(l, n_layers) for l in cfg.layers})
    if cfg.data.source in ORGANISM_SOURCES and not cfg.filters.drop_special:
        raise ConfigError("filters.drop_special=false with data.source=organism would train on the padding of its "
                          "one-problem rows (pad = EOS); keep filters.drop_special=true")
    heldout = heldout_set(tokenizer, cfg.data)
    if cfg.activations == "live":
        def batches():
            return token_batches(tokenizer, cfg.data)[1]

        source: ActivationSource = LiveSource(model, layers, batches, cfg.filters, _special_ids(tokenizer),
                                              cfg.batches_per_block, seed=cfg.seed, device=device)
    else:
        source = StoreSource(cfg.activations, layers, seed=cfg.seed, expect_model=cfg.model.name_or_path, device=device)
        if source.d_in != hidden_size(model):
            raise DataError(f"store d_model {source.d_in} != model hidden size {hidden_size(model)}")
    _check_shape(cfg, source.d_in)
    saes = train_saes(source, cfg, run, checkpoint, device=device, world=world)
    if world.enabled and cfg.distributed == "layers":  # rank 0 evaluates and saves every rank's SAEs
        parts = world.all_gather_object({l: (s.cfg, {k: v.cpu() for k, v in s.state_dict().items()},
                                             getattr(s, "metadata_extra", {})) for l, s in saes.items()})
        saes = {}
        for part in parts:
            for l, (scfg, state, extra) in part.items():
                saes[l] = SparseAutoencoder.from_config(scfg).to(device)
                saes[l].load_state_dict(state)
                saes[l].metadata_extra = extra
    if not world.is_main:
        world.barrier()
        return {}
    report = evaluate_and_save(cfg, run, model, tokenizer, saes, heldout,
                               getattr(source, "consumed_stats", source.stats), data_source_defaulted=defaulted)
    run.path(CHECKPOINT).unlink(missing_ok=True)
    world.barrier()
    return report


def evaluate_and_save(cfg: SAETrainRunConfig, run: Run, model, tokenizer, saes: dict, heldout: HeldOut, stats,
                      data_source_defaulted: bool = False) -> dict:
    layers = sorted(saes)
    held, keep, held_stats = heldout_activations(model, layers, heldout.input_ids, tokenizer, cfg.filters,
                                                 attention_mask=heldout.attention_mask, return_mask=True)
    per_layer = []
    for layer in layers:
        sae = saes[layer].eval()
        m, fire_rates = evaluate_layer(model, layer, sae, heldout, held[layer], keep, held_stats, cfg.eval_splice)
        m.pop("n_tokens")
        path = Path(cfg.output_dir) / sae_name(cfg, layer)
        sae.cfg.metadata.update({"model_name": cfg.model.name_or_path, "layer": layer,
                                 "hook_name": f"model.layers.{layer}", "d_model": sae.cfg.d_in,
                                 "training": {**getattr(sae, "metadata_extra", {}),
                                              "trainer": asdict(cfg.trainer), "data": asdict(cfg.data),
                                              "run_dir": str(run.dir)}})
        save_sae(sae, path)
        extra = getattr(sae, "metadata_extra", {})
        per_layer.append({"layer": layer, **m, "tokens": extra.get("tokens", 0),
                          "tokens_per_second": extra.get("tokens_per_second", 0.0), "sae_path": str(path),
                          "heldout_tokens": int(held[layer].shape[0])})
        run.save_figure(density_histogram_figure(fire_rates), f"feature_density_L{layer}.png")
    rows = read_metrics(run.dir)
    if rows:
        run.save_figure(training_curve_figure(rows), "training_curve.png")
    report: dict[str, Any] = worst_over(per_layer)
    report.update({"tokens": per_layer[0]["tokens"], "tokens_per_second": min(r["tokens_per_second"] for r in per_layer),
                   "sae_path": per_layer[0]["sae_path"] if len(per_layer) == 1 else [r["sae_path"] for r in per_layer],
                   "layers": per_layer, "token_filter": dict(stats), "heldout_filter": dict(held_stats),
                   "data_source": cfg.data.source, "data_source_defaulted": data_source_defaulted,
                   "config": {"d_sae": cfg.sae.d_sae, "k": cfg.sae.k, "architecture": cfg.sae.architecture,
                              "batch_size": cfg.batch_size, "model": cfg.model.name_or_path}})
    md = ["# SAE training report", "",
          f"model `{cfg.model.name_or_path}`, {cfg.sae.architecture} d_sae {cfg.sae.d_sae} k {cfg.sae.k}, "
          f"{report['tokens']:,} tokens at {report['tokens_per_second']:,.0f} tokens/s of `{cfg.data.source}`"
          + (" (defaulted: the model is not the organism)" if data_source_defaulted else ""), "",
          "Held-out metrics (worst over layers at the top of report.json; one row per SAE here):", "",
          markdown_table(per_layer, ["layer", "variance_explained", "l0", "dead_fraction", "alive_fraction",
                                     "healthy_fraction", "loss_recovered", "ce_increase", "kl_sae", "sae_path"]),
          *splice_markdown(per_layer),
          "Tokens seen and dropped before training: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()), "",
          "![training curve](training_curve.png)", ""]
    md += [f"![feature density L{l}](feature_density_L{l}.png)" for l in layers]
    run.write_report(report, "\n".join(md) + "\n")
    return report


main = hydra_command("sae_train", SAETrainRunConfig, run_sae_train)

if __name__ == "__main__":
    main()
