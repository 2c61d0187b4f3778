"""vLLM scenarios, run by tests/vllm_env.py under the vLLM environment's Python (see there).

    python tests/vllm_scenarios.py <name> <result.json> <work dir> <params json>

Each scenario runs real vLLM (one engine, or one server) on the built-in organism and writes
the measured values to <result.json>; the pytest tests assert on them. The engine starts in a
spawned process, hence the `__main__` guard.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def _hf_logprobs(model, prompt_ids, completion_ids, temperature: float = 1.0) -> torch.Tensor:
    """Teacher-forced fp32 log-probs of `completion_ids` after `prompt_ids` (one unpadded forward), of the
    distribution at `temperature` (TRL has vLLM return processed log-probs: after temperature scaling)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float() / temperature
    lp = torch.log_softmax(logits[0, len(prompt_ids) - 1:-1], -1)
    return lp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


# --------------------------------------------------------------------------- rollouts + g1

def rollouts(work: Path, p: dict) -> dict:
    import numpy as np

    from mechreward import rollouts as R
    from mechreward.g1 import G1Config, run_g1
    from mechreward.models import ModelConfig, load_model
    from mechreward.run import Run
    from mechreward.sae.formats import load_sae
    from mechreward.tasks import TaskConfig, load_task

    out = work / "roll"
    n_q, n = 6, 2
    # 1. an interrupted run: the first 3 questions, through the library
    cfg = R.RolloutsConfig(model=ModelConfig(device="cpu"), task=TaskConfig(name="arithmetic", n=n_q),
                           sampling=R.SamplingConfig(n=n, max_new_tokens=40, backend="vllm"), layers=[0],
                           questions_per_shard=3, output=str(out), seed=0)
    task = load_task(cfg.task)
    R.generate_rollouts(cfg, Run(work / "run0", "rollouts"), questions=task.questions[:3])
    first = (out / "shard-00000.safetensors").read_bytes()
    # 2. the command resumes it (same process: the same engine)
    sys.argv = ["rollouts", f"hydra.run.dir={work / 'run1'}", "sampling.backend=vllm", f"task.n={n_q}",
                f"sampling.n={n}", "sampling.max_new_tokens=40", "layers=[0]", "questions_per_shard=3",
                f"output={out}", "model.device=cpu"]
    R.main()
    report = json.loads((work / "run1" / "report.json").read_text())
    rs = R.RolloutSet(out)
    header = json.loads((out / "manifest.json").read_text())
    model, tok = load_model(ModelConfig(device="cpu"))
    sae = load_sae(R.resolve_sae_path("organism"))
    layer = header["sae_layer"]
    lp_gap, resid_gap, code_gap, csr_gap = 0.0, 0.0, 0.0, 0.0
    torch.set_grad_enabled(False)
    for i, r in enumerate(rs.records):
        hf = _hf_logprobs(model, r["prompt_ids"], r["completion_ids"])
        lp_gap = max(lp_gap, float((hf - torch.tensor(r["logprobs"])).abs().max()))
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        P = len(r["prompt_ids"])
        for L in header["layers"]:
            resid_gap = max(resid_gap, float((rs.resid(L, "mean")[i] - hs[L + 1][0, P:].mean(0)).abs().max()))
        dense = sae.encode_dense(hs[layer + 1][0, P:])
        for how in R.POOLINGS:
            code_gap = max(code_gap, float((rs.codes(how)[i] - R.pool_dense(dense, how)).abs().max()))
        ptr, idx, val = rs.token_codes(i)
        rebuilt = torch.zeros_like(dense)
        for t in range(dense.shape[0]):
            rebuilt[t, idx[ptr[t]:ptr[t + 1]].long()] = val[ptr[t]:ptr[t + 1]]
        csr_gap = max(csr_gap, float((rebuilt - dense).abs().max()))
    # the same command with the HF backend: the report and manifest keys to match
    hf_out = work / "roll_hf"
    hf_cfg = R.RolloutsConfig(model=ModelConfig(device="cpu"), task=TaskConfig(name="arithmetic", n=2),
                              sampling=R.SamplingConfig(n=1, max_new_tokens=8), layers=[0], output=str(hf_out))
    hf_report = R.run_rollouts(hf_cfg, Run(work / "run_hf", "rollouts"))
    hf_header = json.loads((hf_out / "manifest.json").read_text())
    hf_record_keys = sorted(R.RolloutSet(hf_out).records[0])
    # 3. g1 on vLLM rollouts (the same engine again)
    g1cfg = G1Config(model=ModelConfig(device="cpu"), task=TaskConfig(name="arithmetic", n=70),
                     sampling=R.SamplingConfig(backend="vllm", n=2, max_new_tokens=64), n_discovery=30, n_validation=40,
                     n_random_packs=100, n_boot=200, n_perm=500)
    g1 = run_g1(g1cfg, Run(work / "g1", "g1"))
    g1_rs = R.RolloutSet(g1["rollouts_dir"])
    # 4. a model vLLM's CPU attention refuses (head_dim 16): one clear error, before any engine starts
    from mechreward.errors import ModelError
    from mechreward.vllm_backend import VLLMSettings, build_llm
    from tiny import save_tiny

    bad = save_tiny(work / "tiny16", "qwen3")
    try:
        build_llm(str(bad), VLLMSettings(), "float32")
        head_error = None
    except ModelError as e:
        head_error = str(e)
    return {
        "head_error": head_error,
        "n_records": len(rs), "question_ids": rs.question_ids.tolist(), "n_shards": len(rs.shards),
        "first_shard_unchanged": (out / "shard-00000.safetensors").read_bytes() == first,
        "report": report, "hf_report_keys": sorted(hf_report), "header": header, "hf_header_keys": sorted(hf_header),
        "record_keys": sorted(rs.records[0]), "hf_record_keys": hf_record_keys,
        "max_logprob_gap": lp_gap, "max_resid_gap": resid_gap, "max_code_gap": code_gap, "max_csr_gap": csr_gap,
        "n_logprobs_equal_lengths": sum(len(r["logprobs"]) == len(r["completion_ids"]) for r in rs.records),
        "finish_reasons": sorted({r["finish_reason"] for r in rs.records}),
        "eos_ends": sum(r["completion_ids"][-1] == tok.eos_token_id for r in rs.records if r["finish_reason"] == "eos"),
        "n_eos": sum(r["finish_reason"] == "eos" for r in rs.records),
        "distinct_completions": len({tuple(r["completion_ids"]) for r in rs.records}),
        "g1": {k: g1[k] for k in ("verdict", "spearman_rho", "n_discovery", "n_validation", "pack_path")},
        "g1_keys": sorted(g1), "g1_backend": g1_rs.header["sampling"]["backend"],
        "g1_vllm_dtype": g1_rs.header["sampling"].get("vllm_dtype"),
        "g1_accuracy": float(np.mean(g1_rs.labels)),
    }


# --------------------------------------------------------------------------- GRPO

def _grpo_trainer(work: Path, lora: bool, mode: str, port: int | None = None, lr: float = 3e-3, steps: int = 2):
    from datasets import Dataset
    from peft import LoraConfig

    from mechreward.grpo import MechGRPOTrainer, grpo_config
    from mechreward.models import load_model
    from mechreward.probe import FeaturePack
    from mechreward.reward import OutcomeReward, SAEFeatureReward
    from mechreward.rollouts import load_sae_for, sae_reference
    from mechreward.tasks.arithmetic import ArithmeticTask

    model, tok = load_model("organism", device="cpu")
    sae = load_sae_for("organism", model)
    layer = int(sae.cfg.metadata["layer"])
    feats = [{"index": i, "weight": (-1.0) ** i} for i in range(0, 20 * 7, 7)]
    pack = FeaturePack(model="organism", layer=layer, hook=f"model.layers.{layer}", sae=sae_reference(sae),
                       features=feats, normalisation={"mean": 0.0, "std": 1.0}).save(work / "pack.json")
    task = ArithmeticTask(split="train", n=16)
    ds = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in task.questions])
    mech = SAEFeatureReward.from_pack(pack)
    extra = dict(vllm_mode=mode)
    if mode == "server":
        extra.update(vllm_server_base_url=f"http://127.0.0.1:{port}", vllm_server_timeout=240)
    else:
        extra.update(vllm_max_model_length=256)
    # groups of 4: the trained organism is confident, and a group whose completions are all identical has zero
    # advantages (no update); larger groups make a step with no update less likely
    args = grpo_config(dict(output_dir=str(work / "out"), per_device_train_batch_size=8, num_generations=4,
                            max_steps=steps, learning_rate=lr, beta=0.0, max_completion_length=24, report_to="none",
                            save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, seed=0, use_vllm=True,
                            **extra))
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear") if lora else None
    trainer = MechGRPOTrainer(model, reward_funcs=[OutcomeReward(task), mech], args=args, train_dataset=ds,
                              processing_class=tok, peft_config=peft_config)
    return trainer, mech, layer


def _policy_logprobs(trainer, prompt_ids, completion_ids) -> list[float]:
    was = trainer.model.training
    trainer.model.eval()
    try:
        return _hf_logprobs(trainer.model, prompt_ids, completion_ids, trainer.args.temperature).tolist()
    finally:
        trainer.model.train(was)


def _instrument(trainer, mech, layer, initial_model):
    """Record, at every generation: vLLM's ids and log-probs, the HF log-probs of the current policy and of the
    initial weights on the same ids; at every scoring: the captured mech values vs an independent forward."""
    from mechreward.models import ResidualCapture

    log = {"gens": [], "capture": []}
    orig_generate = trainer._generate

    def generate(prompts):
        out = orig_generate(prompts)
        prompt_ids, completion_ids, logprobs = out[0], out[1], out[4]
        gaps, init_gaps, n_tok = [], [], 0
        for p, c, lp in zip(prompt_ids, completion_ids, logprobs):
            hf = torch.tensor(_policy_logprobs(trainer, p, c))
            v = torch.tensor([float("nan") if x is None else x for x in lp])
            gaps.append(float((hf - v).abs().max()))
            init = _hf_logprobs(initial_model, p, c, trainer.args.temperature)
            init_gaps.append(float((init - v).abs().max()))
            n_tok += len(c)
        log["gens"].append({"step": trainer.state.global_step, "max_gap": max(gaps), "max_gap_initial": max(init_gaps),
                            "n_tokens": n_tok, "n_completions": len(completion_ids),
                            "syncs": getattr(trainer.vllm_generation, "mechreward_syncs", None)})
        return out

    trainer._generate = generate
    orig_score = trainer._generate_and_score_completions

    def score(inputs):
        out = orig_score(inputs)
        # an independent forward of the policy on TRL's padded ids, chunked as TRL chunks them
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        comp = attn.bool().clone()
        comp[:, :out["prompt_ids"].shape[1]] = False
        bs = trainer.args.per_device_train_batch_size
        vals = []
        with torch.no_grad():
            for s in range(0, ids.shape[0], bs):
                cap = ResidualCapture(trainer.model, [layer], early_exit=True)
                h = cap.run(input_ids=ids[s:s + bs], attention_mask=attn[s:s + bs], use_cache=False)[layer]
                vals.append(mech.scorer.token_activations(h[comp[s:s + bs]]))
        ref = torch.cat(vals)
        got = trainer.mech_last[mech.name]["token_values"]
        log["capture"].append({"source": trainer.mech_capture_log[-1], "shape_equal": list(got.shape) == list(ref.shape),
                               "max_gap": float((got.float() - ref.float()).abs().max()) if got.shape == ref.shape else None,
                               "abs_sum": float(ref.abs().sum()), "n_values": int(ref.shape[0]),
                               "has_old_logps": "old_per_token_logps" in out,
                               "has_sampling_logps": out.get("sampling_per_token_logps") is not None})
        return out

    trainer._generate_and_score_completions = score
    return log


def _final_check(trainer, tok) -> dict:
    """After the last optimizer step: sync, sample with vLLM, compare with the HF forward of the trained policy."""
    vg = trainer.vllm_generation
    vg.sync_weights()
    prompts = [tok("Q: 12+7-3=?\nA:", add_special_tokens=False)["input_ids"],
               tok("Q: 40-8+5=?\nA:", add_special_tokens=False)["input_ids"]]
    _, comps, lps, _ = vg.generate(prompts=prompts, images=None, num_generations=1)
    gap = 0.0
    for p, c, lp in zip(prompts, comps, lps):
        hf = torch.tensor(_policy_logprobs(trainer, p, c))
        gap = max(gap, float((hf - torch.tensor([x[0] for x in lp])).abs().max()))
    return {"step": trainer.state.global_step, "max_gap": gap}


def _embed_moved(trainer, initial_model) -> float:
    from peft import PeftModel

    m = trainer.model
    base = m.get_base_model() if isinstance(m, PeftModel) else m
    w = base.get_input_embeddings().weight.detach()
    return float((w - initial_model.get_input_embeddings().weight.detach()).abs().max())


def grpo(work: Path, p: dict) -> dict:
    from mechreward.models import load_model
    from mechreward.vllm_backend import close_vllm

    initial, tok = load_model("organism", device="cpu")
    mode = p.get("mode", "colocate")
    results = {}
    server = None
    port = None
    try:
        if mode == "server":
            server, port = _start_server(work)
        for lora in p.get("lora", [False]):
            lr = p.get("lora_lr", 2e-2) if lora else p.get("lr", 3e-3)  # large enough that one step moves log-probs
            trainer, mech, layer = _grpo_trainer(work / f"lora{int(lora)}", lora, mode, port, lr=lr,
                                                 steps=p.get("steps", 2))
            log = _instrument(trainer, mech, layer, initial)
            trainer.train()
            final = _final_check(trainer, tok)
            results[f"lora={lora}"] = {
                "compat": trainer.vllm_compat, "capture_log": list(trainer.mech_capture_log), **log, "final": final,
                "embed_moved": _embed_moved(trainer, initial), "tied": bool(initial.config.tie_word_embeddings),
                "global_step": trainer.state.global_step, "closed": close_vllm(trainer),
                "logp_diff_max_logged": [r.get("sampling/sampling_logp_difference/max")
                                         for r in trainer.state.log_history if "sampling/sampling_logp_difference/max" in r],
            }
            del trainer
    finally:
        if server is not None:
            _stop(server)
    from mechreward.distributed import shutdown

    shutdown()  # as the hydra commands end: the default process group goes before the interpreter exits
    results["server_port"] = port
    return results


# --------------------------------------------------------------------------- GRPO on SmolLM2 (a real model)

def smollm2_grpo(work: Path, p: dict) -> dict:
    """G2's path on SmolLM2-135M-Instruct at small size: TRL colocate + LoRA, the look-up task with the chat
    template, an SAE reward at layer 15 (a random TopK SAE: the capture check needs no trained one), G2's mid-run
    held-out curve point after step 1, vLLM vs HF log-probs of the policy at every generation and after the last
    step."""
    from datasets import Dataset
    from peft import LoraConfig

    from mechreward.g2 import _curve_callback, evaluate_heldout
    from mechreward.gates.g2 import G2Protocol
    from mechreward.grpo import HackingMonitor, MechGRPOTrainer, evaluate_policy, grpo_config
    from mechreward.models import load_model
    from mechreward.probe import FeaturePack
    from mechreward.prompts import PromptFormat, encode_prompt
    from mechreward.reward import OutcomeReward, SAEFeatureReward
    from mechreward.rollouts import sae_reference
    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae, save_sae
    from mechreward.tasks import TaskConfig, load_task
    from mechreward.vllm_backend import close_vllm, synced_llm

    name, layer, steps = "smollm2-135m-instruct", 15, p.get("steps", 2)
    initial, tok = load_model(name, device="cpu")
    model, _ = load_model(name, device="cpu")
    sae = load_sae(save_sae(SparseAutoencoder.from_config(SAEConfig(initial.config.hidden_size, 1024, 16,
                                                                    metadata={"layer": layer, "model": name}), seed=2),
                            work / "sae"))
    feats = [{"index": i, "weight": (-1.0) ** i} for i in range(0, 20 * 7, 7)]
    pack = FeaturePack(model=name, layer=layer, hook=f"model.layers.{layer}", sae=sae_reference(sae), features=feats,
                       normalisation={"mean": 0.0, "std": 1.0})
    mech = SAEFeatureReward(pack, sae)
    fmt = PromptFormat(chat_template=True).resolve(tok)
    task = load_task(TaskConfig(name="lookup", split="train", n=16))
    eval_task = load_task(TaskConfig(name="lookup", split="eval", n=16))
    ds = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in task.questions])
    proto = G2Protocol(n_eval=16, eval_samples=2, temperature=0.5, eval_max_new_tokens=24, eval_every=1,
                       eval_batch_size=32)
    curve: list[dict] = []
    curve_hf: list[dict] = []
    held: list = []
    args = grpo_config(dict(output_dir=str(work / "out"), per_device_train_batch_size=8, num_generations=4,
                            max_steps=steps, learning_rate=p.get("lr", 1e-3), beta=0.0, max_completion_length=24,
                            temperature=0.5, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                            bf16=False, seed=0, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=512))
    trainer = MechGRPOTrainer(model, reward_funcs=[OutcomeReward(task), mech], args=args, train_dataset=ds,
                              processing_class=tok, prompt_format=fmt,
                              peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                              callbacks=[_curve_callback(tok, eval_task.questions, eval_task, proto, curve, lambda pt: None,
                                                         prompt_format=fmt, llm_source=lambda: synced_llm(held[0])),
                                         _curve_callback(tok, eval_task.questions, eval_task, proto, curve_hf,
                                                         lambda pt: None, prompt_format=fmt)])
    held.append(trainer)
    log = _instrument(trainer, mech, layer, initial)
    trainer.train()
    # the trained policy through both engines: greedy completions, and sampled accuracy (4 samples per question)
    qs = eval_task.questions
    kw = dict(max_new_tokens=24, prompt_format=fmt, temperature=0.5, seed=7)
    engines = {"hf": None, "vllm": synced_llm(trainer)}
    greedy = {k: evaluate_policy(trainer.model, tok, qs, eval_task, greedy=True, llm=v, **kw) for k, v in engines.items()}
    sampled = {k: evaluate_policy(trainer.model, tok, qs, eval_task, greedy=False, n=4, llm=v, **kw)
               for k, v in engines.items()}
    engine_check = {"greedy_same": sum(a == b for a, b in zip(greedy["hf"]["completion_ids"],
                                                              greedy["vllm"]["completion_ids"])),
                    "greedy_acc": {k: g["accuracy"] for k, g in greedy.items()},
                    "sampled_acc": {k: g["accuracy"] for k, g in sampled.items()},
                    "n_sampled": sampled["hf"]["n"], "n_greedy": greedy["hf"]["n"],
                    # rl's hacking monitor through either engine (greedy held-out accuracy and mech score)
                    "monitor": {k: HackingMonitor(tok, eval_task, qs, mech, every=1, max_new_tokens=24, prompt_format=fmt,
                                                  llm_source=None if v is None else (lambda: synced_llm(trainer))
                                                  ).evaluate(trainer.model, trainer.state.global_step)
                                for k, v in engines.items()}}
    vg = trainer.vllm_generation
    vg.sync_weights()
    prompts = [encode_prompt(tok, fmt, q.prompt) for q in eval_task.questions[:2]]
    _, comps, lps, _ = vg.generate(prompts=prompts, images=None, num_generations=1)
    final_gap = 0.0
    for pr, c, lp in zip(prompts, comps, lps):
        hf = torch.tensor(_policy_logprobs(trainer, pr, c))
        final_gap = max(final_gap, float((hf - torch.tensor([x[0] for x in lp])).abs().max()))
    after = evaluate_heldout(trainer.model, tok, eval_task.questions, eval_task, proto, prompt_format=fmt)
    before = evaluate_heldout(initial, tok, eval_task.questions, eval_task, proto, prompt_format=fmt)
    out = {"compat": trainer.vllm_compat, "capture_log": list(trainer.mech_capture_log), **log,
           "final": {"step": trainer.state.global_step, "max_gap": final_gap, "n_tokens": sum(map(len, comps))},
           "global_step": trainer.state.global_step, "curve": curve, "curve_hf": curve_hf, "engines": engine_check,
           "before": {"sampled": float(before["sampled"].mean()), "greedy": float(before["greedy"].mean()),
                      "n_no_answer": before["n_no_answer"]},
           "after": {"sampled": float(after["sampled"].mean()), "greedy": float(after["greedy"].mean()),
                     "n_no_answer": after["n_no_answer"]},
           "n_eval": len(eval_task.questions), "closed": close_vllm(trainer)}
    from mechreward.distributed import shutdown

    shutdown()
    return out


# --------------------------------------------------------------------------- server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(work: Path, timeout: float = 420.0):
    import urllib.request

    from mechreward.models import resolve_model_path
    from mechreward.vllm_backend import server_command

    port = _free_port()
    argv, env = server_command(resolve_model_path("organism"), port=port, python=sys.executable,
                               extra=["--max-model-len", "256"])
    log = open(work / "server.log", "w")
    env = {**os.environ, **env, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{(work / 'server.log').read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(1.0)
    _stop(proc)
    raise RuntimeError(f"vLLM server not up after {timeout} s:\n{(work / 'server.log').read_text()[-4000:]}")


def _stop(proc) -> None:
    """Stop the server by its pid (its process group: the engine core is its child)."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


SCENARIOS = {"rollouts": rollouts, "grpo": grpo, "smollm2_grpo": smollm2_grpo}

if __name__ == "__main__":
    name, result, work, params = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    res = SCENARIOS[name](work, params)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, result)
