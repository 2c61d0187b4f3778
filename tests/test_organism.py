"""The built-in organism: offline loading via Auto classes, its behaviour, the eval command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechreward.organism import ORGANISM_DIR

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CI": "true"}


@pytest.fixture(scope="module")
def auto_loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ORGANISM_DIR)
    model = AutoModelForCausalLM.from_pretrained(ORGANISM_DIR).eval()
    return model, tok


def test_weights_are_small_safetensors_of_a_qwen3():
    files = {p.name: p.stat().st_size for p in ORGANISM_DIR.iterdir() if not p.name.startswith(".")}
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    assert sum(files.values()) <= 20 * 2**20
    cfg = json.loads((ORGANISM_DIR / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert 4 <= cfg["num_hidden_layers"] <= 8


def test_loads_offline_with_auto_classes(auto_loaded):
    model, tok = auto_loaded
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    text = "Q: 12+7-3=?\nA: 12+7=19. 19-3=16. #### 16"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text


def test_organism_answers_an_easy_prompt_greedily(auto_loaded):
    from mechreward.generate import sample
    from mechreward.tasks.arithmetic import ArithmeticTask

    model, tok = auto_loaded
    task = ArithmeticTask("eval", n=30, seed=0)
    easy = [q for q in task.questions if q.meta["difficulty"] <= 1][:8]
    assert easy
    out = sample(model, tok, [q.prompt for q in easy], greedy=True, batch_size=8)
    # well-formed worked solutions ending in EOS, and most easy ones right
    assert all(s.finish_reason == "eos" and "####" in s.text for s in out)
    right = sum(task.verify(s.text, q.answer) for s, q in zip(out, easy))
    assert right >= len(easy) * 0.75, [(q.prompt, s.text) for s, q in zip(out, easy)]


def test_organism_is_not_trivially_right_or_wrong_on_held_out_questions(auto_loaded):
    """Sampled accuracy lies in the band the correctness gates need (both classes present)."""
    from mechreward.generate import sample
    from mechreward.tasks.arithmetic import ArithmeticTask

    model, tok = auto_loaded
    task = ArithmeticTask("eval", n=40, seed=5)
    out = sample(model, tok, [q.prompt for q in task.questions], n=2, batch_size=80, seed=0)
    acc = sum(task.verify(s.text, task.questions[s.prompt_index].answer) for s in out) / len(out)
    assert 0.2 <= acc <= 0.8, acc


def test_eval_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mechreward.organism", "n_questions=12", "samples_per_question=3",
                        "batch_size=36", "seed=4", f"hydra.run.dir={out}"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    for key in ("accuracy_sampled", "accuracy_greedy", "n_questions", "solve_rate_hist", "samples_per_question"):
        assert key in rep
    assert rep["n_questions"] == 12 and rep["samples_per_question"] == 3
    assert (out / "report.md").read_text().startswith("# Arithmetic accuracy")
    assert (out / "solve_rate_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").exists()

    # the reported numbers are recomputed from the per-sample log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sampled = [r for r in rows if r["kind"] == "sampled"]
    greedy = [r for r in rows if r["kind"] == "greedy"]
    assert len(sampled) == 36 and len(greedy) == 12
    assert rep["accuracy_sampled"] == pytest.approx(sum(r["correct"] for r in sampled) / 36)
    assert rep["accuracy_greedy"] == pytest.approx(sum(r["correct"] for r in greedy) / 12)
    for row in sampled:  # each logged verdict agrees with the logged answer
        assert row["correct"] == int(row["answer"] is not None and int(row["answer"]) == int(row["reference"]))
    per_q = {}
    for row in sampled:
        per_q.setdefault(row["question"], []).append(row["correct"])
    assert sum(rep["solve_rate_hist"]["counts"]) == 12
    assert rep["solve_rates"] == pytest.approx({q: sum(v) / 3 for q, v in per_q.items()})


def test_eval_command_rejects_an_unknown_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mechreward.organism", "n_questionz=3",
                        f"hydra.run.dir={tmp_path / 'bad'}"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "n_questionz" in r.stderr


def test_eval_command_rejects_a_bad_value(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mechreward.organism", "samples_per_question=0", "n_questions=2",
                        f"hydra.run.dir={tmp_path / 'bad'}"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "samples_per_question" in r.stderr and "0" in r.stderr


def test_solve_rate_hist_bins():
    from mechreward.organism.__main__ import solve_rate_hist

    h = solve_rate_hist([0.0, 0.125, 0.5, 0.99, 1.0, 1.0])
    assert h["counts"] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 3]
    assert h["edges"][0] == 0.0 and h["edges"][-1] == 1.0


def test_train_builds_a_loadable_organism(tmp_path):
    """A few steps of the rebuild script write a complete, loadable model (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechreward.organism.train import TrainConfig, train

    cfg = TrainConfig(output_dir=str(tmp_path / "w"), steps=3, batch_size=4, log_every=1, eval_every=0,
                      hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16)
    a = train(cfg)
    assert len(a["history"]) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    tok = AutoTokenizer.from_pretrained(tmp_path / "w")
    assert model.config.num_hidden_layers == 2 and tok.eos_token == "<|endoftext|>"
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".organism-")]
    # deterministic: the same config gives the same weights
    cfg.output_dir = str(tmp_path / "w2")
    b = train(cfg)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "w2")
    for (n, p), (_, q) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n
