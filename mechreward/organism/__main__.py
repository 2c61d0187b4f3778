"""`python -m mechreward.organism`: accuracy of a model on held-out arithmetic questions.

Sampled accuracy (N samples per question at temperature 1) and greedy accuracy, the
distribution of per-question solve rates, and accuracy by difficulty. Works for the built-in
organism (default) or any causal LM (`model.name_or_path=...`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models import ModelConfig, load_model
from ..run import Run, markdown_table

N_BINS = 10


@dataclass
class OrganismEvalConfig:
    """Evaluate a model on held-out arithmetic questions."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to evaluate (default: the built-in organism)."""
    n_questions: int = 200
    """Held-out (eval-split) arithmetic questions."""
    question_seed: int = 0
    """Seed of the question generator (which eval questions)."""
    samples_per_question: int = 4
    """Sampled completions per question for the sampled accuracy."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 96
    """Completion budget; a completion cut here without `####` counts as wrong."""
    batch_size: int = 256
    """Sequences per `generate` call."""
    seed: int = 0
    """Sampling seed."""
    greedy: bool = True
    """Also measure greedy (temperature 0) accuracy."""


def solve_rate_hist(rates: list[float], bins: int = N_BINS) -> dict:
    """Counts of per-question solve rates in `bins` equal bins over [0, 1] (1.0 in the last)."""
    counts = [0] * bins
    for r in rates:
        counts[min(int(r * bins), bins - 1)] += 1
    edges = [round(i / bins, 6) for i in range(bins + 1)]
    return {"edges": edges, "counts": counts}


def evaluate(cfg: OrganismEvalConfig, run: Run) -> dict:
    from ..generate import sample
    from ..tasks.arithmetic import ArithmeticTask

    if cfg.samples_per_question < 1:
        raise ConfigError(f"samples_per_question must be >= 1, got {cfg.samples_per_question}")
    if cfg.model.name_or_path == "organism_planted":
        from ..tasks.planted import PlantedTask

        task = PlantedTask("eval", n=cfg.n_questions, seed=cfg.question_seed)
    else:
        task = ArithmeticTask("eval", n=cfg.n_questions, seed=cfg.question_seed)
    model, tokenizer = load_model(cfg.model)
    prompts = [q.prompt for q in task.questions]
    t0 = time.time()
    samples = sample(model, tokenizer, prompts, n=cfg.samples_per_question, temperature=cfg.temperature,
                     top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                     seed=cfg.seed)
    t_sampled = time.time() - t0
    correct = defaultdict(list)
    modes: dict[str, int] = defaultdict(int)
    step = 0
    for s in samples:
        q = task.questions[s.prompt_index]
        ok = task.verify(s.text, q.answer)
        correct[s.prompt_index].append(ok)
        if hasattr(task, "record"):
            modes[task.record(s.text, q)["mode"]] += 1
        run.log(step, kind="sampled", question=q.id, sample=s.sample_index, correct=int(ok),
                n_tokens=len(s.completion_ids), finish_reason=s.finish_reason,
                answer=task.extract(s.text), reference=q.answer)
        step += 1
    rates = [sum(correct[i]) / len(correct[i]) for i in range(len(task.questions))]
    acc_sampled = sum(sum(v) for v in correct.values()) / len(samples)

    acc_greedy, t_greedy, greedy_ok = None, 0.0, []
    if cfg.greedy:
        t0 = time.time()
        gs = sample(model, tokenizer, prompts, n=1, max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size, seed=cfg.seed, greedy=True)
        t_greedy = time.time() - t0
        greedy_ok = [task.verify(s.text, task.questions[s.prompt_index].answer) for s in gs]
        acc_greedy = sum(greedy_ok) / len(greedy_ok)
        for s, ok in zip(gs, greedy_ok):
            run.log(step, kind="greedy", question=task.questions[s.prompt_index].id,
                    correct=int(ok), n_tokens=len(s.completion_ids), finish_reason=s.finish_reason,
                    answer=task.extract(s.text), reference=task.questions[s.prompt_index].answer)
            step += 1

    by_diff: dict[int, list[int]] = defaultdict(list)
    for i, q in enumerate(task.questions):
        by_diff[q.meta.get("difficulty", q.meta.get("determined_steps"))].append(i)
    by_difficulty = [{"difficulty": d, "n_questions": len(ix),
                      "accuracy_sampled": sum(rates[i] for i in ix) / len(ix),
                      **({"accuracy_greedy": sum(greedy_ok[i] for i in ix) / len(ix)} if greedy_ok else {})}
                     for d, ix in sorted(by_diff.items())]
    hist = solve_rate_hist(rates)
    report = {
        "model": cfg.model.name_or_path,
        "n_questions": len(task.questions),
        "samples_per_question": cfg.samples_per_question,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "question_seed": cfg.question_seed,
        "accuracy_sampled": acc_sampled,
        "accuracy_greedy": acc_greedy,
        "solve_rate_hist": hist,
        "fraction_questions_all_correct": sum(r == 1.0 for r in rates) / len(rates),
        "fraction_questions_all_wrong": sum(r == 0.0 for r in rates) / len(rates),
        "fraction_questions_mixed": sum(0 < r < 1 for r in rates) / len(rates),
        "finish_eos_fraction": sum(s.finish_reason == "eos" for s in samples) / len(samples),
        "mean_completion_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
        "by_difficulty": by_difficulty,
        **({"sampled_modes": dict(modes)} if modes else {}),
        "solve_rates": {q.id: r for q, r in zip(task.questions, rates)},
        "seconds_sampled": round(t_sampled, 2),
        "seconds_greedy": round(t_greedy, 2),
    }
    _plot(rates, cfg, run)
    run.write_report(report, _markdown(report))
    return report


def _plot(rates: list[float], cfg: OrganismEvalConfig, run: Run) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(rates, bins=[i / N_BINS for i in range(N_BINS + 1)], edgecolor="black")
    ax.set_xlabel(f"per-question solve rate ({cfg.samples_per_question} samples, T={cfg.temperature})")
    ax.set_ylabel("questions")
    ax.set_title(f"{cfg.model.name_or_path}: {len(rates)} held-out arithmetic questions")
    run.save_figure(fig, "solve_rate_hist.png")


def _markdown(r: dict) -> str:
    greedy = "n/a" if r["accuracy_greedy"] is None else f"{r['accuracy_greedy']:.3f}"
    return (
        f"# Arithmetic accuracy of `{r['model']}`\n\n"
        f"- held-out questions: {r['n_questions']}, samples per question: {r['samples_per_question']} "
        f"(T={r['temperature']}, top_p={r['top_p']}, seed {r['seed']})\n"
        f"- **sampled accuracy: {r['accuracy_sampled']:.3f}**; greedy accuracy: {greedy}\n"
        f"- questions always solved {r['fraction_questions_all_correct']:.2f}, never solved "
        f"{r['fraction_questions_all_wrong']:.2f}, mixed {r['fraction_questions_mixed']:.2f}\n"
        f"- completions ending in EOS: {r['finish_eos_fraction']:.3f}; mean length "
        f"{r['mean_completion_tokens']:.1f} tokens\n"
        + (f"- ground-truth modes of the sampled completions: {r['sampled_modes']}\n" if r.get("sampled_modes") else "")
        + "\n"
        "## By difficulty\n\n" + markdown_table(r["by_difficulty"]) +
        "\n![solve rates](solve_rate_hist.png)\n"
    )


def run_fn(cfg: OrganismEvalConfig, run: Run) -> dict:
    return evaluate(cfg, run)


def main() -> None:
    from ..cli import hydra_command

    hydra_command("organism", OrganismEvalConfig, run_fn)()


if __name__ == "__main__":
    main()
