"""`python -m mechreward.demo`: the whole method end to end on the built-in organisms, offline, on a CPU.

conf/demo.yaml runs the chain twice (`controls`): on the planted organism (positive control: a
solving mode planted per sample, ground truth known per completion; docs/positive_control.md) and on
the organism (negative control), and leads with one side-by-side table (G1 verdict and flags,
within-question AUROC of the pack and of each cheap signal, the best pack latent against the true
mode, G2's R0 gain, R1−R0 and R1−R2 with CIs) and a sentence computed from those numbers. With
`controls=[]` the chain runs once on `model` and `task`, as below.

Stages (each a real command run into its own run dir):

    sae_train   train a TopK SAE on the organism's residual stream at `layer`
    layermap    S4-L0: which layer separates correct from wrong responses (reported next to `layer`)
    rollouts    sample and grade several responses per question, SAE codes on the exact sampled ids
    probe       contrastive feature pack on the discovery questions of G1's split
    g1          the correlation gate on the held-out validation questions
    features    feature characterisation + the static feature browser (pack features marked)
    g2          the three-arm RL sanity run (R0 outcome, R1 + SAE pack, R2 + direction)

and one report in the demo's run dir: `report.md` + `report.html` (plots and verdicts, a link
to every stage's run dir) + `report.json`. The report leads with what the gates concluded and
why (`conclusion`): G1's within-question evidence and baselines, G2's power.

Caching: a stage's run dir is `<cache_dir>/<stage>-<hash>`, the hash taken over the stage's
full config (which names the directories of the stages it reads, so a change upstream
re-runs everything downstream) and a fingerprint of the model's files. A stage whose dir holds
a completion marker for that hash is reused, so a rerun is cheap. A failing stage stops the
chain with its error (exit status 2) and leaves the earlier stages' results in place; its own
incomplete dir is cleared and redone on the next run.

Sizes are scaled to fit 8 minutes on 2 idle CPU cores (see conf/demo.yaml).
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import io
from .cli import hydra_command
from .errors import ConfigError, MechrewardError
from .models import ModelConfig, resolve_model_path
from .prompts import PromptFormat
from .run import Run, markdown_table
from .sae_train import SAEShape
from .tasks import TaskConfig

STAGES = ("sae_train", "layermap", "rollouts", "probe", "g1", "features", "g2")
DONE = ".stage-done.json"


@dataclass
class DemoConfig:
    """Config of `python -m mechreward.demo` (conf/demo.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    """Questions for the layer map, rollouts and G1 (arithmetic eval split)."""
    layer: int | None = None
    """SAE layer. Unset: the built-in organism's own (`ORGANISM_LAYERS`); any other model must set it. The layer
    map's recommendation is reported next to it."""
    sae: SAEShape = field(default_factory=lambda: SAEShape(d_sae=1024, k=16))
    sae_tokens: int = 120_000
    sae_batch_size: int = 1024
    layermap_questions: int = 120
    rollout_questions: int = 320
    rollouts_per_question: int = 4
    """Sampled rollouts per question for the probe and G1 (several: G1's within-question statistics need
    questions with both a correct and a wrong rollout)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (and of G2's GRPO rollouts unless `g2.temperature` is given)."""
    max_new_tokens: int = 64
    """New tokens per response in the layer map (greedy) and the rollouts."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    """Prompt format of every stage that prompts the model (chat template, system prompt, template;
    `mechreward.prompts`); G2 takes it from G1's pack."""
    n_discovery: int = 120
    """G1 discovery questions (the probe's pack is built on them); the rest are validation."""
    n_random_packs: int = 200
    n_boot: int = 500
    n_perm: int = 2000
    feature_tokens: int = 30_000
    g2: dict = field(default_factory=lambda: {"steps": 6, "seeds": [0, 1], "eval_every": 0})
    """Overrides of the organism's G2 protocol (`conf/g2.yaml`, `mechreward.g2.organism_protocol()`): a shorter G2
    so that the demo fits 8 minutes: 6 steps, 2 seeds (the fewest that give a seed-to-seed variance and so a
    minimum detectable difference), no mid-run curve point."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in chain order; a stage needs the ones before it (they are run or reused)."""
    cache_dir: str = "runs/demo/stages"
    """Where stage run dirs live, keyed by their config hash (reused across demo runs)."""
    seed: int = 0
    organism_defaults_ok: bool = False
    """Let a model other than the organism run with the organism's task, layer or G2 stage (refused by default)."""
    controls: list[str] = field(default_factory=list)
    """Built-in organisms to run the whole chain on, one after the other, each with its own task
    (`CONTROL_TASKS`), and compare side by side: conf/demo.yaml sets `[organism_planted, organism]`, the
    positive control (a planted solving mode with known ground truth) and the negative control (the natural
    organism). Empty: the chain runs once on `model` and `task`."""


ORGANISM_LAYERS = {"organism": 2, "organism_planted": 4}
"""The SAE layer of each built-in organism: the commit layer of its own layer map (the demo's `layermap` stage
reports it; on the planted organism also its peak and recommended layer). At L2 the planted organism's best pack
latent separates its modes at AUROC 0.68 only (docs/positive_control.md)."""
CONTROL_TASKS = {"organism_planted": "planted", "organism": "arithmetic"}
"""The task each built-in organism runs on in the demo's `controls`."""
CONTROL_ROLES = {"organism_planted": "positive control (planted mode)", "organism": "negative control (natural)"}


# --------------------------------------------------------------------------- caching

def model_fingerprint(name_or_path: str) -> dict:
    """Identity of the model's files: name, and size + sha256 of small files / size + mtime of large ones."""
    path = Path(resolve_model_path(name_or_path))
    out: dict[str, Any] = {"name": name_or_path}
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file():
                st = p.stat()
                if st.st_size <= 64 << 20:
                    out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                else:
                    out[p.name] = f"{st.st_size}:{int(st.st_mtime)}"
    return out


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class StageResult:
    name: str
    dir: Path
    report: dict
    seconds: float
    reused: bool


class Chain:
    """Runs stages into hash-keyed dirs under `root`, reusing completed ones."""

    def __init__(self, root: Path, fingerprint: dict):
        self.root, self.fingerprint = root, fingerprint
        self.results: dict[str, StageResult] = {}
        self.current: tuple[str, Path] | None = None
        """The stage being run (name, dir), for the failure report."""

    def stage(self, name: str, config: dict, fn: Callable[[Run], dict]) -> StageResult:
        key = config_hash({"stage": name, "config": config, "model": self.fingerprint})
        d = (self.root / f"{name}-{key}").resolve()
        marker = d / DONE
        if marker.exists() and (d / "report.json").exists():
            done = json.loads(marker.read_text())
            res = StageResult(name, d, json.loads((d / "report.json").read_text()), done["seconds"], True)
            print(f"demo: {name}: reusing {d} (config hash {key})", file=sys.stderr)
        else:
            if d.exists():  # an earlier attempt that did not finish: start it clean
                shutil.rmtree(d)
            self.current = (name, d)
            run = Run(d, name)
            run.save_config(config)
            print(f"demo: {name}: running into {d}", file=sys.stderr)
            t0 = time.time()
            report = fn(run)
            seconds = round(time.time() - t0, 1)
            io.write_json(marker, {"hash": key, "seconds": seconds, "stage": name})
            res = StageResult(name, d, report, seconds, False)
            self.current = None
        self.results[name] = res
        return res


# --------------------------------------------------------------------------- stages

def _sae_cfg(cfg: DemoConfig):
    from .sae_train import SAETrainRunConfig

    return SAETrainRunConfig(model=cfg.model, layers=[cfg.layer], sae=SAEShape(**asdict(cfg.sae)), tokens=cfg.sae_tokens,
                             batch_size=cfg.sae_batch_size, checkpoint_every=0, name="sae", seed=cfg.seed)


def run_chain(cfg: DemoConfig, run: Run, chain: Chain) -> None:
    """Run (or reuse) every requested stage in order; raises the first stage's error."""
    from .g1 import G1Config, run_g1
    from .gates.g1 import split_questions
    from .layermap import LayermapConfig, run_layermap
    from .probe import ProbeConfig, run_probe
    from .rollouts import RolloutsConfig, RolloutSet, SAERef, SamplingConfig, run_rollouts
    from .sae_train import run_sae_train

    wanted = [s for s in STAGES if s in cfg.stages]
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown demo stages {unknown}; expected a subset of {list(STAGES)}")
    last = STAGES.index(wanted[-1]) if wanted else -1

    def need(name: str) -> bool:
        return STAGES.index(name) <= last

    # 1. SAE
    scfg = _sae_cfg(cfg)
    conf = {k: v for k, v in asdict(scfg).items() if k not in ("output_dir",)}

    def do_sae(r: Run) -> dict:
        scfg.output_dir = str(r.dir)
        return run_sae_train(scfg, r)

    sae_stage = chain.stage("sae_train", conf, do_sae)
    sae_path = str(sae_stage.dir / "sae")
    if not need("layermap"):
        return
    # 2. layer map (greedy, every layer)
    task_lm = TaskConfig(**{**asdict(cfg.task), "n": cfg.layermap_questions})
    lcfg = LayermapConfig(model=cfg.model, task=task_lm, seed=cfg.seed,
                          sampling=SamplingConfig(greedy=True, max_new_tokens=cfg.max_new_tokens, prompt=cfg.prompt))
    chain.stage("layermap", asdict(lcfg), lambda r: run_layermap(lcfg, r))
    if not need("rollouts"):
        return
    # 3. rollouts with the SAE's codes
    task_r = TaskConfig(**{**asdict(cfg.task), "n": cfg.rollout_questions})
    if cfg.rollouts_per_question < 1:
        raise ConfigError(f"rollouts_per_question must be >= 1, got {cfg.rollouts_per_question}")
    sampling = SamplingConfig(n=cfg.rollouts_per_question, temperature=cfg.temperature,
                              max_new_tokens=cfg.max_new_tokens, prompt=cfg.prompt)
    rcfg = RolloutsConfig(model=cfg.model, task=task_r, sampling=sampling,
                          sae=SAERef(sae_path), store_token_codes=False, seed=cfg.seed)

    def do_rollouts(r: Run) -> dict:
        rcfg.output = str(r.path("rollouts"))
        return run_rollouts(rcfg, r)

    roll = chain.stage("rollouts", {**asdict(rcfg), "output": None}, do_rollouts)
    roll_dir = str(roll.dir / "rollouts")
    if not need("probe"):
        return
    # 4. probe on G1's discovery questions (the same split G1 draws)
    def do_probe(r: Run) -> dict:
        rs = RolloutSet(roll_dir)
        disc, _ = split_questions(rs.question_ids.tolist(), cfg.n_discovery, None, cfg.seed)
        return run_probe(ProbeConfig(rollouts=roll_dir, questions=sorted(disc), selection=selection, seed=cfg.seed), r)

    selection = G1Config().selection  # the probe selects as G1 does
    chain.stage("probe", {**asdict(ProbeConfig(rollouts=roll_dir, selection=selection, seed=cfg.seed)),
                          "discovery": "g1 split",
                          "n_discovery": cfg.n_discovery}, do_probe)
    if not need("g1"):
        return
    # 5. G1 on the held-out validation questions
    gcfg = G1Config(model=cfg.model, task=task_r, sae=SAERef(sae_path), rollouts=roll_dir, sampling=sampling,
                    n_discovery=cfg.n_discovery,
                    n_validation=None, n_random_packs=cfg.n_random_packs, n_boot=cfg.n_boot, n_perm=cfg.n_perm,
                    seed=cfg.seed)
    g1 = chain.stage("g1", asdict(gcfg), lambda r: run_g1(gcfg, r))
    pack_path = str(g1.dir / "feature_pack.json")
    if not need("features"):
        return
    # 6. feature characterisation and browser
    from .data import DataConfig
    from .features import FeaturesConfig, characterize

    fcfg = FeaturesConfig(model=cfg.model, data=DataConfig(seed=cfg.seed), sae=SAERef(sae_path),
                          tokens=cfg.feature_tokens, rollouts=roll_dir, pack=pack_path, g1_run=str(g1.dir),
                          seed=cfg.seed)
    chain.stage("features", asdict(fcfg), lambda r: characterize(fcfg, r))
    if not need("g2"):
        return
    # 7. G2
    from .g2 import G2Config, organism_protocol, run_g2
    from .gates.g2 import G2Protocol

    proto = G2Protocol(**{**asdict(organism_protocol()), "temperature": cfg.temperature, **dict(cfg.g2)})
    n_train = proto.steps * proto.questions_per_step
    g2cfg = G2Config(model=cfg.model, pack=pack_path,
                     task=TaskConfig(**{**asdict(cfg.task), "n": cfg.rollout_questions + proto.n_eval}),
                     train_task=TaskConfig(name=cfg.task.name, split="train", n=n_train, seed=cfg.seed),
                     protocol=proto, seed=cfg.seed,
                     # the demo shows G2's machinery even on a pack G1 failed; G2's report and the demo's lead say so
                     allow_failed_pack=True)
    chain.stage("g2", asdict(g2cfg), lambda r: run_g2(g2cfg, r))


# --------------------------------------------------------------------------- the report

PLOTS = {"sae_train": ["training_curve.png", "feature_density_L{layer}.png"], "layermap": ["layermap.png"],
         "g1": ["score_by_outcome.png", "null_distribution.png"], "features": ["feature_density.png"]}


def _f(v, fmt=".3f") -> str:
    return "n/a" if v is None else format(v, fmt) if isinstance(v, (int, float)) else str(v)


def stage_summary(name: str, rep: dict, cfg: DemoConfig) -> str:
    """One line of results per stage, from its report.json."""
    if name == "sae_train":
        return (f"d_sae {rep['config']['d_sae']}, k {rep['config']['k']}, {rep['tokens']:,} tokens: variance explained "
                f"{_f(rep.get('variance_explained'))}, L0 {_f(rep.get('l0'), '.1f')}, dead {_f(rep.get('dead_fraction'))}"
                f", loss recovered {_f(rep.get('loss_recovered'))}")
    if name == "layermap":
        agree = "same as" if rep["recommended_layer"] == cfg.layer else "differs from"
        return (f"peak L{rep['peak_layer']}, commit L{rep['commit_layer']}, recommended SAE layer "
                f"L{rep['recommended_layer']} ({agree} the demo's SAE layer L{cfg.layer}); greedy accuracy "
                f"{_f(rep['accuracy'])} on {rep['n_responses']} questions")
    if name == "rollouts":
        return f"{rep['n_rollouts']} rollouts, sampled accuracy {_f(rep['accuracy'])}, mean length {_f(rep['mean_length'], '.1f')}"
    if name == "probe":
        return (f"pack of {rep['n_features']} features from {rep['n_responses']} discovery responses "
                f"({rep['n_correct']} correct); {rep['n_features_q_below_0_05']} features with BH q < 0.05")
    if name == "g1":
        w = (rep.get("within") or {}).get("pack") or {}
        return (f"**{rep['verdict']}**: Spearman ρ = {_f(rep['spearman_rho'], '.4f')} (p = {_f(rep['p_value'], '.3g')}), "
                f"CI {[round(x, 3) for x in rep['ci95']]}, flags {rep['flags'] or 'none'}; within-question AUROC "
                f"{_f(w.get('auroc'))} on {rep.get('n_mixed_questions')} mixed questions; length ρ "
                f"{_f(rep['controls']['length_rho'])}, log-prob ρ {_f(rep['controls']['logprob_rho'])}, direction ρ "
                f"{_f(rep['controls']['direction_rho'])}")
    if name == "features":
        c = rep["density_classes"]
        return (f"{rep['tokens']:,} tokens: {c['healthy']} healthy, {c['rare']} rare, {c['dense']} dense, {c['dead']} "
                f"dead features; browser `browser/index.html`")
    if name == "g2":
        p = rep.get("protocol", {})
        d10, d12 = rep["delta_r1_r0"], rep["delta_r1_r2"]
        return (f"{p.get('steps')} steps x {p.get('questions_per_step')} questions, lr {p.get('learning_rate')}, "
                f"seeds {p.get('seeds')}, {rep.get('n_eval')} held-out questions: **{rep['verdict']}**: "
                f"R1−R0 {_f(d10['mean'], '+.3f')} (CI {_f(d10['ci95'][0], '+.3f')}..{_f(d10['ci95'][1], '+.3f')}), "
                f"R1−R2 {_f(d12['mean'], '+.3f')}, accuracy before {_f(rep['acc_before'])}, hacked {rep['hacked']}")
    return ""


def _mde(rep: dict) -> float | None:
    """G2's minimum detectable R1−R0 difference (`mde_r1_r0.mde` in G2's report), if reported."""
    for k, v in rep.items():
        if "minimum_detectable" in k or k in ("mde", "mde_r1_r0"):
            v = v.get("mde", v.get("r1_r0", v.get("value"))) if isinstance(v, dict) else v
            if isinstance(v, (int, float)):
                return float(v)
    return None


def g2_sentence(rep: dict) -> str:
    """What G2 says, with its power: R0's own gain, the arm differences, NO_LEARNING and the MDE when reported."""
    flags = list(rep.get("flags") or [])
    r0 = (rep.get("arms") or {}).get("R0", {}).get("acc_mean")
    before = rep.get("acc_before")
    d10 = rep.get("delta_r1_r0") or {}
    s = f"G2 {rep.get('verdict')}"
    if (rep.get("pack_check") or {}).get("refusal_overridden"):
        s += f" (run on a pack whose G1 verdict is {rep['pack_check'].get('verdict')}, as a check of the machinery)"
    if r0 is not None and before is not None:
        s += f": outcome-only RL (R0) moved held-out accuracy from {before:.3f} to {r0:.3f}"
    if d10.get("mean") is not None:
        ci = d10.get("ci95") or [None, None]
        s += f", R1−R0 {d10['mean']:+.3f}" + (f" (CI {ci[0]:+.3f}..{ci[1]:+.3f})" if None not in ci else "")
    if "NO_LEARNING" in flags:
        s += "; NO_LEARNING: R0's own gain is not distinguishable from 0, so no arm comparison is decided"
    mde = _mde(rep)
    if mde is not None:
        s += f"; the smallest R1−R0 difference these seeds could detect is {mde:.3f}"
    return s + "."


def gates_conclusion(results: dict) -> str:
    """The demo's lead: what the gates concluded and why (G1's own conclusion, then G2's power)."""
    parts = []
    if "g1" in results:
        g1 = results["g1"].report
        parts.append(g1.get("conclusion") or f"G1 {g1.get('verdict')} (rho = {g1.get('spearman_rho'):.3f}).")
    if "g2" in results:
        parts.append(g2_sentence(results["g2"].report))
    return " ".join(parts)


def write_report(cfg: DemoConfig, run: Run, chain: Chain, failure: dict | None, total: float) -> dict:
    rows, plots = [], []
    (run.dir / "plots").mkdir(exist_ok=True)
    for name in STAGES:
        res = chain.results.get(name)
        if res is None:
            continue
        rel = os.path.relpath(res.dir, run.dir)
        rows.append({"stage": name, "status": "reused" if res.reused else "ran", "seconds": res.seconds,
                     "run dir": rel, "result": stage_summary(name, res.report, cfg)})
        for pat in PLOTS.get(name, []):
            p = res.dir / pat.format(layer=cfg.layer)
            if p.exists():
                target = run.dir / "plots" / f"{name}_{p.name}"
                shutil.copyfile(p, target)
                plots.append((name, f"plots/{target.name}"))
    if failure:
        rows.append({"stage": failure["stage"], "status": "FAILED", "seconds": "", "run dir": failure["dir"],
                     "result": failure["error"]})
    verdicts = {k: chain.results[k].report.get("verdict") for k in ("g1", "g2") if k in chain.results}
    conclusion = gates_conclusion(chain.results)
    report = {"stages": {r["stage"]: {k: v for k, v in r.items() if k != "stage"} for r in rows},
              "verdicts": verdicts, "conclusion": conclusion, "failed": failure, "seconds": round(total, 1),
              "stage_seconds_if_run_now": round(sum(res.seconds for res in chain.results.values()), 1),
              "model": cfg.model.name_or_path, "layer": cfg.layer,
              "reports": {k: v.report for k, v in chain.results.items()}}
    browser = chain.results.get("features")
    bpath = os.path.relpath(browser.dir / "browser" / "index.html", run.dir) if browser else None
    md = ["# mechreward demo: SAE features → validated reward, end to end", "",
          f"model `{cfg.model.name_or_path}`, SAE layer {cfg.layer}, task `{cfg.task.name}`; total {total:.0f} s "
          f"(all stages run from scratch: {report['stage_seconds_if_run_now']:.0f} s).", ""]
    if conclusion:
        md += [f"**What the gates concluded:** {conclusion}", ""]
    if failure:
        md += [f"**Stopped: stage `{failure['stage']}` failed**: {failure['error']}", ""]
    md += ["Verdicts: " + (", ".join(f"{k.upper()} **{v}**" for k, v in verdicts.items()) or "none yet"), ""]
    if bpath:
        md += [f"Feature browser (open from disk): [{bpath}]({bpath})", ""]
    md += [markdown_table(rows, ["stage", "status", "seconds", "run dir", "result"]), ""]
    md += [f"![{n}]({p})" for n, p in plots]
    run.write_report(report, "\n".join(md) + "\n")
    io.write_text(run.path("report.html"), _html(cfg, rows, plots, verdicts, failure, bpath, total, conclusion))
    return report


def _html(cfg: DemoConfig, rows, plots, verdicts, failure, browser: str | None, total: float,
          conclusion: str = "") -> str:
    e = html.escape
    trs = "".join(
        f"<tr class='{e(str(r['status']).lower())}'><td>{e(r['stage'])}</td><td>{e(str(r['status']))}</td>"
        f"<td>{e(str(r['seconds']))}</td><td><a href='{e(r['run dir'])}/report.md'>{e(r['run dir'])}</a></td>"
        f"<td>{e(r['result']).replace('**', '')}</td></tr>" for r in rows)
    figs = "".join(f"<figure><img src='{e(p)}' alt='{e(n)}'><figcaption>{e(n)}: {e(Path(p).name)}</figcaption></figure>"
                   for n, p in plots)
    v = " · ".join(f"{e(k.upper())}: <strong>{e(str(x))}</strong>" for k, x in verdicts.items()) or "none yet"
    fail = f"<p class='fail'>Stopped: stage <code>{e(failure['stage'])}</code> failed: {e(failure['error'])}</p>" \
        if failure else ""
    link = f"<p><a href='{e(browser)}'>Open the feature browser</a></p>" if browser else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mechreward demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} td, th {{ border: 1px solid #ddd; padding: 0.3em 0.6em; }}
th {{ background: #eef1f5; }} tr.failed td {{ background: #fde8e6; }} tr.reused td:nth-child(2) {{ color: #666; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }} img {{ max-width: 560px; }}
figcaption {{ font-size: 0.8em; color: #555; }} .fail {{ color: #b3261e; font-weight: 600; }}
.lead {{ max-width: 60em; background: #f4f6fa; padding: 0.6em 0.8em; border-left: 4px solid #4a6fa5; }}
</style></head><body>
<h1>mechreward demo</h1>
<p>model <code>{e(cfg.model.name_or_path)}</code>, SAE layer {cfg.layer}, task <code>{e(cfg.task.name)}</code>;
total {total:.0f} s</p>
{f"<p class='lead'><strong>What the gates concluded:</strong> {e(conclusion)}</p>" if conclusion else ""}
{fail}<p>Verdicts: {v}</p>{link}
<table><tr><th>stage</th><th>status</th><th>seconds</th><th>run dir</th><th>result</th></tr>{trs}</table>
<h2>Plots</h2>{figs}
</body></html>
"""


def check_organism_defaults(cfg: DemoConfig) -> None:
    """Refuse a real model on the organism's demo settings (its task, its SAE layer, its G2 protocol)."""
    from .models import is_builtin_organism

    name = cfg.model.name_or_path
    if is_builtin_organism(name) or cfg.organism_defaults_ok:
        return
    leaks = []
    if cfg.task.name == "arithmetic":
        leaks.append("task=arithmetic (the organism's task)")
    if cfg.layer is None:
        leaks.append("no layer (set layer=<L> for your model)")
    if "g2" in cfg.stages:
        leaks.append("the g2 stage (it runs the organism's G2 protocol; leave it out with "
                     "stages=[sae_train,layermap,rollouts,probe,g1,features] and run `python -m mechreward.g2` "
                     "with a protocol for your model)")
    if leaks:
        raise ConfigError(f"model {name!r} is not the organism, but the demo still has the organism's "
                          f"{'; '.join(leaks)}. Set them for your model (`python -m mechreward.demo --config-name "
                          "demo_smollm2` is the demo set up for SmolLM2-135M-Instruct), or organism_defaults_ok=true")


def _ci(ci, fmt: str = "+.3f") -> str:
    return "" if not ci or None in ci else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def control_row(name: str, rep: dict) -> dict:
    """The side-by-side numbers of one organism's demo report (None where a stage did not run)."""
    g1 = (rep.get("reports") or {}).get("g1") or {}
    g2 = (rep.get("reports") or {}).get("g2") or {}
    w = g1.get("within") or {}
    wc = w.get("controls") or {}
    truth = g1.get("ground_truth_mode") or {}
    best = truth.get("best_pack_latent") or {}

    def auc(d):
        return (d or {}).get("auroc")

    r0 = g2.get("r0_gain") or {}
    d10, d12 = g2.get("delta_r1_r0") or {}, g2.get("delta_r1_r2") or {}
    return {"organism": name, "role": CONTROL_ROLES.get(name, name),
            "g1_verdict": g1.get("verdict"), "g1_flags": g1.get("flags"), "g1_rho": g1.get("spearman_rho"),
            "g1_beaten_by": g1.get("beaten_by") or [],
            "within_pack": auc(w.get("pack")), "within_pack_ci95": (w.get("pack") or {}).get("ci95"),
            "within_logprob": auc(wc.get("logprob")), "within_length": auc(wc.get("length")),
            "within_direction": auc(wc.get("direction")),
            "within_random_p95": (wc.get("random_packs") or {}).get("auroc_p95"),
            "n_mixed_questions": g1.get("n_mixed_questions"),
            "planted_latent": best.get("index"), "planted_latent_auroc": best.get("separation"),
            "g2_verdict": g2.get("verdict"), "g2_flags": g2.get("flags"),
            "r0_gain": r0.get("mean"), "r0_gain_ci95": r0.get("ci95_two_level"),
            "r1_r0": d10.get("mean"), "r1_r0_ci95": d10.get("ci95_two_level"),
            "r1_r2": d12.get("mean"), "r1_r2_ci95": d12.get("ci95_two_level"),
            "mde_r1_r0": (g2.get("mde_r1_r0") or {}).get("mde"), "mde_r1_r2": (g2.get("mde_r1_r2") or {}).get("mde"),
            "seconds": rep.get("seconds")}


def controls_table(rows: list[dict]) -> str:
    """Markdown: one column per organism, one row per number."""
    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [("G1 verdict", lambda r: f"**{r['g1_verdict']}**"),
             ("G1 flags", lambda r: ", ".join(r["g1_flags"] or []) or "none"),
             ("G1 Spearman rho", lambda r: f(r["g1_rho"])),
             ("within-question AUROC: pack", lambda r: f(r["within_pack"]) + _ci(r["within_pack_ci95"], ".2f")),
             ("within-question AUROC: mean log-prob", lambda r: f(r["within_logprob"])),
             ("within-question AUROC: length", lambda r: f(r["within_length"])),
             ("within-question AUROC: diff-of-means direction", lambda r: f(r["within_direction"])),
             ("within-question AUROC: random packs, 95th pct", lambda r: f(r["within_random_p95"])),
             ("mixed validation questions", lambda r: str(r["n_mixed_questions"])),
             ("planted latent: AUROC vs true mode", lambda r: "n/a (no ground truth)" if r["planted_latent"] is None
              else f"{f(r['planted_latent_auroc'])} (latent {r['planted_latent']})"),
             ("G2 verdict", lambda r: f"**{r['g2_verdict']}**" if r["g2_verdict"] else "not run"),
             ("G2 flags", lambda r: ", ".join(r["g2_flags"] or []) or "none"),
             ("G2 R0 gain (95% CI)", lambda r: f(r["r0_gain"], "+.3f") + _ci(r["r0_gain_ci95"])),
             ("G2 R1−R0 (95% CI)", lambda r: f(r["r1_r0"], "+.3f") + _ci(r["r1_r0_ci95"])),
             ("G2 R1−R2 (95% CI)", lambda r: f(r["r1_r2"], "+.3f") + _ci(r["r1_r2_ci95"])),
             ("G2 minimum detectable R1−R0", lambda r: f(r["mde_r1_r0"])),
             ("G2 minimum detectable R1−R2", lambda r: f(r["mde_r1_r2"])),
             ("seconds of this run (reused stages count 0)", lambda r: f(r["seconds"], ".0f"))]
    head = "| | " + " | ".join(f"`{r['organism']}`: {r['role']}" for r in rows) + " |"
    sep = "|---|" + "---|" * len(rows)
    body = [f"| {label} | " + " | ".join(fn(r) for r in rows) + " |" for label, fn in lines]
    return "\n".join([head, sep, *body])


DIRECTION = "direction"
"""The control in G1's `beaten_by` that is not a cheap signal but the other candidate reward (G2's R2): a tie with
it is reported as a finding; length, mean log-prob and random packs must be beaten."""


def beaten_by_cheap(row: dict) -> set[str]:
    """The cheap signals (every control but the direction) that G1 found at least as good as the pack."""
    from .gates.g1 import beaten_names

    return beaten_names(row.get("g1_beaten_by") or []) - {DIRECTION}


def direction_matches(row: dict) -> bool:
    """G1 found the raw diff-of-means direction at least as good as the pack."""
    from .gates.g1 import beaten_names

    return DIRECTION in beaten_names(row.get("g1_beaten_by") or [])


def within_beats_baselines(row: dict) -> bool:
    """The pack's within-question CI lies above length, mean log-prob and the random packs' 95th pct, and G1 found
    no cheap signal as good as the pack."""
    ci = row.get("within_pack_ci95")
    if not ci:
        return False
    others = [abs(row[k] - 0.5) + 0.5 for k in ("within_logprob", "within_length") if row[k] is not None]
    if row["within_random_p95"] is not None:
        others.append(row["within_random_p95"])
    return bool(others) and ci[0] > max(others) and not beaten_by_cheap(row)


def controls_lead(rows: list[dict]) -> str:
    """The lead sentence: what the positive and the negative control show about the gates, from the numbers."""
    by = {r["organism"]: r for r in rows}
    pos, neg = by.get("organism_planted"), by.get("organism")
    parts = []
    if pos is not None:
        passed = (pos["g1_verdict"] or "").startswith("PASS") and not beaten_by_cheap(pos)
        found = pos["planted_latent_auroc"] is not None and pos["planted_latent_auroc"] >= 0.9
        within = within_beats_baselines(pos)
        s = (f"On the positive control G1's published verdict is {pos['g1_verdict']}"
             f"{' (detected)' if passed else ' (not detected)'}, its within-question evidence "
             f"{'beats' if within else 'does not beat'} every cheap signal (pack AUROC "
             f"{pos['within_pack'] or float('nan'):.2f}{_ci(pos['within_pack_ci95'], '.2f')} against "
             f"{pos['within_logprob'] or float('nan'):.2f} for mean log-prob, {pos['within_length'] or float('nan'):.2f} "
             f"for length, {pos['within_random_p95'] or float('nan'):.2f} for random packs' 95th pct), the pack's best "
             f"latent separates the true modes at AUROC {pos['planted_latent_auroc'] or float('nan'):.2f} "
             f"({'at least' if found else 'below'} the 0.9 a planted latent should reach)")
        tie = direction_matches(pos)
        s += (f", and the raw diff-of-means direction {'does as well' if tie else 'does worse'} "
              f"(within-question AUROC {pos['within_direction'] or float('nan'):.2f}"
              f"{', so G1 flags BEATEN_BY_BASELINE: the SAE adds nothing over a linear probe here' if tie else ''})")
        if pos["g2_verdict"]:
            learned = pos["r0_gain_ci95"] and pos["r0_gain_ci95"][0] > 0
            s += (f"; G2 {pos['g2_verdict']}: outcome RL {'learns' if learned else 'does not learn'} (R0 gain "
                  f"{pos['r0_gain']:+.3f}{_ci(pos['r0_gain_ci95'])}), R1−R0 {pos['r1_r0']:+.3f}{_ci(pos['r1_r0_ci95'])}, "
                  f"R1−R2 {pos['r1_r2']:+.3f}{_ci(pos['r1_r2_ci95'])}")
        parts.append(s)
    if neg is not None:
        rejected = (not (neg["g1_verdict"] or "").startswith("PASS")) or bool(
            {"BEATEN_BY_BASELINE", "UNINFORMATIVE_WITHIN"} & set(neg["g1_flags"] or []))
        s = (f"on the negative control G1 {'rejects' if rejected else 'does not reject'} the pack "
             f"({neg['g1_verdict']}{', ' + ', '.join(neg['g1_flags']) if neg['g1_flags'] else ''}; within-question "
             f"AUROC {neg['within_pack'] or float('nan'):.2f} against {neg['within_logprob'] or float('nan'):.2f} "
             f"for mean log-prob)")
        if neg["g2_verdict"]:
            s += f" and G2 says {neg['g2_verdict']}" + (f" ({', '.join(neg['g2_flags'])})" if neg["g2_flags"] else "")
        parts.append(s)
    if pos is not None and neg is not None:
        works = passed and found and rejected
        head = ("The gates separate a true mechanism from a false one: " if works else
                "Within questions the gates tell the planted mechanism from the natural one, but the positive control "
                "is not fully recovered: " if within and rejected else
                "The gates do not yet separate a true mechanism from a false one: ")
        return head + "; ".join(parts) + "."
    return "; ".join(parts) + "."


def run_controls(cfg: DemoConfig, run: Run) -> dict:
    """The chain on each organism of `cfg.controls` (own task, own sub-run dir), then one side-by-side report."""

    unknown = [n for n in cfg.controls if n not in CONTROL_TASKS]
    if unknown:
        raise ConfigError(f"controls={list(cfg.controls)}: {unknown} not built-in organisms; expected names from "
                          f"{sorted(CONTROL_TASKS)}")
    if cfg.model.name_or_path not in CONTROL_TASKS:
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r} with controls={list(cfg.controls)}: the controls "
                          "run the built-in organisms; set controls=[] to run the demo on your model")
    t0 = time.time()
    reports = {}
    for name in cfg.controls:
        sub = copy.deepcopy(cfg)
        sub.controls = []
        sub.model.name_or_path = name
        sub.task.name = CONTROL_TASKS[name]
        print(f"demo: {CONTROL_ROLES[name]}: model {name}, task {sub.task.name}", file=sys.stderr)
        reports[name] = run_demo(sub, Run(run.dir / name, "demo"))
    rows = [control_row(n, reports[n]) for n in cfg.controls]
    lead = controls_lead(rows)
    total = time.time() - t0
    table = controls_table(rows)
    md = ["# mechreward demo: the gates on a positive and a negative control", "", f"**{lead}**", "", table, "",
          f"Total {total:.0f} s. Each organism's full chain report: " +
          ", ".join(f"[{n}]({n}/report.md)" for n in cfg.controls), ""]
    for n in cfg.controls:
        md += [f"## `{n}` ({CONTROL_ROLES[n]})", "", reports[n].get("conclusion") or "", ""]
    out = {"controls": rows, "conclusion": lead, "seconds": round(total, 1),
           "verdicts": {n: reports[n]["verdicts"] for n in cfg.controls},
           "runs": {n: str(run.dir / n) for n in cfg.controls}}
    run.write_report(out, "\n".join(md) + "\n")
    e = html.escape
    io.write_text(run.path("report.html"), "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>mechreward "
                  "demo</title></head><body><h1>mechreward demo: positive and negative control</h1>"
                  f"<p><strong>{e(lead)}</strong></p><pre>{e(table)}</pre>" +
                  "".join(f"<p><a href='{e(n)}/report.html'>{e(n)}: {e(CONTROL_ROLES[n])}</a></p>" for n in cfg.controls)
                  + "</body></html>\n")
    print(f"demo: {lead}\nreport {run.path('report.html')}", file=sys.stderr)
    return out


def run_demo(cfg: DemoConfig, run: Run) -> dict:
    if cfg.controls:
        return run_controls(cfg, run)
    check_organism_defaults(cfg)
    if cfg.layer is None:
        name = cfg.model.name_or_path
        if name not in ORGANISM_LAYERS:
            raise ConfigError(f"layer is unset and model {name!r} has no built-in SAE layer: set layer=<L>")
        cfg = copy.deepcopy(cfg)
        cfg.layer = ORGANISM_LAYERS[name]
    t0 = time.time()
    chain = Chain(Path(cfg.cache_dir), model_fingerprint(cfg.model.name_or_path))
    failure = None
    try:
        run_chain(cfg, run, chain)
    except BaseException as e:
        stage, d = chain.current or ("setup", None)
        msg = str(e) if isinstance(e, MechrewardError) else f"{type(e).__name__}: {e}"
        failure = {"stage": stage, "error": msg, "dir": os.path.relpath(d, run.dir) if d else ""}
        write_report(cfg, run, chain, failure, time.time() - t0)
        if isinstance(e, MechrewardError):
            raise type(e)(f"stage {stage} failed: {e} (earlier stages kept; report in {run.dir})") from None
        traceback.print_exc()
        raise
    report = write_report(cfg, run, chain, None, time.time() - t0)
    print("demo: " + ", ".join(f"{k} {v}" for k, v in report["verdicts"].items()) +
          f"; report {run.path('report.html')}\n{report['conclusion']}", file=sys.stderr)
    return report


main = hydra_command("demo", DemoConfig, run_demo)

if __name__ == "__main__":
    main()
