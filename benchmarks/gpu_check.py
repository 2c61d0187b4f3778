"""The GPU evidence in one command: correctness on the device, the SAE step side by side,
harvesting with early exit, and a GRPO-style step with the SAE reward. Writes one JSON and
one markdown file.

    # on the GPU machine (Python 3.12, torch + CUDA + Triton, transformers, peft, accelerate):
    pip install --no-deps --no-index -q benchmarks/gpu_wheels/*.whl    # optional anchors
    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check          # < 8 min on an H100/H200
    # quick CPU mode (tiny shapes; what tests/test_gpu_check.py runs):
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check

Sections (each one's failure is recorded in the report, not a crash; a section past the time
budget is skipped and says so):
- correctness: Triton kernels (sparse decode, W_dec and encoder backward) vs the PyTorch
  reference (fp64 on CPU-less paths: fp32 inputs, tolerance 1e-4 relative to the largest
  value); bf16 autocast vs fp32 for one SAE step's loss and codes; the SAE step's gradients
  with the device default kernels vs the dense reference path; bitwise-equal weights when the
  same steps are repeated.
- sae_step: `bench_sae_step.py`'s libraries (mechreward, sparsify, SAELens) interleaved, at
  d_in 2048 / d_sae 32768 / k 128, Qwen-Scope's widest (d_sae 131072, k 100) and seed 001's
  shape (d_in 5120, d_sae 4096, k 32), batch 4096, bf16: tokens/s, fraction of the measured
  encoder-matmul bound, peak memory. An anchor whose package does not import is reported
  missing.
- harvest: a small random qwen3_5_moe; tokens/s of `LiveSource` with early exit at several
  layers vs the full forward.
- grpo: one policy-gradient step (HF generation, group advantages, LoRA backward, Adam) with
  the outcome reward only vs outcome + an SAE-feature reward captured by an early-exit forward.
  TRL is not needed (TRL's GRPOTrainer is what `bench_grpo_step.py` times where TRL exists).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

SHAPES = {  # name: (d_in, d_sae, k, batch)
    "gpu 2048x32768 k128": (2048, 32768, 128, 4096),
    "qwen-scope widest 2048x131072 k100": (2048, 131072, 100, 4096),
    "seed 001 5120x4096 k32": (5120, 4096, 32, 4096),
}
QUICK_SHAPES = {"quick 32x256 k8": (32, 256, 8, 256)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "machine": platform.machine()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("triton", "transformers", "peft", "accelerate", "eai-sparsify", "sae-lens", "trl", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def import_anchor(name: str):
    """The anchor's SAE class, or the reason it cannot be used (reported, never raised)."""
    try:
        if name == "sparsify":
            try:
                from sparsify import SparseCoder, SparseCoderConfig
            except ImportError:
                # sparsify's __init__ imports its trainer (datasets, pyarrow); the SAE module alone
                # needs only small packages, which the wheel folder carries.
                spec = importlib.util.find_spec("sparsify")
                if spec is None:
                    raise
                pkg = types.ModuleType("sparsify")
                pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
                sys.modules["sparsify"] = pkg
                mod = importlib.import_module("sparsify.sparse_coder")
                SparseCoder, SparseCoderConfig = mod.SparseCoder, importlib.import_module(
                    "sparsify.config").SparseCoderConfig
                pkg.SparseCoder, pkg.SparseCoderConfig = SparseCoder, SparseCoderConfig  # for bench_sae_step
            return (SparseCoder, SparseCoderConfig), None
        if name == "saelens":
            from sae_lens.saes.topk_sae import TopKTrainingSAE

            return TopKTrainingSAE, None
    except Exception as e:  # noqa: BLE001 - any import failure means "anchor missing"
        return None, f"missing: {type(e).__name__}: {str(e)[:200]}"
    return None, f"unknown anchor {name}"


# --------------------------------------------------------------------------- correctness

def check_correctness(device: torch.device, quick: bool) -> dict:
    from mechreward.sae import SAEConfig, SAETrainer, SparseAutoencoder, TrainerConfig, kernels

    res: dict = {}
    g = torch.Generator().manual_seed(0)
    N, k, d_in, d_sae = (64, 8, 32, 256) if quick else (4096, 64, 1024, 16384)

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    # Triton kernels vs the dense PyTorch reference (fp32 inputs; reference in fp64).
    if kernels.HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        W = torch.randn(d_sae, d_in, generator=g).to(device).requires_grad_()
        v = torch.randn(N, k, generator=g).to(device).requires_grad_()
        idx = torch.randint(0, d_sae, (N, k), generator=g).to(device)
        gout = torch.randn(N, d_in, generator=g).to(device)
        out = kernels.sparse_decode(v, idx, W, impl="triton")
        out.backward(gout)
        got = [out.detach(), v.grad.clone(), W.grad.clone()]
        W64, v64 = W.detach().double().requires_grad_(), v.detach().double().requires_grad_()
        ref = kernels.decode_dense(v64, idx, W64)
        ref.backward(gout.double())
        tol = 1e-4
        errs = {n: rel(a, b) for n, a, b in zip(("decode", "grad_values", "grad_W_dec"), got,
                                                (ref.detach(), v64.grad, W64.grad))}
        x = torch.randn(N, d_in, generator=g).to(device).requires_grad_()
        W_enc = torch.randn(d_in, d_sae, generator=g).to(device).requires_grad_()
        b_enc = torch.randn(d_sae, generator=g).to(device).requires_grad_()
        with torch.no_grad():
            pre = torch.addmm(b_enc, x, W_enc)
            sel = pre.topk(k, dim=-1).indices
        gk = torch.randn(N, k, generator=g).to(device)
        kernels.selected_preacts(x, W_enc, b_enc, sel, pre, impl="triton").backward(gk)
        got = [t.grad.clone() for t in (x, W_enc, b_enc)]
        r64 = [t.detach().double().requires_grad_() for t in (x, W_enc, b_enc)]
        torch.addmm(r64[2], r64[0], r64[1]).gather(-1, sel).backward(gk.double())
        for n, a, t in zip(("enc_grad_x", "enc_grad_W_enc", "enc_grad_b_enc"), got, r64):
            errs[n] = rel(a, t.grad)
        res["triton_vs_reference"] = {"max_rel_err": errs, "tolerance": tol,
                                      "pass": all(e <= tol for e in errs.values())}
    else:
        res["triton_vs_reference"] = {"skipped": "triton not importable" if not kernels.HAS_TRITON
                                      else "CPU without TRITON_INTERPRET=1"}

    # One SAE step: gradients of the default kernels vs the dense reference path (decode_dense
    # and an addmm + gather encoder), fp32, and bf16 autocast vs fp32 (loss, codes overlap).
    torch.manual_seed(0)
    n_tok, sd_in, sd_sae, sk = (128, 32, 256, 8) if quick else (4096, 2048, 32768, 128)
    x = (torch.randn(n_tok, sd_in, generator=g) * 2 + 0.3).to(device)

    def fresh_sae():
        sae = SparseAutoencoder(SAEConfig(sd_in, sd_sae, sk), device=device)
        SAETrainer(sae, TrainerConfig(warmup_steps=0), total_steps=4).initialize(x)
        return sae.train()

    def grads(autocast: str):
        """One forward + FVU backward through the module (the device's default kernels)."""
        sae = fresh_sae()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
            out = sae(x)
        out.fvu.backward()
        return float(out.fvu.detach()), out.indices.detach(), {n: p.grad.detach().clone() for n, p in sae.named_parameters()}

    def reference_grads():
        """The same FVU written densely: addmm encoder with autograd, top-k, dense scatter decode."""
        sae = fresh_sae()
        xs = x * sae.act_scale
        xc = xs - sae.b_dec
        pre = torch.addmm(sae.b_enc, xc, sae.W_enc)
        idx = pre.detach().topk(sk, dim=-1, sorted=False).indices
        recon = kernels.decode_dense(pre.gather(-1, idx).relu(), idx, sae.W_dec) + sae.b_dec
        fvu = (xs - recon).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
        fvu.backward()
        return float(fvu.detach()), idx, {n: p.grad.detach().clone() for n, p in sae.named_parameters()}

    fvu, idx_d, g_default = grads("none")
    fvu_r, idx_r, g_ref = reference_grads()
    gerr = {n: rel(g_default[n], g_ref[n]) for n in g_ref}
    same_codes = bool(torch.equal(idx_d.sort(-1).values, idx_r.sort(-1).values))
    res["step_gradients_vs_reference"] = {"default_impl": kernels.decode_impl_for(device), "fvu": fvu,
                                          "fvu_reference": fvu_r, "same_codes": same_codes,
                                          "max_rel_err": gerr, "tolerance": 1e-4,
                                          "pass": same_codes and all(e <= 1e-4 for e in gerr.values())}
    fvu_b, idx_b, _ = grads("bfloat16")
    a_sets = torch.zeros(idx_d.shape[0], sd_sae, dtype=torch.bool, device=device).scatter_(1, idx_d, True)
    overlap = float((a_sets.gather(1, idx_b).float().mean()))
    res["bf16_vs_fp32"] = {"fvu_fp32": fvu, "fvu_bf16": fvu_b, "fvu_rel_diff": abs(fvu_b - fvu) / max(fvu, 1e-30),
                           "code_overlap": overlap, "tolerance": {"fvu_rel_diff": 2e-2, "code_overlap": 0.9},
                           "pass": abs(fvu_b - fvu) / max(fvu, 1e-30) <= 2e-2 and overlap >= 0.9}

    # Determinism: the same 3 steps twice give bitwise-equal weights.
    states = []
    for _ in range(2):
        sae = SparseAutoencoder(SAEConfig(sd_in, sd_sae, sk), device=device)
        tr = SAETrainer(sae, TrainerConfig(warmup_steps=0, dead_tokens=n_tok), total_steps=3)
        for _ in range(3):
            tr.step(x)
        states.append({n: t.detach().clone() for n, t in sae.state_dict().items()})
    same = {n: bool(torch.equal(states[0][n], states[1][n])) for n in states[0]}
    res["determinism"] = {"bitwise_equal": same, "pass": all(same.values())}
    return res


# --------------------------------------------------------------------------- SAE step

def check_sae_step(device: torch.device, quick: bool, deadline: float) -> dict:
    import bench_sae_step as b

    shapes = QUICK_SHAPES if quick else SHAPES
    anchors = {}
    libs = ["mechreward"]
    for lib in ("sparsify", "saelens"):
        cls, why = import_anchor(lib)
        anchors[lib] = "ok" if cls is not None else why
        if cls is not None:
            libs.append(lib)
    out = {"anchors": anchors, "shapes": {}}
    for name, (d_in, d_sae, k, batch) in shapes.items():
        if time.time() > deadline:
            out["shapes"][name] = {"skipped": "time budget spent"}
            continue
        a = argparse.Namespace(device=device, d_in=d_in, d_sae=d_sae, k=k, batch=batch,
                               bf16=device.type == "cuda", steps=1 if quick else 5, rounds=1 if quick else 3,
                               warmup=1 if quick else 2)
        torch.manual_seed(0)
        x = torch.randn(batch, d_in, device=device) * 3 + 0.5
        row: dict = {"d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "bf16": a.bf16, "libs": {}}
        steps, peak = {}, {}
        for lib in libs:
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                steps[lib] = b.LIBS[lib](a, x, None)
                for _ in range(a.warmup):
                    steps[lib]()
                sync(device)
                if device.type == "cuda":
                    peak[lib] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at the widest shape
                row["libs"][lib] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                steps.pop(lib, None)
        rate = b.matmul_rate(a)
        bound = rate / (2 * d_in * d_sae)
        times: dict = {lib: [] for lib in steps}
        for _ in range(a.rounds):
            for lib, fn in steps.items():
                for _ in range(a.steps):
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[lib].append(time.perf_counter() - t0)
        row["matmul_tflops"] = rate / 1e12
        row["bound_tokens_per_s"] = bound
        for lib, ts in times.items():
            med = statistics.median(ts)
            row["libs"][lib] = {"ms_per_step": med * 1e3, "tokens_per_s": batch / med,
                                "fraction_of_bound": batch / med / bound, "peak_gib": peak.get(lib)}
        m = row["libs"].get("mechreward", {})
        for lib in ("sparsify", "saelens"):
            if "tokens_per_s" in m and "tokens_per_s" in row["libs"].get(lib, {}):
                row[f"mechreward_over_{lib}"] = m["tokens_per_s"] / row["libs"][lib]["tokens_per_s"]
        out["shapes"][name] = row
        del steps
    return out


# --------------------------------------------------------------------------- harvesting

def moe_model(quick: bool, device):
    import transformers as tf

    h = 64 if quick else 1024
    heads = max(2, h // 64)
    cfg = tf.Qwen3_5MoeTextConfig(
        hidden_size=h, num_hidden_layers=4 if quick else 16, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4), head_dim=16 if quick else 64, intermediate_size=2 * h,
        moe_intermediate_size=h // 2, shared_expert_intermediate_size=h // 2, num_experts=8 if quick else 32,
        num_experts_per_tok=2 if quick else 4, vocab_size=512 if quick else 32000, max_position_embeddings=4096,
        linear_num_value_heads=heads, linear_num_key_heads=max(1, heads // 2),
        linear_key_head_dim=16 if quick else 64, linear_value_head_dim=16 if quick else 64,
        linear_conv_kernel_dim=4)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return tf.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval(), cfg


def check_harvest(device: torch.device, quick: bool) -> dict:
    import bench_harvest as bh

    from mechreward.models import find_layers

    model, cfg = moe_model(quick, device)
    n = len(find_layers(model))
    batch, context, n_batches, rounds = (2, 16, 1, 1) if quick else (8, 1024, 4, 3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, cfg.vocab_size, (batch, context), generator=gen) for _ in range(n_batches)]
    tokens = batch * context * n_batches
    variants = {"full forward": ([n - 2], False)}
    variants.update({f"early exit at L{L}": ([L], True) for L in sorted({0, n // 4, n // 2 - 1, n - 2})})
    several = sorted({1, n // 2, n - 2})
    variants[f"layers {several}, one forward"] = (several, True)
    bh.measure(model, [0], batches[:1], True, device)  # warm-up
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, (layers, ee) in variants.items():
            times[v].append(bh.measure(model, layers, batches, ee, device))
    full = statistics.median(times["full forward"])
    rows = {}
    for v, (layers, ee) in variants.items():
        med = statistics.median(times[v])
        rows[v] = {"layers": layers, "tokens_per_s": tokens / med, "cost_of_full": med / full,
                   "expected": (max(layers) + 1) / n if ee else 1.0}
    return {"model": type(model).__name__, "n_layers": n, "hidden": cfg.hidden_size,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch, "context": context,
            "variants": rows}


# --------------------------------------------------------------------------- GRPO step

def check_grpo(device: torch.device, quick: bool) -> dict:
    """One policy-gradient step on a random qwen3_5_moe with LoRA: generate G completions per
    prompt (HF generate), reward, group-normalise, backward the sequence log-prob loss, Adam.
    `outcome`: a reward computed from the token ids only; `+sae`: plus an SAE-feature score from
    an early-exit forward at layer L (the reward's fallback path, as without vLLM log-probs)."""
    from peft import LoraConfig, get_peft_model

    from mechreward.models import ResidualCapture
    from mechreward.sae import SAEConfig, SparseAutoencoder

    model, cfg = moe_model(quick, device)
    model = get_peft_model(model, LoraConfig(r=8 if quick else 32, lora_alpha=16 if quick else 64,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    layer = cfg.num_hidden_layers // 2
    sae = SparseAutoencoder(SAEConfig(cfg.hidden_size, 8 * cfg.hidden_size, 16), device=device)
    feats = torch.arange(20, device=device)
    weights = torch.linspace(-1, 1, 20, device=device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n_prompts, gens, plen, max_new = (2, 2, 8, 4) if quick else (8, 8, 128, 128)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, cfg.vocab_size, (n_prompts, plen), generator=gen).to(device)

    def sae_scores(ids, comp):
        def transform(_layer, h, comp=comp):
            z = sae.encode_dense(h.to(sae.dtype))[..., feats] @ weights  # [B, T]
            return (z * comp).sum(1) / comp.sum(1).clamp_min(1)
        cap = ResidualCapture(model, [layer], early_exit=True, transform=transform)
        with torch.no_grad():
            return cap.run(input_ids=ids, use_cache=False)[layer].float()

    def step(with_sae: bool) -> dict:
        t = {}
        sync(device)
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            ids = model.generate(prompts.repeat_interleave(gens, 0), max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=True, top_k=0, pad_token_id=0)
        sync(device)
        t["generate_s"] = time.perf_counter() - t0
        comp = torch.zeros_like(ids, dtype=torch.float32)
        comp[:, plen:] = 1
        reward = (ids[:, plen:] % 7 == 0).float().mean(1)  # outcome: a rule on the completion ids
        if with_sae:
            t1 = time.perf_counter()
            reward = reward + sae_scores(ids, comp)
            sync(device)
            t["sae_reward_s"] = time.perf_counter() - t1
        r = reward.view(n_prompts, gens)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
        model.train()
        logits = model(input_ids=ids, use_cache=False).logits[:, plen - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, plen:, None]).squeeze(-1)
        loss = -(adv[:, None] * logp).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t["step_s"] = time.perf_counter() - t0
        return t

    step(False)
    step(True)  # warm-up both
    res: dict = {"outcome": [], "sae": []}
    for r in range(1 if quick else 3):
        for name in (("outcome", "sae") if r % 2 == 0 else ("sae", "outcome")):
            torch.manual_seed(r)
            res[name].append(step(name == "sae"))
    med = {n: statistics.median(s["step_s"] for s in res[n]) for n in res}
    return {"model": type(model.base_model.model).__name__, "prompts": n_prompts, "generations": gens,
            "max_new_tokens": max_new, "sae_layer": layer, "outcome_ms": med["outcome"] * 1e3,
            "sae_ms": med["sae"] * 1e3, "overhead": med["sae"] / med["outcome"] - 1,
            "vllm": importlib.util.find_spec("vllm") is not None, "trl": importlib.util.find_spec("trl") is not None,
            "steps": res}


# --------------------------------------------------------------------------- report

def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [f"# GPU check, {report['date']}", "",
             f"device {report['device']} ({v.get('gpu', 'no GPU')}), torch {v['torch']}, CUDA {v['cuda']}, "
             f"triton {v['triton']}, transformers {v['transformers']}, peft {v['peft']}, "
             f"sparsify {v['eai-sparsify']}, sae-lens {v['sae-lens']}, quick={report['quick']}; "
             f"{report['elapsed_s']:.0f} s", ""]
    for sec, body in report["sections"].items():
        lines.append(f"## {sec}")
        lines.append("")
        if "error" in body or "skipped" in body:
            lines += [f"**{'ERROR' if 'error' in body else 'skipped'}**: {body.get('error') or body.get('skipped')}", ""]
            continue
        if sec == "correctness":
            for name, r in body.items():
                if not isinstance(r, dict):
                    continue
                verdict = "skipped: " + r["skipped"] if "skipped" in r else ("PASS" if r["pass"] else "FAIL")
                detail = {k: r[k] for k in r if k not in ("pass", "skipped")}
                lines.append(f"- {name}: **{verdict}** `{json.dumps(detail, default=float)[:600]}`")
        elif sec == "sae_step":
            lines.append(f"anchors: {body['anchors']}")
            lines += ["", "| shape | library | tokens/s | ms/step | of matmul bound | peak GiB |", "|---|---|---|---|---|---|"]
            for shape, row in body["shapes"].items():
                if "skipped" in row:
                    lines.append(f"| {shape} | skipped: {row['skipped']} | | | | |")
                    continue
                for lib, r in row["libs"].items():
                    if "error" in r:
                        lines.append(f"| {shape} | {lib} | error: {r['error'][:80]} | | | |")
                        continue
                    pk = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
                    lines.append(f"| {shape} | {lib} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.1f} | "
                                 f"{r['fraction_of_bound']:.1%} | {pk} |")
                ratios = {k: f"{row[k]:.2f}x" for k in row if k.startswith("mechreward_over")}
                if ratios:
                    lines.append(f"| {shape} | ratios | {ratios} | | | |")
        elif sec == "harvest":
            lines += [f"{body['model']}, {body['n_layers']} layers, hidden {body['hidden']}, "
                      f"{body['params_m']:.1f}M params, batch {body['batch']} x {body['context']}", "",
                      "| variant | tokens/s | cost of full | expected |", "|---|---|---|---|"]
            for name, r in body["variants"].items():
                lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['cost_of_full']:.2f} | {r['expected']:.2f} |")
        elif sec == "grpo":
            lines.append(f"{body['model']} + LoRA, {body['prompts']} prompts x {body['generations']}, "
                         f"{body['max_new_tokens']} new tokens, SAE at layer {body['sae_layer']}: outcome only "
                         f"{body['outcome_ms']:.0f} ms/step, + SAE reward {body['sae_ms']:.0f} ms/step, overhead "
                         f"{body['overhead']:+.1%} (vllm importable: {body['vllm']}, trl: {body['trl']})")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CPU test)")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--sections", default="correctness,sae_step,harvest,grpo")
    p.add_argument("--budget-s", type=float, default=420.0, help="later sections are skipped past this")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu --quick for the CPU check")
    if device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU
    t_start = time.time()
    deadline = t_start + a.budget_s
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": str(device),
              "quick": a.quick, "versions": versions(), "sections": {}}
    fns = {"correctness": lambda: check_correctness(device, a.quick),
           "sae_step": lambda: check_sae_step(device, a.quick, deadline),
           "harvest": lambda: check_harvest(device, a.quick), "grpo": lambda: check_grpo(device, a.quick)}
    for sec in a.sections.split(","):
        if sec not in fns:
            p.error(f"unknown section {sec!r}; choose from {','.join(fns)}")
        if time.time() > deadline:
            report["sections"][sec] = {"skipped": f"time budget ({a.budget_s:.0f} s) spent"}
            continue
        t0 = time.time()
        try:
            report["sections"][sec] = fns[sec]()
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
            report["sections"][sec] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        report["sections"][sec]["elapsed_s"] = time.time() - t0
        print(f"{sec}: {time.time() - t0:.1f} s", flush=True)
    report["elapsed_s"] = time.time() - t_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from mechreward.io import write_text

    write_text(out / "gpu_check.json", json.dumps(report, indent=1, default=float))
    write_text(out / "gpu_check.md", markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [s for s, b in report["sections"].items() if "error" in b]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
