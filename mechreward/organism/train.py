"""Rebuild the built-in organism from scratch: `python -m mechreward.organism.train`.

A character-level tokenizer and a tiny Qwen3 trained on the arithmetic train split (loss on
the worked solution + EOS only). Fixed seeds and a fixed thread count make the rebuild
deterministic on CPU. Files are written atomically into `output_dir` (default: the packaged
weights directory). Usage:

    python -m mechreward.organism.train [--output-dir DIR] [--steps N] [--threads T]

`--organism planted` builds the planted organism instead (`model=organism_planted`, the positive
control: `mechreward.tasks.planted`, a solving mode drawn per training sample) into its own
packaged directory, with its own defaults (`PLANTED_DEFAULTS`).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import io
from ..errors import ConfigError
from ..tasks.arithmetic import iter_problems, prompt_text, solution_text
from . import ORGANISM_DIR, ORGANISM_PLANTED_DIR

EOS = "<|endoftext|>"
UNK = "<unk>"
# Every printable ASCII character plus newline, one token each (digits first for readability).
CHARS = list("0123456789") + [c for c in map(chr, range(32, 127)) if not c.isdigit()] + ["\n"]


@dataclass
class TrainConfig:
    """How the organism is built. The defaults produce the shipped weights."""

    organism: str = "arithmetic"
    """`arithmetic` (the built-in organism) or `planted` (the planted-mode positive control)."""
    output_dir: str = ""
    """Where config.json, model.safetensors and the tokenizer files are written ("" = the packaged
    directory of `organism`)."""
    seed: int = 0
    """Seeds model init and the training-data stream."""
    threads: int = 1
    """torch intra-op threads (fixed, for reproducibility; one thread also degrades least on a busy CPU)."""
    steps: int = 1400
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 100
    """Warmup steps."""
    weight_decay: float = 0.01
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_positions: int = 256
    log_every: int = 100
    """Print the training loss every this many steps."""
    eval_every: int = 700
    """Print greedy accuracy on 100 held-out questions every this many steps (0 = never)."""


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with eos = pad = `<|endoftext|>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, UNK: 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char per token
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS, UNK])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False, model_max_length=256)
    return fast


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id, rms_norm_eps=1e-6,
        attention_dropout=0.0, use_cache=True,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.bos_token_id = None
    return model


ORGANISMS = ("arithmetic", "planted")
PLANTED_DEFAULTS = {"steps": 1500, "eval_every": 500}
"""Settings of the planted organism that differ from `TrainConfig`'s defaults (used when left at them)."""


def text_stream(organism: str, seed: int):
    """Endless (prompt, worked solution) training pairs of an organism."""
    if organism == "arithmetic":
        for p in iter_problems("train", seed):
            yield prompt_text(p), solution_text(p)
    elif organism == "planted":
        from ..tasks import planted

        for p, mode in planted.iter_training_texts("train", seed):
            yield planted.prompt_text(p), planted.solution_text(p, mode)
    else:
        raise ConfigError(f"--organism {organism!r}: expected one of {ORGANISMS}")


def make_batch(gen, tokenizer, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] right-padded with eos; labels with -100 on prompt and padding.

    `gen` yields problems of the arithmetic task or (prompt, solution) string pairs."""
    rows, labels = [], []
    for _ in range(batch_size):
        p = next(gen)
        prompt_s, sol_s = p if isinstance(p, tuple) else (prompt_text(p), solution_text(p))
        prompt = tokenizer(prompt_s, add_special_tokens=False)["input_ids"]
        comp = tokenizer(sol_s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + comp)
        labels.append([-100] * len(prompt) + comp)
    width = max(len(r) for r in rows)
    ids = torch.full((batch_size, width), tokenizer.eos_token_id, dtype=torch.long)
    lab = torch.full((batch_size, width), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(l)] = torch.tensor(l)
    return ids, lab


def greedy_accuracy(model, tokenizer, n: int = 100, organism: str = "arithmetic") -> float:
    from ..generate import sample
    from ..tasks.arithmetic import ArithmeticTask

    if organism == "planted":
        return planted_sampled_summary(model, tokenizer, n)["accuracy"]
    task = ArithmeticTask("eval", n=n, seed=12345)
    out = sample(model, tokenizer, [q.prompt for q in task.questions], greedy=True, batch_size=100)
    return sum(task.verify(s.text, task.questions[s.prompt_index].answer) for s in out) / len(out)


def planted_sampled_summary(model, tokenizer, n: int = 100, samples: int = 4, seed: int = 0) -> dict:
    """Sampled (T = 1) accuracy, share of mixed questions and ground-truth mode counts of the planted
    organism on `n` held-out questions (question seed 12345, not the evaluation seeds)."""
    from collections import Counter

    from ..generate import sample
    from ..tasks.planted import PlantedTask

    task = PlantedTask("eval", n=n, seed=12345)
    out = sample(model, tokenizer, [q.prompt for q in task.questions], n=samples, temperature=1.0,
                 batch_size=256, seed=seed, max_new_tokens=64)
    ok: dict[int, list[bool]] = {}
    modes = Counter()
    for s in out:
        q = task.questions[s.prompt_index]
        ok.setdefault(s.prompt_index, []).append(task.verify(s.text, q.answer))
        modes[task.record(s.text, q)["mode"]] += 1
    mixed = sum(0 < sum(v) < len(v) for v in ok.values()) / len(ok)
    return {"accuracy": sum(sum(v) for v in ok.values()) / len(out), "mixed_questions": mixed,
            "modes": dict(modes)}


def train(cfg: TrainConfig) -> dict:
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    prev = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1])


def _train(cfg: TrainConfig) -> dict:
    if cfg.organism not in ORGANISMS:
        raise ConfigError(f"--organism {cfg.organism!r}: expected one of {ORGANISMS}")
    output_dir = cfg.output_dir or str(ORGANISM_PLANTED_DIR if cfg.organism == "planted" else ORGANISM_DIR)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer = build_tokenizer()
    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"organism: {n_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, d_model {cfg.hidden_size}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = text_stream(cfg.organism, cfg.seed)
    model.train()
    t0, running = time.time(), 0.0
    history = []
    for step in range(cfg.steps):
        ids, lab = make_batch(gen, tokenizer, cfg.batch_size)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            print(f"step {step + 1}/{cfg.steps} loss {running / cfg.log_every:.4f} "
                  f"lr {lr_at(step):.2e} {time.time() - t0:.0f}s", flush=True)
            history.append({"step": step + 1, "loss": running / cfg.log_every})
            running = 0.0
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            if cfg.organism == "planted":
                summ = planted_sampled_summary(model, tokenizer)
                print(f"step {step + 1}: sampled eval accuracy {summ['accuracy']:.3f}, mixed questions "
                      f"{summ['mixed_questions']:.2f}, modes {summ['modes']}", flush=True)
            else:
                acc = greedy_accuracy(model, tokenizer)
                print(f"step {step + 1}: greedy eval accuracy {acc:.3f}", flush=True)
            model.train()
    train_seconds = time.time() - t0
    model.eval()
    save(model, tokenizer, output_dir)
    print(f"organism written to {output_dir} in {train_seconds:.0f}s of training")
    return {"n_params": n_params, "train_seconds": train_seconds, "history": history, "config": asdict(cfg)}


def save(model, tokenizer, output_dir: str | os.PathLike) -> None:
    """save_pretrained into a scratch dir beside the target, then copy each file atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".organism-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            if f.is_file():
                io.write_bytes(out / f.name, f.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m mechreward.organism.train", description=__doc__.split("\n")[0])
    for name, value in asdict(defaults).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(ap.parse_args(argv))
    if args["organism"] == "planted":
        given = set(a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                    if a.startswith("--"))
        args.update({k: v for k, v in PLANTED_DEFAULTS.items() if k not in given})
    train(TrainConfig(**args))


if __name__ == "__main__":
    main()
