"""A GRPO step with the mechanistic (SAE pack) reward vs the same step with the outcome reward only.

Two set-ups, each measured for both rewards with rounds interleaved (background load hits both alike):

- `logprob`: TRL runs its no-grad old-log-prob pass (here forced with `num_iterations=2`, as vLLM
  always does); the SAE features are captured inside it: the overhead is the hooks + SAE encode.
- `fallback`: TRL skips that pass (`num_iterations=1`, `steps_per_generation=1`, no vLLM); the mech
  reward costs one extra no-grad forward with early exit at the SAE layer.
- `vllm`: generation by TRL's vLLM colocate mode (`use_vllm=True`, with mechreward's CPU weight
  sync on vLLM-CPU, run every step as in training); TRL runs the old-log-prob pass (importance-
  sampling correction) and the features are captured in it. One vLLM engine serves both trainers
  (each step syncs the weights of the trainer being timed). Needs the Python that has vLLM.

A "step" here is generation + scoring (+ capture) + loss/backward + optimizer step on one batch of
`--batch` completions (`--gens` per question), seeded per round so both rewards see the same
completions; the two trainers alternate order each round. Reported: median and mean ms per step
and the mech / outcome overhead. In the `logprob` set-up each step also runs the old-log-prob pass
(in real training, with num_iterations=2, every other optimizer step would reuse the batch).

    python benchmarks/bench_grpo_step.py [--steps 8] [--rounds 3] [--batch 16] [--gens 4]
                                         [--max-completion 64] [--threads N] [--device cpu|cuda]
                                         [--setups logprob,fallback,vllm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CI", "true")

import torch  # noqa: E402


def organism_pack(tmp: Path, device):
    """The organism's SAE and a pack of 20 of its features (selection does not matter for timing)."""
    from mechreward.models import load_model
    from mechreward.probe import FeaturePack
    from mechreward.rollouts import load_sae_for, sae_reference

    model, _ = load_model("organism", device=str(device))
    sae = load_sae_for("organism", model)
    layer = int(sae.cfg.metadata["layer"])
    feats = [{"index": i, "weight": (-1.0) ** i} for i in range(0, 20 * 7, 7)]
    pack = FeaturePack(model="organism", layer=layer, hook=f"model.layers.{layer}", sae=sae_reference(sae),
                       features=feats, normalisation={"mean": 0.0, "std": 1.0})
    return pack.save(tmp / "pack.json"), sae


def make_trainer(kind: str, setup: str, pack_path, a, out: str, shared_vllm=None):
    from datasets import Dataset
    from peft import LoraConfig

    from mechreward.grpo import MechGRPOTrainer, grpo_config
    from mechreward.models import load_model
    from mechreward.reward import OutcomeReward, SAEFeatureReward
    from mechreward.tasks.arithmetic import ArithmeticTask

    model, tok = load_model("organism", device=a.device)
    task = ArithmeticTask(split="train", n=64)
    ds = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in task.questions])
    funcs = [OutcomeReward(task)]
    if kind == "mech":
        funcs.append(SAEFeatureReward.from_pack(pack_path, device=model.device))
    args = grpo_config(dict(output_dir=out, per_device_train_batch_size=a.batch, num_generations=a.gens,
                            max_steps=10, learning_rate=1e-5, beta=0.0, max_completion_length=a.max_completion,
                            report_to="none", save_strategy="no", logging_steps=1000, use_cpu=a.device == "cpu",
                            bf16=False, seed=0, num_iterations=2 if setup == "logprob" else 1,
                            use_vllm=setup == "vllm" and shared_vllm is None, vllm_mode="colocate",
                            vllm_max_model_length=256))
    trainer = MechGRPOTrainer(model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
    if shared_vllm is not None:  # one engine for both trainers: TRL's vLLM path on this trainer too
        trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, shared_vllm, -1
        trainer.vllm_mode = "colocate"
        trainer.vllm_importance_sampling_correction = True
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    rows = [ds[i // a.gens] for i in range(a.batch)]
    return trainer, rows


def timed_step(trainer, rows, seed: int) -> float:
    """Generate + score (+ capture) + loss/backward + optimizer step on one batch, seeded (same completions)."""
    torch.manual_seed(seed)
    if getattr(trainer, "use_vllm", False):  # sync this trainer's weights, as every training step does
        trainer.vllm_generation.model = trainer.model
        trainer._last_loaded_step = -1
    t = time.perf_counter()
    inputs = trainer._generate_and_score_completions(rows)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gens", type=int, default=4)
    p.add_argument("--max-completion", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--setups", default=None, help="comma-separated; default: logprob,fallback (+vllm when importable)")
    a = p.parse_args()
    if a.setups is None:
        try:
            import vllm  # noqa: F401

            a.setups = "logprob,fallback,vllm"
        except ImportError:
            a.setups = "logprob,fallback"
    if a.threads:
        torch.set_num_threads(a.threads)
    import trl
    import transformers

    print(f"device={a.device} threads={torch.get_num_threads()} batch={a.batch} gens={a.gens} "
          f"max_completion={a.max_completion} steps={a.rounds}x{a.steps} torch={torch.__version__} "
          f"trl={trl.__version__} transformers={transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        pack_path, _ = organism_pack(Path(tmp), a.device)
        for setup in a.setups.split(","):
            trainers = {"mech": make_trainer("mech", setup, pack_path, a, str(Path(tmp) / f"{setup}-mech"))}
            shared = getattr(trainers["mech"][0], "vllm_generation", None) if setup == "vllm" else None
            trainers["outcome"] = make_trainer("outcome", setup, pack_path, a, str(Path(tmp) / f"{setup}-outcome"),
                                               shared_vllm=shared)
            times = {"outcome": [], "mech": []}
            for r in range(a.warmup + a.rounds * a.steps):
                for kind in (("outcome", "mech") if r % 2 == 0 else ("mech", "outcome")):
                    dt = timed_step(*trainers[kind], seed=1000 + r)
                    if r >= a.warmup:
                        times[kind].append(dt)
            log = trainers["mech"][0].mech_capture_log
            want = "fallback" if setup == "fallback" else "logprob_pass"
            assert set(log) == {want}, log
            med = {k: statistics.median(v) * 1000 for k, v in times.items()}
            mean = {k: statistics.mean(v) * 1000 for k, v in times.items()}
            if setup == "vllm":
                assert trainers["mech"][0].vllm_compat in (None, "cpu-colocate")
            print(f"{setup:9s} outcome median {med['outcome']:8.1f} ms/step (mean {mean['outcome']:8.1f})   "
                  f"mech median {med['mech']:8.1f} ms/step (mean {mean['mech']:8.1f})   "
                  f"overhead median {100 * (med['mech'] / med['outcome'] - 1):+.1f}%  "
                  f"mean {100 * (mean['mech'] / mean['outcome'] - 1):+.1f}%")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
