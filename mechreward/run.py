"""The one run-directory convention every command uses.

A run dir holds `config.yaml` (resolved), `metrics.jsonl` (one JSON object per logged step),
`report.json` (stable keys), `report.md` (for a person) and PNG plots.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from . import io

RUNS_ROOT = Path("runs")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def show_progress() -> bool:
    """Progress bars only for a person: not under CI, not when stderr is not a terminal."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


PROGRESS_SECONDS = 30.0
"""Seconds between plain progress lines when stderr is not a terminal (`MECHREWARD_PROGRESS_SECONDS`)."""


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class LineProgress:
    """Progress for a log file or CI: one plain line (done/total, rate, ETA) at most every `every`
    seconds, and a last one at `close()`; no carriage returns. Same `update`/`close` as tqdm."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, every: float,
                 stream=None):
        self.iterable, self.total, self.desc, self.unit, self.every = iterable, total, desc, unit, every
        self.stream = stream
        self.n = 0
        self.t0 = self.last = time.time()
        self.closed = False

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.n / dt
        out = f"{self.desc}: {self.n:,}"
        if self.total:
            out += f"/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            out += f" {self.unit}"
        out += f", {rate:,.1f} {self.unit}/s, elapsed {_duration(dt)}"
        if self.total and rate > 0 and self.n < self.total:
            out += f", ETA {_duration((self.total - self.n) / rate)}"
        return out

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(), file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed and self.n:
            print(self.line(), file=self.stream or sys.stderr, flush=True)
        self.closed = True


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             lines: bool = True):
    """A tqdm bar on a terminal; elsewhere (a log file, CI) plain `LineProgress` lines every
    `MECHREWARD_PROGRESS_SECONDS` (30) seconds, or nothing with `lines=False`."""
    from tqdm.auto import tqdm

    if show_progress() or not lines:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not show_progress(),
                    dynamic_ncols=True, unit_scale=True)
    every = float(os.environ.get("MECHREWARD_PROGRESS_SECONDS", PROGRESS_SECONDS))
    return LineProgress(iterable, total, desc, unit, every)


class Run:
    """A run directory with its metric log and report writers."""

    def __init__(self, directory: str | os.PathLike, command: str = ""):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self._t0 = time.time()

    @classmethod
    def create(cls, command: str, name: str = "", root: str | os.PathLike = RUNS_ROOT) -> "Run":
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        base = Path(root) / command / (stamp + (f"-{name}" if name else ""))
        directory, i = base, 1
        while directory.exists():
            directory, i = base.with_name(f"{base.name}.{i}"), i + 1
        return cls(directory, command)

    def path(self, name: str) -> Path:
        return self.dir / name

    def save_config(self, cfg: Any) -> None:
        from omegaconf import OmegaConf

        if is_dataclass(cfg):
            cfg = OmegaConf.structured(cfg)
        text = OmegaConf.to_yaml(cfg, resolve=True) if not isinstance(cfg, dict) else OmegaConf.to_yaml(OmegaConf.create(cfg))
        io.write_text(self.path("config.yaml"), text)

    def log(self, step: int, **metrics: Any) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once, so a crash keeps it)."""
        row = {"step": step, "time": round(time.time() - self._t0, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def write_report(self, report: dict, markdown: str | None = None) -> None:
        io.write_json(self.path("report.json"), report)
        if markdown is not None:
            io.write_text(self.path("report.md"), markdown)

    def save_figure(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        target = self.path(name)
        with io.atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return target


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    break
    return rows


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    if is_dataclass(v):
        return asdict(v)
    return v


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4g") -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
