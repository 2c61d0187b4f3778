"""`python -m mechreward.harvest`: write residual activations to an on-disk store.

The store is a directory of safetensors shards (`layer_<L>` tensors [tokens, d_model]) and a
`manifest.json` naming model, layers, dtype, token count and source. Rerunning with the same
`store_dir` resumes: shards already written are skipped, none is duplicated or lost.
`python -m mechreward.sae_train activations=<store_dir>` trains from it in shuffled order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .activations import FilterConfig, LiveSource, StoreManifest, harvest_to_store
from .cli import hydra_command
from .corpora import real_model_data_default
from .data import DataConfig, token_batches
from .distributed import init as init_distributed
from .errors import ConfigError
from .models import ModelConfig, find_layers, hidden_size, load_model, normalize_layer, resolve_device
from .run import Run, progress


@dataclass
class HarvestConfig:
    """Config of `python -m mechreward.harvest`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    layers: list[int] = field(default_factory=lambda: [2])
    """Decoder layers whose outputs are stored (one forward, early exit after the deepest)."""
    tokens: int = 500_000
    """Stop once the store holds at least this many (kept) tokens."""
    batches_per_shard: int = 32
    """Model batches per shard file."""
    dtype: str = "float32"
    """Storage dtype: float32, bfloat16 or float16."""
    store_dir: str | None = None
    """Where the store goes; default `<run dir>/store`. An existing store there is resumed."""
    seed: int = 0


def run_harvest(cfg: HarvestConfig, run: Run) -> dict:
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={cfg.dtype!r}; expected float32, bfloat16 or float16")
    if cfg.tokens <= 0 or cfg.batches_per_shard <= 0:
        raise ConfigError(f"tokens ({cfg.tokens}) and batches_per_shard ({cfg.batches_per_shard}) must be positive")
    world = init_distributed()  # under torchrun each rank writes its own shards of one store
    defaulted = real_model_data_default(cfg.data, cfg.model.name_or_path, "harvest")
    model, tokenizer = load_model(cfg.model)
    n = len(find_layers(model))
    layers = sorted({normalize_layer(l, n) for l in cfg.layers})
    token_batches(tokenizer, cfg.data)  # fail early on an empty corpus
    special = sorted({i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None})
    source = LiveSource(model, layers, lambda: token_batches(tokenizer, cfg.data)[1], cfg.filters, special,
                        seed=cfg.seed, device=world.device(resolve_device(cfg.model.device)))
    store = Path(cfg.store_dir) if cfg.store_dir else run.dir / "store"
    manifest = StoreManifest(model=cfg.model.name_or_path, layers=layers, d_model=hidden_size(model), dtype=cfg.dtype,
                             context_length=cfg.data.context_length, batches_per_shard=cfg.batches_per_shard,
                             source=asdict(cfg.data), filters=asdict(cfg.filters))
    bar = progress(total=cfg.tokens, desc="harvest", unit="tok")
    manifest = harvest_to_store(source, cfg.batches_per_shard, store, cfg.tokens, manifest, progress=bar, world=world)
    bar.close()
    if not world.is_main:
        return {}
    report = {"store_dir": str(store), "model": manifest.model, "layers": layers, "tokens": manifest.tokens,
              "shards": len(manifest.shards), "dtype": cfg.dtype, "token_filter": manifest.stats,
              "complete": manifest.complete, "data_source": cfg.data.source, "data_source_defaulted": defaulted}
    run.write_report(report, f"# Activation store\n\n{manifest.tokens:,} tokens of layers {layers} from "
                             f"`{manifest.model}` in {len(manifest.shards)} shards at `{store}`.\n\n"
                             "Token filter: " + ", ".join(f"{k} {v:,}" for k, v in manifest.stats.items()) + "\n")
    print(f"store: {store} ({manifest.tokens:,} tokens)")
    return report


main = hydra_command("harvest", HarvestConfig, run_harvest)

if __name__ == "__main__":
    main()
