"""`python -m mechreward.features`: what each SAE feature is, on a corpus and/or a rollout set.

Per feature (latent):

- fire rate (fraction of tokens with a non-zero code), mean activation when it fires, max;
- density class: `dead` (never fires), `rare` (below 0.5%), `healthy` ([0.5%, 30%], the range
  of `mechreward.sae.evaluate.HEALTHY_RANGE`), `dense` (above 30%);
- top-N activating contexts: the token with a window of tokens either side, and the feature's
  activation on every token of the window;
- with rollouts: correctness AUROC and Cohen's d of its pooled code (correct vs wrong), and
  its fire rate over responses;
- logit effect of its decoder direction: `W_U · norm_f(d_i)`, the unembedding applied to the
  decoder row passed through the model's final norm alone. For an RMSNorm that is
  `γ ⊙ d_i / rms(d_i)`: the per-dimension gain γ is kept (it reweights dimensions, so it changes
  which tokens win), while the 1/rms factor is a positive constant per feature and changes no
  ranking. Models without a final norm use `W_U · d_i`.

Streaming with bounded memory: codes are computed batch by batch, and each feature keeps only
its top-N contexts (a per-feature heap realised as one `[d_sae, N]` tensor merged with each
batch's per-feature top-N by `torch.topk`, no Python loop over tokens or features).

Outputs in the run dir: `features.json` (one row per feature, contexts included),
`report.json` / `report.md`, `feature_density.png`, and the static feature browser
(`browser/index.html`, see `mechreward.browser`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from . import io, stats
from .activations import FilterConfig
from .cli import hydra_command
from .data import DataConfig, iter_texts, pack
from .errors import ConfigError, DataError
from .models import ModelConfig, ResidualCapture, find_final_norm, load_model, num_layers, unwrap
from .rollouts import SAERef, layers_sae, load_sae_for, sae_reference
from .run import Run, markdown_table, progress
from .sae.evaluate import HEALTHY_RANGE, density_histogram_figure

DENSITY_CLASSES = ("dead", "rare", "healthy", "dense")


def density_class(fire_rate: np.ndarray) -> np.ndarray:
    """`dead` (0), `rare` (< 0.5%), `healthy` ([0.5%, 30%]), `dense` (> 30%) per feature."""
    r = np.asarray(fire_rate, dtype=np.float64)
    lo, hi = HEALTHY_RANGE
    out = np.full(r.shape, "healthy", dtype=object)
    out[r == 0] = "dead"
    out[(r > 0) & (r < lo)] = "rare"
    out[r > hi] = "dense"
    return out


# --------------------------------------------------------------------------- streaming statistics

class TopContexts(NamedTuple):
    """The top-N contexts of every feature (entries with value 0 are empty slots)."""

    values: torch.Tensor
    """`[d_sae, N]` activation at the centre token, descending per feature."""
    token_ids: torch.Tensor
    """`[d_sae, N, 2w+1]` token ids of the window (−1 outside the sequence)."""
    acts: torch.Tensor
    """`[d_sae, N, 2w+1]` the feature's activation on each window token (0 outside)."""
    source: torch.Tensor
    """`[d_sae, N, 2]` (sequence number, position) of the centre token."""


class FeatureCounter:
    """Streaming per-feature counts, sums and top-N contexts over token batches.

    `update(input_ids [B, T], codes [B, T, d_sae], keep [B, T])` adds one batch; tokens with
    `keep` False (padding, prompts, filtered tokens) count nowhere. Memory is
    O(d_sae · N · (2w+1)) whatever the corpus size.
    """

    def __init__(self, d_sae: int, top_n: int = 20, window: int = 8):
        if top_n < 1 or window < 0:
            raise ConfigError(f"top_n must be >= 1 and window >= 0, got top_n={top_n}, window={window}")
        self.d_sae, self.top_n, self.window = d_sae, top_n, window
        W = 2 * window + 1
        self.n_tokens = 0
        self.n_sequences = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.act_max = torch.zeros(d_sae, dtype=torch.float32)
        self.top = TopContexts(torch.zeros(d_sae, top_n), torch.full((d_sae, top_n, W), -1, dtype=torch.int64),
                               torch.zeros(d_sae, top_n, W), torch.full((d_sae, top_n, 2), -1, dtype=torch.int64))

    @torch.no_grad()
    def update(self, input_ids: torch.Tensor, codes: torch.Tensor, keep: torch.Tensor) -> None:
        B, T = input_ids.shape
        if codes.shape != (B, T, self.d_sae):
            raise DataError(f"codes have shape {tuple(codes.shape)}, expected {(B, T, self.d_sae)}")
        input_ids, keep = input_ids.cpu(), keep.cpu().bool()
        codes = codes.detach().float().cpu() * keep[..., None]  # [B, T, F], zero where not kept
        flat = codes.reshape(B * T, self.d_sae)
        self.n_tokens += int(keep.sum())
        self.fire_count += (flat != 0).sum(0)
        self.act_sum += flat.sum(0, dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, flat.max(0).values)
        # This batch's top-N per feature, then merge with the running top-N.
        k = min(self.top_n, B * T)
        bv, bi = flat.topk(k, dim=0)  # [k, F]
        bv, bi = bv.T.contiguous(), bi.T.contiguous()  # [F, k]
        seq, pos = bi // T, bi % T
        offs = torch.arange(-self.window, self.window + 1)
        wpos = pos[..., None] + offs  # [F, k, W]
        valid = (wpos >= 0) & (wpos < T)
        wpos_c = wpos.clamp(0, T - 1)
        wseq = seq[..., None].expand_as(wpos)
        ids = torch.where(valid, input_ids[wseq, wpos_c], torch.full_like(wpos, -1))
        feat = torch.arange(self.d_sae)[:, None, None].expand_as(wpos)
        acts = torch.where(valid, codes[wseq, wpos_c, feat], torch.zeros(()))
        src = torch.stack([seq + self.n_sequences, pos], dim=-1)  # [F, k, 2]
        self.n_sequences += B
        allv = torch.cat([self.top.values, bv], 1)
        best, order = allv.topk(self.top_n, dim=1)  # [F, N]; ties keep the earlier (running) entry first

        def pick(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            both = torch.cat([old, new], 1)
            idx = order.reshape(*order.shape, *([1] * (both.ndim - 2))).expand(-1, -1, *both.shape[2:])
            return both.gather(1, idx)

        self.top = TopContexts(best, pick(self.top.token_ids, ids), pick(self.top.acts, acts),
                               pick(self.top.source, src))

    @property
    def fire_rate(self) -> np.ndarray:
        return (self.fire_count.double() / max(self.n_tokens, 1)).numpy()

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean code over the tokens where the feature fires (0 for dead features)."""
        c = self.fire_count.double()
        return torch.where(c > 0, self.act_sum / c.clamp_min(1), torch.zeros(())).numpy()


# --------------------------------------------------------------------------- token batches

def corpus_batches(tokenizer, data: DataConfig, tokens: int, heldout: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [B, T], keep [B, T]) over about `tokens` tokens of packed corpus text.

    `heldout` draws the organism's text from its evaluation split (text the SAE never saw).
    """
    n_rows = max(1, -(-tokens // data.context_length))
    rows = itertools.islice(pack(tokenizer, iter_texts(data, heldout=heldout), data.context_length), n_rows)
    got = 0
    while True:
        chunk = list(itertools.islice(rows, data.batch_size))
        if not chunk:
            break
        got += len(chunk)
        ids = torch.tensor(chunk, dtype=torch.long)
        yield ids, torch.ones_like(ids, dtype=torch.bool)
    if got == 0:
        raise DataError(f"corpus {data.source!r} gave no sequences of {data.context_length} tokens")


def rollout_batches(records: Sequence[dict], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded prompt+completion ids of rollout records; keep = completion tokens only."""
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        rows = [r["prompt_ids"] + r["completion_ids"] for r in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, (rec, row) in enumerate(zip(chunk, rows)):
            ids[b, :len(row)] = torch.tensor(row)
            keep[b, len(rec["prompt_ids"]):len(row)] = True
        yield ids, keep


def special_keep(input_ids: torch.Tensor, keep: torch.Tensor, filters: FilterConfig, special_ids: Sequence[int]) -> torch.Tensor:
    """Apply the token filters of SAE training that need no activations (first position, specials)."""
    keep = keep.clone()
    if filters.drop_first_position:
        keep[:, 0] = False
    if filters.drop_special and special_ids:
        keep &= ~torch.isin(input_ids, torch.tensor(list(special_ids), dtype=input_ids.dtype))
    return keep


@torch.no_grad()
def count_features(model, sae, layer: int, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   counter: FeatureCounter, filters: FilterConfig | None = None, special_ids: Sequence[int] = (),
                   total: int | None = None, desc: str = "features") -> FeatureCounter:
    """Run the model over `batches` (early exit at `layer`), encode with the SAE, update `counter`."""
    device = next(model.parameters()).device
    filters = filters or FilterConfig(outlier_factor=0.0)

    def transform(_, hidden):
        return sae.encode_dense(hidden.to(sae.dtype))  # [B, T, d_sae], the SAE's exact encoding

    cap = ResidualCapture(model, [layer], transform=transform, early_exit=True)
    bar = progress(total=total, desc=desc, unit="tok")
    for ids, keep in batches:
        keep = special_keep(ids, keep, filters, special_ids)
        attn = torch.ones_like(ids)
        codes = cap.run(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)[layer]
        counter.update(ids, codes, keep)
        bar.update(int(keep.sum()))
    bar.close()
    return counter


# --------------------------------------------------------------------------- logit effect

@torch.no_grad()
def logit_effects(model, sae, top: int = 10, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top promoted and suppressed tokens of each decoder direction: `W_U · norm_f(W_dec[i])`.

    Returns (promoted_ids [d_sae, top], promoted_logits, suppressed_ids [d_sae, top],
    suppressed_logits); see the module docstring for the choice of norm.
    """
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(unwrap(model)).__name__} has no output embeddings (unembedding)")
    norm = find_final_norm(model)
    W_U = head.weight.detach().float().cpu()  # [vocab, d_model]
    top = min(top, W_U.shape[0])
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    W_dec = sae.W_dec.detach().float().cpu()  # [d_sae, d_model]
    if norm is not None:
        p = next(norm.parameters(), None)
        dev, dt = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    for start in range(0, W_dec.shape[0], chunk):
        d = W_dec[start:start + chunk]
        if norm is not None:
            d = norm(d.to(dev, dt)).float().cpu()
        logits = d @ W_U.T  # [chunk, vocab]
        pv, pi = logits.topk(top, dim=1)
        sv, si = (-logits).topk(top, dim=1)
        for o, t in zip(outs, (pi, pv, si, -sv)):
            o.append(t)
    return tuple(torch.cat(o) for o in outs)  # type: ignore[return-value]


# --------------------------------------------------------------------------- the feature table

class TokenText:
    """id → display text of one token (cached; `decode([id])`, so byte-level BPE shows real text)."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}
        self.separators = {int(i) for i in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
                           if i is not None}
        """Ids that separate documents in packed text (never shown as text inside a context)."""

    def __call__(self, i: int) -> str:
        if i < 0:
            return ""
        if i not in self.cache:
            self.cache[i] = self.tok.decode([int(i)], skip_special_tokens=False)
        return self.cache[i]

    def context(self, ids: Sequence[int]) -> list[str]:
        """Display text per token of a run of ids, with no character split across tokens.

        Byte-level BPE can cut one character's UTF-8 bytes over several tokens; decoding each alone
        gives U+FFFD. Here the tokens of an incomplete character show "" and the token that
        completes it shows the whole character; bytes of a character cut by the start (or end)
        of the window are dropped."""
        out, pending = [], []
        for x in ids:
            pending.append(int(x))
            s = self.tok.decode(pending, skip_special_tokens=False)
            if s.endswith("\ufffd") and len(pending) < 4:
                out.append("")
                continue
            out.append(s.replace("\ufffd", ""))
            pending = []
        return out


@dataclass
class RolloutStats:
    """Per-feature statistics of pooled codes over a rollout set (correct vs wrong)."""

    auroc: np.ndarray
    d: np.ndarray
    fire_rate: np.ndarray
    """Fraction of responses where the pooled code is non-zero."""
    n_responses: int
    n_correct: int
    pooling: str


def rollout_stats(pooled: np.ndarray, labels: np.ndarray, pooling: str) -> RolloutStats:
    """AUROC (correct = positive) and Cohen's d per feature of pooled codes `[R, d_sae]`."""
    lab = np.asarray(labels).astype(int)
    if lab.min() == lab.max():
        raise DataError(f"all {lab.size} rollouts are {'correct' if lab[0] else 'wrong'}: "
                        "correctness AUROC needs both classes")
    x = np.asarray(pooled, dtype=np.float64)
    return RolloutStats(auroc=np.asarray(stats.auroc(x, lab)), d=stats.cohens_d(x[lab == 1], x[lab == 0]),
                        fire_rate=(x != 0).mean(0), n_responses=int(lab.size), n_correct=int(lab.sum()),
                        pooling=pooling)


def document_span(ids: Sequence[int], center: int, separators: set[int]) -> tuple[int, int]:
    """[lo, hi) of the window `ids` (−1 = outside the sequence) that holds the centre token's own
    document: the window stops before a document separator (EOS/BOS/pad of packed text) on
    either side of the centre, so no separator is shown as text and no other document leaks in."""
    lo = next(t for t, x in enumerate(ids) if x >= 0)
    hi = len(ids) - next(t for t, x in enumerate(reversed(ids)) if x >= 0)
    if ids[center] in separators:
        return lo, hi
    for t in range(center - 1, lo - 1, -1):
        if ids[t] in separators:
            lo = t + 1
            break
    for t in range(center + 1, hi):
        if ids[t] in separators:
            hi = t
            break
    return lo, hi


def feature_rows(counter: FeatureCounter | None, effects, text: TokenText, roll: RolloutStats | None = None,
                 pack=None, d_sae: int | None = None) -> list[dict]:
    """One JSON-ready dict per feature: statistics, density class, contexts, logit effect, pack role."""
    d_sae = counter.d_sae if counter is not None else d_sae
    roles = {}
    if pack is not None:
        roles = {int(f["index"]): (f.get("role") or ("helpful" if f["weight"] > 0 else "harmful"), float(f["weight"]))
                 for f in pack.features}
    rows = []
    if counter is not None:
        rate, mean, mx = counter.fire_rate, counter.mean_activation, counter.act_max.numpy()
        cls = density_class(rate)
        top = counter.top
    p_ids, p_val, s_ids, s_val = (t.tolist() for t in effects) if effects is not None else ([None] * d_sae,) * 4
    for i in range(d_sae):
        row: dict = {"index": i}
        if counter is not None:
            row.update(fire_rate=float(rate[i]), mean_activation=float(mean[i]), max_activation=float(mx[i]),
                       density=str(cls[i]))
            ctxs = []
            vals = top.values[i].tolist()
            for j in range(counter.top_n):
                if vals[j] <= 0:
                    break
                ids = top.token_ids[i, j].tolist()
                acts = top.acts[i, j].tolist()
                lo, hi = document_span(ids, counter.window, text.separators)
                ctxs.append({"activation": round(vals[j], 5), "center": counter.window - lo,
                             "tokens": text.context(ids[lo:hi]), "acts": [round(a, 4) for a in acts[lo:hi]],
                             "source": top.source[i, j].tolist()})
            row["contexts"] = ctxs
        if roll is not None:
            row.update(auroc=float(roll.auroc[i]), d=float(roll.d[i]), rollout_fire_rate=float(roll.fire_rate[i]))
        if p_ids[0] is not None:
            row["promoted"] = [[text(t), round(v, 4)] for t, v in zip(p_ids[i], p_val[i])]
            row["suppressed"] = [[text(t), round(v, 4)] for t, v in zip(s_ids[i], s_val[i])]
        role = roles.get(i)
        row["pack_role"] = role[0] if role else None
        row["pack_weight"] = role[1] if role else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- inspect one text

@torch.no_grad()
def inspect_text(model, tokenizer, sae, layer: int, text: str, top: int = 5) -> list[dict]:
    """Per token of `text`: its top `top` features (index, activation) under the SAE's exact encoding.

    Backs `mechreward inspect "some text"`. Tokens where fewer than `top` features fire list only those that do.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"{text!r} is empty after tokenisation")
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    h = ResidualCapture(model, [layer], early_exit=True).run(input_ids=x, use_cache=False)[layer][0]  # [T, d]
    z = sae.encode_dense(h.to(sae.dtype)).float().cpu()  # [T, d_sae]
    vals, idx = z.topk(min(top, z.shape[1]), dim=-1)
    name = TokenText(tokenizer)
    norms = h.float().norm(dim=-1).cpu()
    shown = name.context(ids)
    median = float(norms.median()) if len(ids) > 1 else float("nan")
    return [{"position": t, "token_id": int(tok), "token": shown[t], "norm": float(norms[t]),
             "outlier": bool(len(ids) > 1 and float(norms[t]) > INSPECT_OUTLIER_FACTOR * median),
             "features": [(int(i), float(v)) for i, v in zip(idx[t].tolist(), vals[t].tolist()) if v > 0]}
            for t, tok in enumerate(ids)]


INSPECT_OUTLIER_FACTOR = 5.0
"""`inspect` marks a token whose residual norm exceeds this many times the text's median norm
(typically the first position, an attention sink, which SAE training drops)."""


def format_inspection(rows: list[dict]) -> str:
    """One line per token: position, the token (repr), then `feature:activation` pairs; tokens with
    an outlier residual norm are marked `!` with their norm (their codes are out of distribution)."""
    width = max(len(repr(r["token"])) for r in rows)
    lines = []
    for r in rows:
        mark = f"  ! norm {r['norm']:.0f} > {INSPECT_OUTLIER_FACTOR:g}x median (outlier: SAE training drops such tokens)" \
            if r.get("outlier") else ""
        lines.append(f"{r['position']:>4}{'!' if r.get('outlier') else ' '} {repr(r['token']).ljust(width)}  " +
                     ("  ".join(f"{i}:{v:.3f}" for i, v in r["features"]) or "(no feature fires)") + mark)
    return "\n".join(lines)


# --------------------------------------------------------------------------- command

@dataclass
class FeaturesConfig:
    """Config of `python -m mechreward.features` (conf/features.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus (`data.source`); the organism's text comes from its evaluation split."""
    sae: SAERef = field(default_factory=SAERef)
    """`sae.path`: SAE directory (any format) or `organism`. Its recorded layer is the one hooked."""
    tokens: int = 100_000
    """Corpus tokens to characterise features on; 0 = no corpus (then contexts come from the rollouts)."""
    rollouts: str | None = None
    """Rollout directory with this SAE's pooled codes: adds correctness AUROC and d per feature."""
    pack: str | None = None
    """Feature pack to mark helpful/harmful features in the table and browser."""
    g1_run: str | None = None
    """G1 run dir whose plots the browser's overview shows; null = the pack's directory when it has them."""
    pooling: str = "mean"
    """Pooling of rollout codes for AUROC (mean, max, last, sum)."""
    filters: FilterConfig = field(default_factory=lambda: FilterConfig(outlier_factor=0.0))
    """Tokens that count nowhere (first position, specials), as in SAE training."""
    top_n: int = 20
    """Top-activating contexts kept per feature."""
    window: int = 12
    """Tokens shown on each side of a context's centre token."""
    logit_top: int = 10
    """Promoted / suppressed tokens listed per feature."""
    browser: bool = True
    """Write the static feature browser into `<run dir>/browser/`."""
    seed: int = 0


def characterize(cfg: FeaturesConfig, run: Run, model=None, tokenizer=None, sae=None) -> dict:
    """The work of the command (model / tokenizer / SAE may be passed in from Python)."""
    from .probe import FeaturePack
    from .rollouts import RolloutSet

    t0 = time.time()
    from .corpora import real_model_data_default

    defaulted = cfg.tokens > 0 and real_model_data_default(cfg.data, cfg.model.name_or_path, "features")
    if model is None:
        model, tokenizer = load_model(cfg.model)
    if sae is None:
        sae = load_sae_for(cfg.sae.path, model, run)
    n_layers = num_layers(model)
    layer = layers_sae(sae, n_layers)
    if cfg.tokens <= 0 and not cfg.rollouts:
        raise ConfigError("nothing to characterise features on: set tokens > 0 (a corpus) and/or rollouts=<dir>")
    special = sorted({i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
                      if i is not None})
    rs = roll = None
    if cfg.rollouts:
        rs = RolloutSet(cfg.rollouts)
        sha = sae.cfg.metadata.get("sha256")
        rs.check(sae_sha256=sha if rs.sae_sha256 is not None else None, layer=layer)
        if rs.sae_sha256 is not None and rs.sae_sha256 == sha:
            pooled = rs.codes(cfg.pooling).numpy()
        else:  # rollouts made without (this) SAE: encode their pooled codes anew from the exact ids
            pooled = _pool_rollout_codes(model, sae, layer, rs.records, cfg.pooling, tokenizer)
        roll = rollout_stats(pooled, rs.labels, cfg.pooling)
    counter = FeatureCounter(sae.cfg.d_sae, cfg.top_n, cfg.window)
    if cfg.tokens > 0:
        batches = corpus_batches(tokenizer, cfg.data, cfg.tokens)
        what = f"corpus `{cfg.data.source}` ({'evaluation split' if cfg.data.source == 'organism' else 'as given'})"
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = rollout_batches(rs.records, cfg.data.batch_size, pad)
        what = f"completion tokens of the rollouts in `{rs.dir}`"
    count_features(model, sae, layer, batches, counter, cfg.filters, special, total=cfg.tokens or None)
    if counter.n_tokens == 0:
        raise DataError("no tokens left after filtering; nothing to characterise")
    effects = logit_effects(model, sae, cfg.logit_top)
    pack_obj = FeaturePack.load(cfg.pack) if cfg.pack else None
    if pack_obj is not None:
        pack_obj.check(sae)
    rows = feature_rows(counter, effects, TokenText(tokenizer), roll, pack_obj)
    classes = {c: int(sum(r["density"] == c for r in rows)) for c in DENSITY_CLASSES}
    write_compact_json(run.path("features.json"), {
        "sae": sae_reference(sae), "layer": layer, "model": cfg.model.name_or_path, "tokens": counter.n_tokens,
        "token_source": what, "top_n": cfg.top_n, "window": cfg.window, "healthy_range": list(HEALTHY_RANGE),
        "logit_effect": LOGIT_EFFECT, "rollouts": None if rs is None else {
            "dir": str(rs.dir), "n_responses": roll.n_responses, "n_correct": roll.n_correct, "pooling": roll.pooling},
        "pack": cfg.pack, "features": rows})
    run.save_figure(density_histogram_figure(torch.from_numpy(counter.fire_rate)), "feature_density.png")
    report = {"features_path": str(run.path("features.json")), "model": cfg.model.name_or_path, "layer": layer,
              "sae": sae_reference(sae), "tokens": counter.n_tokens, "token_source": what,
              "density_classes": classes, "healthy_fraction": classes["healthy"] / sae.cfg.d_sae,
              "dead_fraction": classes["dead"] / sae.cfg.d_sae, "logit_effect": LOGIT_EFFECT,
              "data_source": cfg.data.source if cfg.tokens > 0 else None, "data_source_defaulted": defaulted}
    if roll is not None:
        order = np.argsort(-np.abs(roll.auroc - 0.5))[:10]
        report["rollouts"] = {"dir": str(rs.dir), "n_responses": roll.n_responses, "n_correct": roll.n_correct,
                              "pooling": roll.pooling, "max_auroc": float(np.max(roll.auroc)),
                              "min_auroc": float(np.min(roll.auroc)),
                              "top_by_auroc": [{"index": int(i), "auroc": float(roll.auroc[i]), "d": float(roll.d[i])}
                                               for i in order]}
    if cfg.browser:
        from .browser import write_browser

        g1_dir = Path(cfg.g1_run) if cfg.g1_run else (Path(cfg.pack).parent if cfg.pack else None)
        report["browser"] = str(write_browser(run.dir, rows, report, g1_dir=g1_dir,
                                              images=[run.path("feature_density.png")]))
    report["seconds"] = round(time.time() - t0, 1)
    run.write_report(report, _markdown(report, rows))
    return report


def write_compact_json(path: Path, obj: dict) -> None:
    """JSON without indentation: features.json holds every context of every feature."""
    import json

    io.write_text(path, json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n")


LOGIT_EFFECT = ("W_U · final_norm(W_dec[i]): the unembedding applied to the decoder row passed through the final "
                "norm alone (gain kept; the 1/rms scale is a positive per-feature constant and changes no ranking)")


@torch.no_grad()
def _pool_rollout_codes(model, sae, layer: int, records: Sequence[dict], pooling: str, tokenizer) -> np.ndarray:
    from .rollouts import pool_dense

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    cap = ResidualCapture(model, [layer], early_exit=True)
    out = []
    for ids, keep in rollout_batches(records, 16, pad):
        h = cap.run(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=False)[layer]
        z = sae.encode_dense(h.to(sae.dtype)).cpu()  # [B, T, d_sae]
        for b in range(ids.shape[0]):
            out.append(pool_dense(z[b][keep[b]], pooling).numpy())
    return np.stack(out)


def _markdown(report: dict, rows: list[dict]) -> str:
    c = report["density_classes"]
    alive = [r for r in rows if r["density"] != "dead"]
    top = sorted(alive, key=lambda r: -r["fire_rate"])[:15]
    lines = ["# Feature characterisation", "",
             f"model `{report['model']}`, layer {report['layer']}, SAE `{(report['sae'] or {}).get('path')}` "
             f"(d_sae {(report['sae'] or {}).get('d_sae')}), {report['tokens']:,} tokens of {report['token_source']}.", "",
             f"Density: {c['dead']} dead, {c['rare']} rare (< 0.5%), {c['healthy']} healthy ([0.5%, 30%]), "
             f"{c['dense']} dense (> 30%).", "", f"Logit effect: {report['logit_effect']}.", ""]
    if "browser" in report:
        lines += [f"Feature browser: [{report['browser']}](browser/index.html) (open from disk).", ""]
    if "rollouts" in report:
        r = report["rollouts"]
        lines += [f"Rollouts `{r['dir']}`: {r['n_responses']} responses, {r['n_correct']} correct; "
                  f"{r['pooling']}-pooled correctness AUROC ranges {r['min_auroc']:.3f} … {r['max_auroc']:.3f}.", "",
                  markdown_table(r["top_by_auroc"]), ""]

    def ctx(r):
        if not r["contexts"]:
            return ""
        c0 = r["contexts"][0]
        t = list(c0["tokens"])
        t[c0["center"]] = f"[{t[c0['center']]}]"
        return "".join(t).replace("\n", "⏎").replace("|", "\\|")

    table = [{"index": r["index"], "fire_rate": r["fire_rate"], "mean_activation": r["mean_activation"],
              "density": r["density"], "top context": ctx(r),
              "promotes": " ".join(repr(t) for t, _ in r.get("promoted", [])[:5]).replace("|", "\\|")} for r in top]
    lines += ["Most frequent alive features:", "", markdown_table(table), "![feature density](feature_density.png)", ""]
    return "\n".join(lines)


def run_features(cfg: FeaturesConfig, run: Run) -> dict:
    report = characterize(cfg, run)
    c = report["density_classes"]
    print(f"features: {c}; browser {report.get('browser')}")
    return report


main = hydra_command("features", FeaturesConfig, run_features)

if __name__ == "__main__":
    main()
