"""Past one GPU: torchrun data parallelism for SAE training and rank-sharded harvesting.

    torchrun --nproc-per-node 8 -m mechreward.harvest ... hydra.run.dir=runs/harvest/h1
    torchrun --nproc-per-node 8 -m mechreward.sae_train activations=<store> distributed=data \
        hydra.run.dir=runs/sae_train/s1

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and returns a `World`;
without torchrun it is a world of one and nothing here does anything. The backend is NCCL on
GPUs and gloo on CPU (which the tests use with 2 processes).

SAE training (`SAETrainer(..., world=...)`) is plain data parallelism with the exact loss of
one process: every rank reads the same global batch and trains on its contiguous slice, the
FVU denominator (total variance of the global batch) comes from one small all-reduce, gradients
are summed across ranks, and the dead-latent counters see the union of fired latents. So N
ranks with global batch B follow the trajectory of one process with batch B (up to float
summation order). With several layers, `distributed=layers` trains a different SAE on each
rank instead (no communication in the step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks."""

    rank: int = 0
    """Global rank (0 writes the run's outputs)."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (its GPU index)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device | str) -> torch.device:
        """The requested device, with CUDA pinned to this rank's GPU."""
        d = torch.device(requested)
        return torch.device("cuda", self.local_rank) if d.type == "cuda" and self.enabled else d

    # ------------------------------------------------------------------ collectives (no-ops for one rank)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def local_slice(self, x: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch x [B, ...] (B divisible by world_size)."""
        if not self.enabled:
            return x
        b, r = divmod(x.shape[0], self.world_size)
        if r:
            raise ConfigError(f"global batch of {x.shape[0]} tokens does not split over {self.world_size} ranks")
        return x[self.rank * b:(self.rank + 1) * b]


def init(backend: str | None = None) -> World:
    """Join the process group torchrun set up (idempotent); a world of one without torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), local)


def shutdown() -> None:
    """Leave the process group cleanly (a no-op without one).

    Every rank waits for the others, then tears gloo/NCCL down before the interpreter exits;
    a rank that exits while its peers still talk can abort in the backend's threads.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DataParallel:
    """The collectives one data-parallel SAE step needs (used by `SAETrainer`)."""

    def __init__(self, world: World):
        if not world.enabled:
            raise ConfigError("DataParallel needs more than one rank (run under torchrun)")
        self.world = world

    def gather_batch(self, x: Tensor) -> Tensor:
        """The global batch from every rank's slice (rank order): for the first-batch init."""
        parts = [torch.empty_like(x) for _ in range(self.world.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def variance_share(self, xs: Tensor) -> Tensor:
        """TV_local / TV_global for this rank's scaled slice xs [b, d].

        The model's FVU divides by its own slice's total variance Σ‖x − mean‖²; multiplying by
        this share turns it into this rank's part of the global-batch FVU, so the sum over
        ranks of the losses (and of their gradients) is exactly the one-process loss.
        """
        x64 = xs.detach().double()
        local = (x64 - x64.mean(0)).pow(2).sum()
        stats = torch.cat([x64.sum(0), x64.pow(2).sum().view(1),
                           torch.tensor([float(xs.shape[0])], dtype=torch.float64, device=xs.device)])
        dist.all_reduce(stats)
        n = stats[-1]
        total = stats[-2] - stats[:-2].pow(2).sum() / n
        return (local / total.clamp_min(torch.finfo(torch.float64).tiny)).to(xs.dtype)

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)

    def any(self, mask: Tensor) -> Tensor:
        """Elementwise OR across ranks of a bool tensor."""
        m = mask.to(torch.uint8)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.bool()

    def sum(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t


def layers_for_rank(layers: list[int], world: World) -> list[int]:
    """`distributed=layers`: rank r trains layers[r::world_size] (every rank needs at least one)."""
    if len(layers) < world.world_size:
        raise ConfigError(f"distributed=layers needs at least one layer per rank: {len(layers)} layers "
                          f"{layers} over {world.world_size} ranks")
    return sorted(layers)[world.rank::world.world_size]


__all__ = ["World", "init", "DataParallel", "layers_for_rank"]
