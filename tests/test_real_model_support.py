"""What a real chat model needs and the organism never showed: answer extraction, real-text
corpora, no silent organism defaults, and the SAE/browser fixes found on SmolLM2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mechreward.errors import ConfigError, DataError, SAEFormatError
from mechreward.tasks import TaskConfig, load_task
from mechreward.tasks.base import Question
from mechreward.tasks.math import MathTask, extract_with

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- answer extraction

def test_extraction_methods_read_what_they_say_in_order():
    text = "First #### 3, then \\boxed{4}. So 9 + 9 = 18. The answer is 7, and 2 is wrong."
    assert extract_with("hash", text) == "3, then \\boxed{4}. So 9 + 9 = 18. The answer is 7, and 2 is wrong."
    assert extract_with("boxed", text) == "4"
    assert extract_with("marked", text) == "4"  # the later marker
    assert extract_with("last_number", text) == "2"
    assert extract_with("regex:answer is (-?\\d+)", text) == "7"
    assert extract_with("regex:\\d+ \\+ \\d+", text) == "9 + 9"  # no group: the whole last match
    chat = MathTask([Question("0", "q", "18")], extraction=["marked", "last_number"])
    strict = MathTask([Question("0", "q", "18")])
    assert chat.verify("9 + 9 = 18.", "18") and not strict.verify("9 + 9 = 18.", "18")
    assert strict.extract("9 + 9 = 18.") is None and chat.extract("\\boxed{17} or 18") == "17"


def test_answer_extraction_is_a_task_setting_with_clear_errors(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "What is 2+2?", "answer": "4"}) + "\n")
    t = load_task(TaskConfig(name="math", source=str(f), answer_extraction=["last_number"]))
    assert t.verify("2 + 2 = 4", "4") and not load_task(TaskConfig(name="math", source=str(f))).verify("2 + 2 = 4", "4")
    with pytest.raises(ConfigError, match="unknown method 'lastnum'"):
        load_task(TaskConfig(name="math", source=str(f), answer_extraction=["lastnum"]))
    with pytest.raises(ConfigError, match="does not compile"):
        load_task(TaskConfig(name="math", source=str(f), answer_extraction=["regex:(unclosed"]))


def test_label_errors_say_when_the_grader_found_no_answer():
    from mechreward.probe import check_labels

    labels = np.zeros(10, dtype=int)
    with pytest.raises(DataError, match="8 of these 10 responses have no extractable answer.*task.answer_extraction"):
        check_labels(labels, "discovery split", no_answer=np.arange(10) < 8)
    with pytest.raises(DataError) as e:
        check_labels(labels, "discovery split", no_answer=np.zeros(10, dtype=bool))
    assert "extractable" not in str(e.value)


def test_addition_task_is_deterministic_and_its_splits_are_disjoint():
    ev = load_task(TaskConfig(name="addition", n=400))
    tr = load_task(TaskConfig(name="addition", split="train", n=390))
    assert not {q.id for q in ev.questions} & {q.id for q in tr.questions}
    again = load_task(TaskConfig(name="addition", n=400))
    assert [q.prompt for q in again.questions] == [q.prompt for q in ev.questions]
    q = ev.questions[0]
    a, b = q.meta["a"], q.meta["b"]
    assert 10 <= a <= 99 and 1 <= b <= 9 and q.answer == str(a + b) and q.prompt == f"What is {a} + {b}?"
    assert ev.verify(f"{a} + {b} = {a + b}.", q.answer) and not ev.verify(f"It is {a + b + 1}", q.answer)
    with pytest.raises(ConfigError, match="only"):
        load_task(TaskConfig(name="addition", subset="1d", n=100))



def test_lookup_task_asks_back_one_of_its_own_facts_and_its_splits_are_disjoint():
    import re

    ev = load_task(TaskConfig(name="lookup", n=300))
    tr = load_task(TaskConfig(name="lookup", split="train", n=300))
    assert not {q.prompt for q in ev.questions} & {q.prompt for q in tr.questions}
    assert len({q.prompt for q in ev.questions}) == 300
    assert [q.prompt for q in load_task(TaskConfig(name="lookup", n=300)).questions] == [q.prompt for q in ev.questions]
    assert [q.prompt for q in load_task(TaskConfig(name="lookup", n=300, seed=1)).questions] != \
        [q.prompt for q in ev.questions]
    for q in ev.questions:  # the prompt, read back independently, holds the asked fact and one distractor
        facts = dict(re.findall(r"The (\w+) \w+ has number (\d+)\.", q.prompt))
        asked = re.search(r"What number does the (\w+) \w+ have\?$", q.prompt).group(1)
        assert len(facts) == 2 and facts[asked] == q.answer
    q = ev.questions[0]
    wrong = next(v for c, v in zip(q.meta["colours"], q.meta["numbers"]) if str(v) != q.answer)
    colour = q.meta["colours"][q.meta["asked"]]
    assert ev.verify(f"The {colour} {q.meta['object']} has number {q.answer}.", q.answer)
    assert not ev.verify(f"The {colour} {q.meta['object']} has number {wrong}.", q.answer)
    three = load_task(TaskConfig(name="lookup", subset="3", n=5))
    assert all(q.prompt.count(" has number ") == 3 for q in three.questions)
    with pytest.raises(ConfigError, match="task.subset='5'"):
        load_task(TaskConfig(name="lookup", subset="5"))
    with pytest.raises(ConfigError, match="generates its questions"):
        load_task(TaskConfig(name="lookup", source="x.jsonl"))

# --------------------------------------------------------------------------- corpora and defaults

def test_stdlib_corpora_are_english_and_the_default_for_a_real_model(capsys):
    from mechreward.corpora import iter_corpus, real_model_data_default
    from mechreward.data import DataConfig, iter_texts

    topics = list(iter_corpus("pydoc_topics"))
    from pydoc_data.topics import topics as raw

    assert "".join(topics).replace("\n", "") == "".join(raw[k].replace("\n\n", "") for k in sorted(raw)).replace("\n", "")
    assert list(iter_texts(DataConfig(source="pydoc_topics")))[:5] == topics[:5]
    cfg = DataConfig()
    assert real_model_data_default(cfg, "some/real-model", "sae_train") and cfg.source == "stdlib_docs"
    assert "not the organism" in capsys.readouterr().err
    cfg = DataConfig()
    assert not real_model_data_default(cfg, "organism", "sae_train") and cfg.source == "organism"


def test_g2_warns_on_organism_tasks_and_refuses_the_organism_protocol_for_a_real_model(capsys, tmp_path):
    from mechreward.g2 import G2Config, check_real_model_settings, run_g2
    from mechreward.models import ModelConfig
    from mechreward.run import Run

    cfg = G2Config(model=ModelConfig(name_or_path="some/real-model"))
    cfg.task.n = 700  # conf/g2.yaml's organism value
    assert check_real_model_settings(cfg) == ["task.name=arithmetic", "train_task.name=arithmetic", "task.n=700"]
    assert "task.name=arithmetic, train_task.name=arithmetic, task.n=700" in capsys.readouterr().err
    cfg.organism_defaults_ok = True
    assert check_real_model_settings(cfg) == []
    assert check_real_model_settings(G2Config()) == []  # the organism keeps its defaults
    cfg.protocol_for = "organism"  # conf/g2.yaml: the protocol was tuned for the organism
    with pytest.raises(ConfigError, match="protocol_for='organism' but model.name_or_path='some/real-model'"):
        run_g2(cfg, Run(tmp_path / "g2"))


def test_g2_heldout_error_says_whether_task_n_or_the_data_is_short():
    from mechreward.g2 import heldout_questions

    class Pack:
        provenance = {"discovery": ["0", "1"], "validation": ["2"]}

    task = MathTask([Question(str(i), "q", "1") for i in range(10)])
    with pytest.raises(DataError, match="raise task.n \\(now 10\\)"):
        heldout_questions(task, Pack(), 8, task_n=10)
    with pytest.raises(DataError, match="no more rows \\(10 in all\\).*7 or less"):
        heldout_questions(task, Pack(), 8, task_n=50)


# --------------------------------------------------------------------------- SAE training and files

def test_dead_tokens_scales_with_the_run():
    from mechreward.sae.model import SAEConfig, SparseAutoencoder
    from mechreward.sae.train import SAETrainer, TrainerConfig, resolve_dead_tokens

    assert resolve_dead_tokens(None, 600_000, 4096) == 120_000
    assert resolve_dead_tokens(None, 10**9, 4096) == 10_000_000
    assert resolve_dead_tokens(None, 1000, 4096) == 4096 and resolve_dead_tokens(777, 10**9, 1) == 777
    sae = SparseAutoencoder(SAEConfig(8, 64, 2))
    tr = SAETrainer(sae, TrainerConfig(warmup_steps=0), total_steps=10)
    outs = [tr.step(torch.randn(32, 8)) for _ in range(10)]
    assert tr.dead_tokens == 64  # a fifth of 10 x 32 tokens
    assert float(outs[-1].dead_fraction) == float((tr.tokens_since_fired >= 64).float().mean())


def test_progress_line_when_not_a_terminal(tmp_path):
    from mechreward.sae_train import progress_line

    line = progress_line(50, 200, 4096, 2048.0, 0.31234)
    assert line == ("sae_train: step 50/200, tokens 204,800/819,200 (25%), 2,048 tokens/s, fvu 0.3123, ETA 5m00s")



def test_harvest_rollouts_and_features_print_plain_progress_lines_when_not_a_terminal(monkeypatch, capsys):
    import io as _io

    from mechreward.run import LineProgress, progress

    monkeypatch.setenv("MECHREWARD_PROGRESS_SECONDS", "0")
    bar = progress(total=400, desc="rollouts", unit="q")  # pytest's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    bar.update(100)
    bar.update(100)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["rollouts: 100/400 q (25%)", "rollouts: 200/400 q (50%)",
                                                  "rollouts: 200/400 q (50%)"]
    assert "ETA" in lines[0] and "\r" not in "".join(lines)
    out = _io.StringIO()
    quiet = LineProgress(range(5), None, "harvest", "tok", every=3600, stream=out)
    assert list(quiet) == list(range(5))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]  # only the line at the end
    assert out.getvalue().startswith("harvest: 5 tok, ")
    assert progress(total=3, lines=False).disable  # sae_train prints its own lines

def test_load_sae_takes_the_native_weights_file_and_sae_list_finds_runs(tmp_path):
    from mechreward.sae.formats import load_sae, save_sae
    from mechreward.sae.model import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(16, 64, 4, metadata={"model_name": "m", "layer": 3}))
    torch.nn.init.normal_(sae.W_enc)
    out = tmp_path / "runs" / "sae_train" / "2026-12-01" / "sae" / "m-L3"
    save_sae(sae, out)
    direct = load_sae(out / "sae_weights.safetensors")
    x = torch.randn(5, 16)
    torch.testing.assert_close(direct.encode_dense(x), load_sae(out).encode_dense(x))
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "sae_weights.safetensors").write_bytes((out / "sae_weights.safetensors").read_bytes())
    with pytest.raises(SAEFormatError, match="without its cfg.json"):
        load_sae(tmp_path / "lonely" / "sae_weights.safetensors")
    r = subprocess.run([sys.executable, "-m", "mechreward", "sae", "list", "--store", str(tmp_path / "sae"),
                        "--runs", str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "SAEs saved under" in r.stdout and str(out) in r.stdout


def test_offline_hub_error_names_every_layout(monkeypatch, tmp_path):
    from mechreward.sae.formats import load_sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MECHREWARD_SAE_DIR", str(tmp_path))
    with pytest.raises(SAEFormatError) as e:
        load_sae("someone/unknown-saes")
    msg = str(e.value)
    for files in ("cfg.json, sae_weights.safetensors", "cfg.json, sae.safetensors", "config.json, weights.safetensors"):
        assert files in msg


# --------------------------------------------------------------------------- browser contexts

def test_contexts_stop_at_document_separators_and_data_js_is_bounded(tmp_path):
    from mechreward.browser import write_browser
    from mechreward.features import document_span

    assert document_span([5, 6, 0, 7, 8, 9, 0, 10, -1], 4, {0}) == (3, 6)
    assert document_span([-1, -1, 7, 8, 9], 3, {0}) == (2, 5)
    rows = [{"index": i, "contexts": [{"activation": 1.0, "center": 0, "tokens": ["x" * 200] * 20, "acts": [0.5] * 20}
                                      for _ in range(20)]} for i in range(50)]
    index = write_browser(tmp_path, rows, {"model": "m"}, max_bytes=400_000)
    data = (index.parent / "data.js").read_text()
    assert len(data) <= 400_000
    payload = json.loads(data[len("window.MECHREWARD_DATA = "):-2])
    n = payload["meta"]["contexts_per_feature_shown"]
    assert all(len(f["contexts"]) == n for f in payload["features"]) and 1 <= n < 20
