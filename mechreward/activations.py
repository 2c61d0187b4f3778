"""Residual activations for SAE training: live from a model, from an on-disk store, or a tensor.

Every source yields *blocks*: a few hundred thousand tokens mixed across many documents and
shuffled with a generator seeded by (seed, block index). Training consumes a block in order,
batch by batch, so the data position is (block, batch-in-block): a resumed run rebuilds that
one block and continues bitwise where it stopped.
"""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from . import io
from .errors import DataError, MismatchError
from .models import ResidualCapture, find_layers, hidden_size, normalize_layer


@dataclass
class FilterConfig:
    """Which tokens never reach an SAE (each drop is counted)."""

    drop_first_position: bool = True
    """Drop position 0 of every sequence (attention sink with outlier norms in Qwen models)."""
    drop_special: bool = True
    """Drop BOS / pad / EOS tokens."""
    outlier_factor: float = 10.0
    """Drop tokens whose norm exceeds this many times the median norm of their batch; 0 = off."""
    skip_nonfinite: bool = False
    """Drop tokens with NaN/Inf activations and count them, instead of stopping with an error."""


class TokenStats(dict):
    """Counters: seen, kept, first_position, special, outlier, nonfinite, padding."""

    KEYS = ("seen", "kept", "first_position", "special", "outlier", "nonfinite", "padding")

    def __init__(self, *args, **kw):
        super().__init__({k: 0 for k in self.KEYS})
        self.update(*args, **kw)


def _block_generator(seed: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63 - 1))


def keep_mask(input_ids: torch.Tensor, acts: dict[int, torch.Tensor], cfg: FilterConfig,
              special_ids: Sequence[int], stats: TokenStats, batch_index: int = 0,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool (CPU): the tokens that pass every filter, one mask shared by all layers; counts
    each drop in `stats`. `valid` [B, T] (optional): positions outside it are padding, dropped
    (and counted) before any filter."""
    B, T = input_ids.shape
    keep = torch.ones(B, T, dtype=torch.bool)
    stats["seen"] += B * T
    if valid is not None:
        keep &= valid.cpu().bool()
        stats["padding"] = stats.get("padding", 0) + int((~keep).sum())
    if cfg.drop_first_position:
        stats["first_position"] += int(keep[:, 0].sum())
        keep[:, 0] = False
    if cfg.drop_special and special_ids:
        special = torch.isin(input_ids.cpu(), torch.tensor(list(special_ids), dtype=input_ids.dtype)) & keep
        stats["special"] += int(special.sum())
        keep &= ~special
    for layer, h in acts.items():
        finite = torch.isfinite(h).all(dim=-1).cpu()
        bad = ~finite & keep
        if bad.any():
            if not cfg.skip_nonfinite:
                raise DataError(f"non-finite activations at layer {layer} in model batch {batch_index} "
                                f"({int(bad.sum())} tokens); set filters.skip_nonfinite=true to drop them")
            stats["nonfinite"] += int(bad.sum())
            keep &= ~bad
    if cfg.outlier_factor > 0:
        outlier = torch.zeros_like(keep)
        for h in acts.values():
            norms = h.float().norm(dim=-1).cpu()
            if keep.any():
                outlier |= norms > cfg.outlier_factor * norms[keep].median()
        outlier &= keep
        stats["outlier"] += int(outlier.sum())
        keep &= ~outlier
    stats["kept"] += int(keep.sum())
    return keep


def filter_tokens(input_ids: torch.Tensor, acts: dict[int, torch.Tensor], cfg: FilterConfig,
                  special_ids: Sequence[int], stats: TokenStats, batch_index: int = 0) -> dict[int, torch.Tensor]:
    """Keep the tokens that pass every filter (`keep_mask`); one mask shared by all layers. Returns {layer: [n, d]}."""
    B, T = input_ids.shape
    flat = keep_mask(input_ids, acts, cfg, special_ids, stats, batch_index).flatten()
    return {layer: h.reshape(B * T, -1)[flat.to(h.device)] for layer, h in acts.items()}


class ActivationSource(ABC):
    """Base: `blocks(start)` yields (block index, {layer: [n, d] shuffled}) from block `start`."""

    layers: list[int]
    d_in: int
    stats: TokenStats

    @abstractmethod
    def blocks(self, start: int = 0) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        """Blocks from index `start` on; endless sources repeat in new shuffled epochs."""


class LiveSource(ActivationSource):
    """Runs the model over a token stream, capturing layers with early exit after the deepest."""

    def __init__(self, model, layers: Sequence[int], batches: Callable[[], Iterator[torch.Tensor]],
                 filters: FilterConfig, special_ids: Sequence[int], batches_per_block: int = 16,
                 seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        n = len(find_layers(model))
        self.model, self.layers = model, sorted({normalize_layer(l, n) for l in layers})
        self.d_in = hidden_size(model)
        self.batches, self.filters, self.special_ids = batches, filters, list(special_ids)
        self.batches_per_block, self.seed = batches_per_block, seed
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.stats = TokenStats()
        self._capture = ResidualCapture(model, self.layers, early_exit=True)

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        out = self._capture.run(input_ids=input_ids.to(self.device), use_cache=False)
        return {l: h.to(self.dtype) for l, h in out.items()}

    def blocks(self, start: int = 0) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        it = self.batches()
        for _ in itertools.islice(it, start * self.batches_per_block):  # tokenise only, no forward
            pass
        block = start
        while True:
            parts: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
            for i, ids in enumerate(itertools.islice(it, self.batches_per_block)):
                kept = filter_tokens(ids, self._forward(ids), self.filters, self.special_ids, self.stats,
                                     batch_index=block * self.batches_per_block + i)
                for l, h in kept.items():
                    parts[l].append(h)
            if not parts[self.layers[0]]:
                return
            perm = None
            out = {}
            for l in self.layers:
                acts = torch.cat(parts[l])
                if perm is None:
                    perm = torch.randperm(acts.shape[0], generator=_block_generator(self.seed, block)).to(acts.device)
                out[l] = acts[perm]
            yield block, out
            block += 1


class TensorSource(ActivationSource):
    """Activations already in memory: a [N, d] tensor (one layer) or {layer: [N, d]}."""

    def __init__(self, acts: torch.Tensor | dict[int, torch.Tensor], block_tokens: int = 65536, seed: int = 0):
        acts = {0: acts} if isinstance(acts, torch.Tensor) else dict(acts)
        sizes = {v.shape[0] for v in acts.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise DataError(f"in-memory activations must be non-empty with one token count, got sizes {sorted(sizes)}")
        for l, v in acts.items():
            if v.ndim != 2 or not torch.isfinite(v).all():
                raise DataError(f"in-memory activations for layer {l} must be a finite [N, d] tensor, got shape {tuple(v.shape)}")
        self.acts, self.layers = acts, sorted(acts)
        self.n = sizes.pop()
        self.d_in = acts[self.layers[0]].shape[1]
        self.block_tokens, self.seed = min(block_tokens, self.n), seed
        self.stats = TokenStats(seen=self.n, kept=self.n)

    def blocks(self, start: int = 0):
        per_epoch = self.n // self.block_tokens
        block = start
        while True:
            epoch, i = divmod(block, per_epoch)
            perm = torch.randperm(self.n, generator=_block_generator(self.seed, -1 - epoch))
            idx = perm[i * self.block_tokens:(i + 1) * self.block_tokens]
            yield block, {l: v[idx.to(v.device)] for l, v in self.acts.items()}
            block += 1


# --------------------------------------------------------------------------- on-disk store

MANIFEST = "manifest.json"
STORE_FORMAT = "mechreward-activations"


@dataclass
class StoreManifest:
    """What an activation store holds; written atomically after every shard."""

    model: str
    layers: list[int]
    d_model: int
    dtype: str
    context_length: int
    batches_per_shard: int
    source: dict
    filters: dict
    shards: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    complete: bool = False
    format: str = STORE_FORMAT
    version: int = 1

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def save(self, directory: Path) -> None:
        d = asdict(self)
        d["tokens"] = self.tokens
        io.write_json(Path(directory) / MANIFEST, d)

    @classmethod
    def load(cls, directory: str | Path) -> "StoreManifest":
        path = Path(directory) / MANIFEST
        if not path.exists():
            raise DataError(f"no activation store at {str(directory)!r} (missing {MANIFEST})")
        d = json.loads(path.read_text())
        if d.get("format") != STORE_FORMAT:
            raise DataError(f"{str(path)!r} is not a mechreward activation store (format {d.get('format')!r})")
        d.pop("tokens", None)
        return cls(**d)


def harvest_to_store(source: LiveSource, batches_per_shard: int, directory: str | Path, total_tokens: int,
                     manifest: StoreManifest, token_ids: bool = False, progress=None, world=None) -> StoreManifest:
    """Write `source`'s unshuffled activations as safetensors shards; resumes a partial store.

    Each shard holds exactly `batches_per_shard` model batches, so the data position of a
    partial store is derivable from its manifest: a rerun skips what is written and neither
    duplicates nor loses a shard.

    Under several ranks (`world`, a `mechreward.distributed.World`) rank r writes shards
    n + r, n + r + W, ... (n = shards already listed) from its own model batches; after each
    round the ranks exchange their shard entries and rank 0 writes the one manifest, which only
    ever lists a gap-free prefix of shards. The store is the one a single process writes.
    """
    from .distributed import World

    world = world or World()
    rank, ranks = world.rank, world.world_size
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    world.barrier()  # every rank sees the same manifest
    if (directory / MANIFEST).exists():
        old = StoreManifest.load(directory)
        for key in ("model", "layers", "d_model", "dtype", "context_length", "batches_per_shard", "source", "filters"):
            if getattr(old, key) != getattr(manifest, key):
                raise MismatchError(f"store {str(directory)!r} was written with {key}={getattr(old, key)!r}, "
                                    f"this run asks for {getattr(manifest, key)!r}")
        manifest = old
    source.stats = TokenStats(manifest.stats)
    dtype = getattr(torch, manifest.dtype)
    it = source.batches()
    shard = len(manifest.shards) + rank  # this rank's next shard: model batches [shard·bps, (shard+1)·bps)
    for _ in itertools.islice(it, shard * batches_per_shard):
        pass
    while manifest.tokens < total_tokens:
        before = dict(source.stats)
        parts: dict[int, list[torch.Tensor]] = {l: [] for l in source.layers}
        for i, ids in enumerate(itertools.islice(it, batches_per_shard)):
            kept = filter_tokens(ids, source._forward(ids), source.filters, source.special_ids, source.stats,
                                 batch_index=shard * batches_per_shard + i)
            for l, h in kept.items():
                parts[l].append(h)
        entry = None
        if parts[source.layers[0]]:
            tensors = {f"layer_{l}": torch.cat(p).to(dtype) for l, p in parts.items()}
            name = f"shard_{shard:05d}.safetensors"
            io.save_safetensors(directory / name, tensors)
            entry = {"file": name, "tokens": int(tensors[f"layer_{source.layers[0]}"].shape[0])}
        delta = {k: v - before.get(k, 0) for k, v in source.stats.items()}
        round_ = world.all_gather_object((entry, delta))
        used = 0
        for e, d in round_:  # rank order = shard order, and stop where one process would have stopped
            if e is None or manifest.tokens >= total_tokens:
                break
            manifest.shards.append(e)
            manifest.stats = {k: manifest.stats.get(k, 0) + d.get(k, 0) for k in dict.fromkeys([*manifest.stats, *d])}
            used += 1
            if progress is not None:
                progress.update(e["tokens"])
        if entry is not None and rank >= used:  # written past the end: not part of the store
            (directory / entry["file"]).unlink(missing_ok=True)
        if world.is_main:
            manifest.save(directory)
        if used < ranks:
            break  # corpus exhausted or enough tokens
        for _ in itertools.islice(it, (ranks - 1) * batches_per_shard):  # the other ranks' batches
            pass
        shard += ranks
    manifest.complete = True
    if world.is_main:
        manifest.save(directory)
    world.barrier()
    return manifest


class StoreSource(ActivationSource):
    """Reads a store in shuffled order: each epoch permutes the shards, blocks of shards are mixed."""

    def __init__(self, directory: str | Path, layers: Sequence[int], shards_per_block: int = 4, seed: int = 0,
                 expect_model: str | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.dir = Path(directory)
        self.manifest = m = StoreManifest.load(self.dir)
        if not m.shards:
            raise DataError(f"activation store {str(self.dir)!r} has no shards")
        if expect_model is not None and m.model != expect_model:
            raise MismatchError(f"activation store {str(self.dir)!r} holds model {m.model!r}, not {expect_model!r}")
        missing = [l for l in layers if l not in m.layers]
        if missing:
            raise MismatchError(f"activation store {str(self.dir)!r} holds layers {m.layers}, not {missing}")
        self.layers, self.d_in = sorted(layers), m.d_model
        self.shards_per_block, self.seed = max(1, min(shards_per_block, len(m.shards))), seed
        self.device, self.dtype = torch.device(device), dtype
        self.stats = TokenStats(m.stats)

    def blocks(self, start: int = 0):
        from safetensors.torch import load_file

        n = len(self.manifest.shards)
        per_epoch = -(-n // self.shards_per_block)
        block = start
        while True:
            epoch, i = divmod(block, per_epoch)
            order = torch.randperm(n, generator=_block_generator(self.seed, -1 - epoch)).tolist()
            group = order[i * self.shards_per_block:(i + 1) * self.shards_per_block]
            parts: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
            for s in group:
                t = load_file(self.dir / self.manifest.shards[s]["file"])
                for l in self.layers:
                    parts[l].append(t[f"layer_{l}"])
            out = {l: torch.cat(p) for l, p in parts.items()}
            perm = torch.randperm(out[self.layers[0]].shape[0], generator=_block_generator(self.seed, block))
            yield block, {l: v[perm].to(self.device, self.dtype) for l, v in out.items()}
            block += 1


def _stamped_blocks(source: ActivationSource, first_block: int):
    """(block, acts, stats before it, stats after it) for each block of `source`."""
    it = source.blocks(first_block)
    while True:
        before = TokenStats(source.stats)
        try:
            block, acts = next(it)
        except StopIteration:
            return
        yield block, acts, before, TokenStats(source.stats)


class _Prefetcher:
    """Runs a block iterator one block ahead in a background thread.

    The model forward of the next block overlaps the SAE steps on the current one (torch
    releases the GIL inside its ops). On CUDA the producer enqueues its work on its own stream
    and the consumer waits on that stream before touching a block. Blocks are computed exactly
    as without prefetching, so results are identical; an error in the producer is re-raised in
    the consumer.
    """

    _END = object()

    def __init__(self, blocks: Iterator, device: torch.device | None = None):
        import queue
        import threading

        self._q: "queue.Queue" = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self._thread = threading.Thread(target=self._produce, args=(blocks,), daemon=True)
        self._thread.start()

    def _produce(self, blocks: Iterator) -> None:
        import contextlib

        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        try:
            with ctx:
                for item in blocks:
                    event = None
                    if self._stream is not None:
                        event = torch.cuda.Event()
                        event.record(self._stream)
                    while not self._stop.is_set():
                        try:
                            self._q.put((item, event), timeout=0.1)
                            break
                        except Exception:  # queue.Full: the consumer is still busy
                            continue
                    if self._stop.is_set():
                        return
            self._q.put((self._END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._q.put((e, None))

    def __iter__(self):
        try:
            while True:
                item, event = self._q.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if event is not None:
                    torch.cuda.current_stream().wait_event(event)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer and wait for it: no forward of it runs after this returns."""
        import queue

        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)  # unblock a producer waiting to put
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


def sae_batches(source: ActivationSource, batch_size: int, start: tuple[int, int] = (0, 0),
                prefetch: bool = False) -> Iterator[tuple[tuple[int, int], dict[int, torch.Tensor]]]:
    """Training batches {layer: [batch_size, d]} with the data position *after* each batch.

    Tokens at the end of a block that do not fill a batch are dropped (counted in `stats`).
    While a block is consumed, `source.checkpoint_stats` holds the token counts before it (what
    a checkpoint saves: a resumed run recomputes this block) and `source.consumed_stats` the
    counts through it (what a report shows). With `prefetch`, the next block is computed in a
    background thread while this one trains.
    """
    first_block, offset = start
    blocks = _stamped_blocks(source, first_block)
    prefetcher = _Prefetcher(blocks, getattr(source, "device", None)) if prefetch else None
    remainder = source.stats.get("remainder", 0)
    try:
        for block, acts, before, after in (iter(prefetcher) if prefetcher is not None else blocks):
            n = acts[source.layers[0]].shape[0] // batch_size
            before["remainder"] = remainder
            remainder += acts[source.layers[0]].shape[0] - n * batch_size
            after["remainder"] = remainder
            source.checkpoint_stats, source.consumed_stats = before, after
            for j in range(offset if block == first_block else 0, n):
                yield (block, j + 1), {l: v[j * batch_size:(j + 1) * batch_size] for l, v in acts.items()}
    finally:
        if prefetcher is not None:
            prefetcher.close()  # closing this generator stops the producer before the caller goes on
