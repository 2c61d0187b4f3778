"""Harvesting speed: tokens/s of the live activation source, early exit vs the full forward.

For each model: `LiveSource` capturing layer L with early exit after L (what sae_train and
harvest do) against the same source with early exit switched off (every layer runs), for a few
L; the expected ratio of costs is about (L+1)/n_layers. Then several layers from one forward
against one forward per layer. Same random token batches for every variant; variants are
interleaved round by round so background load hits all alike.

    python benchmarks/bench_harvest.py                         # organism + a tiny-config qwen3_5
    python benchmarks/bench_harvest.py --models organism --device cuda
    python benchmarks/bench_harvest.py --models qwen3_5 --hidden 1024 --n-layers 16 --context 512
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


def hybrid_model(hidden: int, n_layers: int, seed: int = 0):
    """A random qwen3_5 (Qwen3.6 text: gated-DeltaNet + full attention every 4th layer)."""
    import transformers as tf

    heads = max(2, hidden // 64)
    cfg = tf.Qwen3_5TextConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
                               num_key_value_heads=max(1, heads // 4), head_dim=64, intermediate_size=3 * hidden,
                               vocab_size=32000, max_position_embeddings=4096, linear_num_value_heads=heads,
                               linear_num_key_heads=max(1, heads // 2), linear_key_head_dim=64,
                               linear_value_head_dim=64, linear_conv_kernel_dim=4)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg).eval(), cfg.vocab_size


def load(name: str, a):
    if name == "organism":
        from mechreward.models import load_model

        model, tok = load_model("organism")
        return model, tok.vocab_size
    if name == "qwen3_5":
        return hybrid_model(a.hidden, a.n_layers)
    raise SystemExit(f"unknown model {name!r}")


def measure(model, layers, batches, early_exit: bool, device) -> float:
    """Seconds to turn `batches` into one shuffled block of `layers` through LiveSource."""
    from mechreward.activations import FilterConfig, LiveSource

    src = LiveSource(model, layers, lambda: iter(batches), FilterConfig(outlier_factor=0), [],
                     batches_per_block=len(batches), device=device)
    src._capture.early_exit = early_exit  # off: the forward runs every layer, as without early exit
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _, block in src.blocks():
        for h in block.values():
            h.sum().item()  # wait for the device
        break
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="organism,qwen3_5")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="sequences per model batch")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batches", type=int, default=4, help="model batches per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512, help="qwen3_5 hidden size")
    p.add_argument("--n-layers", type=int, default=8, help="qwen3_5 layers")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    import importlib.metadata as md

    print(f"device={device} threads={torch.get_num_threads()} batch={a.batch} context={a.context} "
          f"batches={a.batches} rounds={a.rounds} torch={torch.__version__} transformers={md.version('transformers')}")
    for name in a.models.split(","):
        model, vocab = load(name, a)
        model.to(device)
        from mechreward.models import find_layers

        n = len(find_layers(model))
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(1, vocab, (a.batch, a.context), generator=g) for _ in range(a.batches)]
        tokens = a.batch * a.context * a.batches
        picks = sorted({0, n // 2 - 1, n - 2})
        several = sorted({1, n // 2, n - 2})
        variants = {f"full forward (capture L{n - 2})": ([n - 2], False)}
        variants.update({f"early exit at L{L}": ([L], True) for L in picks})
        variants[f"layers {several}, one forward"] = (several, True)
        variants.update({f"  one layer L{L} (for the sum)": ([L], True) for L in several if L not in picks})
        measure(model, [0], batches[:1], True, device)  # warm-up
        times = {v: [] for v in variants}
        for _ in range(a.rounds):
            for v, (layers, ee) in variants.items():
                times[v].append(measure(model, layers, batches, ee, device))
        med = {v: statistics.median(t) for v, t in times.items()}
        full = med[f"full forward (capture L{n - 2})"]
        print(f"\n{name}: {type(model).__name__}, {n} layers, hidden {model.config.get_text_config().hidden_size}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
        for v in variants:
            layers, ee = variants[v]
            expect = f"expect {(max(layers) + 1) / n:4.2f}" if ee and len(layers) == 1 else ""
            print(f"  {v:34s} {tokens / med[v]:9.0f} tok/s  cost {med[v] / full:4.2f} of full  {expect}")
        single = {ls[0]: v for v, (ls, ee) in variants.items() if ee and len(ls) == 1}
        sep = sum(med[single[L]] for L in several)
        print(f"  {len(several)} layers in one forward: {med[f'layers {several}, one forward'] / full:4.2f} of full; "
              f"one forward per layer would cost {sep / full:4.2f}")


if __name__ == "__main__":
    main()
