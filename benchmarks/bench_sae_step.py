"""One SAE training step (forward + backward + optimizer) in mechreward, sparsify and SAELens.

Same random activations, shape, k, batch and precision for all three; each step is what the
library's own trainer does per batch (loss incl. AuxK, backward, decoder-norm handling, grad
clip where the trainer clips, Adam, dead-latent bookkeeping). Prints the median tokens/s.

    python benchmarks/bench_sae_step.py                      # CPU shape: 512 x 8192, k 32, batch 4096
    python benchmarks/bench_sae_step.py --device cuda        # GPU shape: 2048 x 32768, k 128
    python benchmarks/bench_sae_step.py --dead-fraction 0.5  # half the latents dead: AuxK on everywhere
    python benchmarks/bench_sae_step.py --device cuda --d-sae 131072 --k 100   # Qwen-Scope's widest

Also reported: peak device memory of each library's step (CUDA: torch.cuda.max_memory_allocated;
CPU: not tracked), and the fraction of the encoder-matmul bound reached. The bound is the
tokens/s if a step cost nothing but the encoder forward matmul (2·d_in·d_sae FLOPs per token,
unavoidable: top-k needs every pre-activation), at the matmul rate measured in the same run
on a [batch, d_in] @ [d_in, d_sae] product in the step's precision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(a) -> float:
    """FLOP/s of the encoder-shaped matmul in the step's precision (median of a few runs)."""
    dt = torch.bfloat16 if a.bf16 and a.device.type == "cuda" else torch.float32
    x = torch.randn(a.batch, a.d_in, device=a.device, dtype=dt)
    w = torch.randn(a.d_in, a.d_sae, device=a.device, dtype=dt)
    for _ in range(2):
        x @ w
    ts = []
    for _ in range(5):
        sync(a.device)
        t0 = time.perf_counter()
        x @ w
        sync(a.device)
        ts.append(time.perf_counter() - t0)
    return 2 * a.batch * a.d_in * a.d_sae / statistics.median(ts)


def bench_mechreward(a, x, dead):
    from mechreward.sae import SAEConfig, SAETrainer, SparseAutoencoder, TrainerConfig

    sae = SparseAutoencoder.from_config(SAEConfig(a.d_in, a.d_sae, a.k), device=a.device)
    cfg = TrainerConfig(autocast="bfloat16" if a.bf16 else "none", dead_tokens=10_000_000)
    tr = SAETrainer(sae, cfg, total_steps=10_000, device=a.device)
    tr.initialize(x)
    if dead is not None:  # as if 10M tokens were seen and these latents never fired
        tr.tokens_seen = cfg.dead_tokens
        tr.tokens_since_fired[dead] = cfg.dead_tokens
    return lambda: tr.step(x)


def bench_sparsify(a, x, dead):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(a.d_in, SparseCoderConfig(num_latents=a.d_sae, k=a.k), device=a.device)
    sae.b_dec.data = x.mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (a.d_sae / 2**14) ** 0.5)
    counts = torch.zeros(a.d_sae, dtype=torch.long, device=a.device)
    if dead is not None:
        counts[dead] = 10_000_000
    auxk_alpha = 1 / 32  # sparsify's default

    def step():
        dead_mask = counts > 5_000_000
        with torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            out = sae(x, dead_mask=dead_mask)
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        did_fire = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
        did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            counts.add_(x.shape[0])
            counts[did_fire] = 0
            if dead is not None:
                counts[dead] = 10_000_000
        return loss

    return step


def bench_saelens(a, x, dead):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, dtype="float32", device=str(a.device),
                                aux_loss_coefficient=1 / 32)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (a.d_sae / 2**14) ** 0.5)
    since_fired = torch.zeros(a.d_sae, device=a.device)
    dead_mask = None
    if dead is not None:
        dead_mask = torch.zeros(a.d_sae, dtype=torch.bool, device=a.device)
        dead_mask[dead] = True

    def step():
        sae.train()
        with torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            out = sae.training_forward_pass(step_input=TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead_mask, n_training_steps=0, is_logging_step=False))
            with torch.no_grad():
                did_fire = out.feature_acts.bool().float().sum(-2).bool()
                if did_fire.is_sparse:
                    did_fire = did_fire.to_dense()
                since_fired.add_(1)
                since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return out.loss

    return step


LIBS = {"mechreward": bench_mechreward, "sparsify": bench_sparsify, "saelens": bench_saelens}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int)
    p.add_argument("--d-sae", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=7, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="libraries are interleaved round by round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for all (default on CUDA)")
    p.add_argument("--dead-fraction", type=float, default=0.0, help="latents marked dead so AuxK runs")
    p.add_argument("--libs", default="mechreward,sparsify,saelens")
    a = p.parse_args()
    a.device = torch.device(a.device)
    gpu = a.device.type == "cuda"
    a.d_in = a.d_in or (2048 if gpu else 512)
    a.d_sae = a.d_sae or (32768 if gpu else 8192)
    a.k = a.k or (128 if gpu else 32)
    a.bf16 = a.bf16 or gpu
    if not gpu:  # sparsify picks its Triton decoder whenever triton imports; it needs a GPU
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d_in, device=a.device) * 3 + 0.5
    dead = None
    if a.dead_fraction > 0:
        dead = torch.randperm(a.d_sae, device=a.device)[: int(a.dead_fraction * a.d_sae)]

    libs = a.libs.split(",")
    steps, peak = {}, {}
    for name in libs:
        if a.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(a.device)
            base = torch.cuda.memory_allocated(a.device)
        steps[name] = LIBS[name](a, x, dead)
        for _ in range(a.warmup):
            steps[name]()
        sync(a.device)
        if a.device.type == "cuda":  # weights, grads, Adam state and the step's activations
            peak[name] = (torch.cuda.max_memory_allocated(a.device) - base) / 2**30
    rate = matmul_rate(a)
    times = {name: [] for name in libs}
    for _ in range(a.rounds):  # interleave so background load hits every library alike
        for name in libs:
            for _ in range(a.steps):
                sync(a.device)
                t0 = time.perf_counter()
                steps[name]()
                sync(a.device)
                times[name].append(time.perf_counter() - t0)

    import importlib.metadata as md

    print(f"device={a.device} threads={torch.get_num_threads()} d_in={a.d_in} d_sae={a.d_sae} k={a.k} "
          f"batch={a.batch} bf16={a.bf16} dead_fraction={a.dead_fraction} "
          f"steps={a.rounds}x{a.steps} torch={torch.__version__} sparsify={md.version('eai-sparsify')} "
          f"sae-lens={md.version('sae-lens')}")
    med = {n: statistics.median(t) for n, t in times.items()}
    bound = rate / (2 * a.d_in * a.d_sae)  # tokens/s if the step were only the encoder matmul
    print(f"encoder matmul: {rate / 1e12:.2f} TFLOP/s measured -> bound {bound:.0f} tokens/s")
    for n in libs:
        t = sorted(times[n])
        mem = f"  peak {peak[n]:6.2f} GiB" if n in peak else ""
        print(f"{n:11s} median {med[n] * 1e3:8.1f} ms/step  (min {t[0] * 1e3:7.1f}, max {t[-1] * 1e3:7.1f})  "
              f"{a.batch / med[n]:10.0f} tokens/s  {a.batch / med[n] / bound:6.1%} of bound{mem}")
    if "mechreward" in med:
        for n in libs:
            if n != "mechreward":
                print(f"mechreward / {n}: {med[n] / med['mechreward']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
