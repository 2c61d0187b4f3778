"""One GRPO step of `MechGRPOTrainer` on a real model, broken into its parts (issue 22).

The step is composed by hand as `bench_grpo_step.py` does (generate + score, loss forward, backward,
optimizer step) on G2's settings for SmolLM2-135M-Instruct on `task=lookup` (LoRA r=32/α=64 on all
linear layers, 8 questions × 8 rollouts, 24 new tokens, T=0.5, chat template), with HF `generate`
or TRL's vLLM colocate mode (`--vllm`, run with .venv-vllm/bin/python). Parts timed inside the step:

- `sync`: vLLM weight sync (merged LoRA → vLLM reload), every step as in training;
- `generate`: TRL's `_generate` (HF `generate` or vLLM);
- `old_logprob`: TRL's no-grad old-log-prob forward (run under vLLM for its importance-sampling
  correction, and where the mech reward is captured);
- `rewards`: the reward functions (outcome, + mech with `--pack`);
- `loss_fwd`, `backward`, `optimizer`;
- `eval`: G2's held-out evaluation (`--n-eval` questions × 2 samples + greedy, 24 tokens), once.

    python benchmarks/profile_grpo_step.py [--steps 2] [--warmup 1] [--pack <G1 feature_pack.json>] [--alone]
    .venv-vllm/bin/python benchmarks/profile_grpo_step.py --vllm [...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CI", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--gens", type=int, default=8)
    p.add_argument("--max-completion", type=int, default=24)
    p.add_argument("--n-eval", type=int, default=32)
    p.add_argument("--vllm", action="store_true")
    p.add_argument("--pack", default=None, help="a G1 feature pack: add its SAE reward (R1) and time it")
    p.add_argument("--alone", action="store_true",
                   help="also time the step's unavoidable parts alone, outside the trainer: HF generate of the same "
                        "prompts, a forward/backward of the same batch, the optimizer step")
    a = p.parse_args()

    from datasets import Dataset
    from peft import LoraConfig

    from mechreward.g2 import evaluate_heldout
    from mechreward.gates.g2 import G2Protocol
    from mechreward.grpo import MechGRPOTrainer, grpo_config
    from mechreward.models import load_model
    from mechreward.prompts import PromptFormat
    from mechreward.reward import OutcomeReward, SAEFeatureReward
    from mechreward.tasks import TaskConfig, load_task

    t_load = time.perf_counter()
    model, tok = load_model(a.model, device="cpu")
    task = load_task(TaskConfig(name="lookup", split="train", n=a.questions * (a.steps + a.warmup)))
    eval_task = load_task(TaskConfig(name="lookup", split="eval", n=a.n_eval))
    fmt = PromptFormat(chat_template=True).resolve(tok)
    ds = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in task.questions])
    funcs = [OutcomeReward(task)]
    if a.pack:
        funcs.append(SAEFeatureReward.from_pack(a.pack))
    bs = a.questions * a.gens
    tmp = tempfile.mkdtemp(prefix="profile-grpo-")
    args = grpo_config(dict(output_dir=tmp, per_device_train_batch_size=bs, num_generations=a.gens, max_steps=100,
                            learning_rate=1e-4, beta=0.0, max_completion_length=a.max_completion, temperature=0.5,
                            report_to="none", save_strategy="no", logging_steps=1000, use_cpu=True, bf16=False,
                            seed=0, disable_dropout=True, gradient_checkpointing=False, use_vllm=a.vllm,
                            vllm_mode="colocate"))
    trainer = MechGRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tok,
                              prompt_format=fmt, peft_config=LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                                                        target_modules="all-linear",
                                                                        task_type="CAUSAL_LM"))
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1
    setup_s = time.perf_counter() - t_load

    parts: dict[str, list[float]] = defaultdict(list)
    cur: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cur[name] += time.perf_counter() - t
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("rewards", trainer._calculate_rewards)
    orig_logps = trainer._get_per_token_logps_and_entropies

    def logps(*args, **kwargs):
        name = "old_logprob" if not torch.is_grad_enabled() else "loss_fwd_logps"
        return timed(name, orig_logps)(*args, **kwargs)

    trainer._get_per_token_logps_and_entropies = logps
    if a.vllm:
        vg = trainer.vllm_generation
        vg.sync_weights = timed("sync", vg.sync_weights)

    for r in range(a.warmup + a.steps):
        cur.clear()
        rows = [ds[(r * a.questions) + i // a.gens] for i in range(bs)]
        trainer._last_loaded_step = -1  # sync every step, as training does after each optimizer step
        t0 = time.perf_counter()
        inputs = trainer._generate_and_score_completions(rows)
        t1 = time.perf_counter()
        loss = trainer._compute_loss(trainer.model, inputs)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        t4 = time.perf_counter()
        row = dict(cur, generate_and_score=t1 - t0, loss_fwd=t2 - t1, backward=t3 - t2, optimizer=t4 - t3,
                   step=t4 - t0)
        print(f"step {r}{' (warm-up)' if r < a.warmup else ''}: " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()),
              flush=True)
        if r >= a.warmup:
            for k, v in row.items():
                parts[k].append(v)
    alone = time_parts_alone(trainer, tok, inputs, a) if a.alone else None
    t = time.perf_counter()
    ev = evaluate_heldout(trainer.model, tok, eval_task.questions, eval_task,
                          G2Protocol(n_eval=a.n_eval, eval_samples=2, temperature=0.5, eval_max_new_tokens=24,
                                     eval_batch_size=256), prompt_format=fmt)
    eval_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nmodel {a.model}, {'vLLM colocate' if a.vllm else 'HF generate'}, {bs} completions "
          f"({a.questions} x {a.gens}) of <= {a.max_completion} tokens, LoRA r=32, mech reward: {bool(a.pack)}, "
          f"threads {torch.get_num_threads()}; setup (load + trainer{' + vLLM engine' if a.vllm else ''}) "
          f"{setup_s:.1f}s; peak RSS {rss:.2f} GiB")
    order = ["step", "generate_and_score", "sync", "generate", "old_logprob", "rewards", "loss_fwd", "backward",
             "optimizer"]
    for k in order + sorted(set(parts) - set(order)):
        if k in parts:
            print(f"  {k:20s} median {statistics.median(parts[k]):7.2f}s  ({', '.join(f'{v:.2f}' for v in parts[k])})")
    print(f"  {'eval':20s} {eval_s:7.2f}s  ({a.n_eval} questions x 2 samples + greedy; sampled accuracy "
          f"{float(ev['sampled'].mean()):.3f})")
    if "rewards" in parts and a.pack:
        share = statistics.median(parts["rewards"]) / statistics.median(parts["step"])
        print(f"  rewards (outcome + mech capture and SAE score) share of the step: {100 * share:.1f}%")
    if alone:
        alone, one_pass = alone
        total = sum(alone.values())
        print("  alone (outside the trainer, same batch, each distinct prompt once): "
              + ", ".join(f"{k} {v:.2f}s" for k, v in alone.items())
              + f"; sum {total:.2f}s; step / sum = {statistics.median(parts['step']) / total:.2f}")
        print("  alone, one pass per row (reference): " + ", ".join(f"{k} {v:.2f}s" for k, v in one_pass.items()))


def time_parts_alone(trainer, tok, inputs, a) -> dict[str, float]:
    """The step's unavoidable parts timed on their own, on the last step's batch, each in its least-compute form:
    HF `generate` of its prompts (same sampling and length) with each distinct prompt prefilled once, one forward and
    backward through the LoRA policy of each distinct prompt once and every completion on its cache (token
    log-probs of the completion, summed), and the optimizer step. Also, for reference, the one-pass forms: plain
    `generate` and a forward/backward of every row's prompt + completion (`*_one_pass`, not in the sum)."""
    from mechreward.prefix import cache_kwarg, generate_shared, prefill_shared, prompt_groups

    model = trainer.model
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    kw = dict(do_sample=True, temperature=0.5, max_new_tokens=a.max_completion, pad_token_id=tok.pad_token_id)
    out, ref = {}, {}

    def completion_loss(logits):
        logp = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None])[..., 0]
        return -(logp * completion_mask).sum() / completion_mask.sum()

    for shared in (True, False):
        dest = out if shared else ref
        sfx = "" if shared else "_one_pass"
        t = time.perf_counter()
        with torch.no_grad():
            if shared:
                generate_shared(model, prompt_ids, prompt_mask, **kw)
            else:
                model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kw)
        dest["generate" + sfx] = time.perf_counter() - t
        t = time.perf_counter()
        if shared:
            cache = prefill_shared(model, prompt_ids, prompt_mask, prompt_groups(prompt_ids, prompt_mask))
            loss = completion_loss(model(input_ids=ids[:, P - 1:-1], attention_mask=mask[:, :-1],
                                         **{cache_kwarg(model): cache}).logits)
        else:
            loss = completion_loss(model(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1])
        dest["forward" + sfx] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        dest["backward" + sfx] = time.perf_counter() - t
        if shared:
            t = time.perf_counter()
            trainer.optimizer.step()
            out["optimizer"] = time.perf_counter() - t
        trainer.optimizer.zero_grad()
    return out, ref


if __name__ == "__main__":
    main()
