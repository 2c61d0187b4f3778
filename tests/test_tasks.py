"""Task verifiers and task loading: the cases a naive answer parser gets wrong."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import threading
import time

import pytest

from mechreward.errors import ConfigError, DataError
from mechreward.tasks import MathTask, MCQTask, TaskConfig, load_task

# ----------------------------------------------------------------------------- MathTask

math_task = MathTask([])


@pytest.mark.parametrize(
    "completion, reference, correct",
    [
        # commas in numbers
        ("So she earns #### 1,000", "1000", True),
        ("#### 1000", "1,000", True),
        (r"\boxed{1,234,567}", "1234567", True),
        (r"\boxed{1{,}000}", "1000", True),
        # negative numbers
        ("#### -3", "3", False),
        ("#### -3", "-3", True),
        (r"\boxed{-\frac{1}{2}}", "-0.5", True),
        (r"\boxed{-\frac{1}{2}}", "0.5", False),
        # several answers: the last one counts
        (r"First \boxed{1}, wait, actually \boxed{2}", "2", True),
        (r"First \boxed{1}, wait, actually \boxed{2}", "1", False),
        ("#### 72\n\nQuestion: next one?\nAnswer: ... #### 5", "5", True),
        (r"#### 3 but on reflection \boxed{4}", "4", True),
        # nested braces in boxed
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{\dfrac{3}{4}}", "0.75", True),
        (r"\boxed{x^{2}+1}", "x^2+1", True),
        (r"\boxed{x^{2}+2}", "x^2+1", False),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
        (r"\boxed{2\sqrt{2}}", "2", False),
        # #### followed by text
        ("#### The answer is 72.", "72", True),
        ("####\n72", "72", True),
        ("#### 7", "72", False),
        # no answer at all: wrong, never an exception
        ("The result is 72", "72", False),
        ("", "72", False),
        (r"\boxed{72", "72", False),  # unclosed
        ("####", "72", False),
        # decimals and fractions
        (r"\boxed{0.5}", "1/2", True),
        ("#### 0.50", "0.5", True),
        ("#### 72", "72.5", False),
        ("#### 72.0", "72", True),
        # units and currency
        ("#### $18.00", "18", True),
        (r"\boxed{\$18}", "18", True),
        (r"\boxed{18 \text{ dollars}}", "18", True),
        ("#### 18 dollars", "18", True),
        (r"\boxed{10\%}", "10", True),
    ],
)
def test_math_verify_edge_cases(completion, reference, correct):
    assert math_task.verify(completion, reference) is correct


def test_math_extract_returns_the_last_marked_answer_with_nested_braces():
    assert math_task.extract(r"\boxed{\frac{a}{b^{2}}} and then \boxed{\sqrt{x_{1}}}") == r"\sqrt{x_{1}}"
    assert math_task.extract("no marker here, 42") is None
    assert MathTask([], fallback_last_number=True).extract("no marker here, 42 and 43.") == "43"


def test_gsm8k_reference_solution_is_cut_to_the_number():
    sol = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    assert MathTask.reference_from_solution(sol) == "72"
    assert MathTask.reference_from_solution(" 5 ") == "5"
    assert MathTask.reference_from_solution("Total.\n#### 1,234") == "1234"
    assert MathTask.reference_from_solution(r"So the answer is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"


def test_math_verify_works_off_the_main_thread():
    # math-verify's timeout uses SIGALRM, which only the main thread may install.
    out = []
    th = threading.Thread(target=lambda: out.append(math_task.verify(r"\boxed{\frac{1}{2}}", "0.5")))
    th.start()
    th.join()
    assert out == [True]


def test_math_verify_never_raises_on_odd_output():
    for junk in [r"\boxed{\frac{", r"\boxed{}", "#### " + "9" * 5000, r"\boxed{\undefinedmacro{1}}", "\x00####\x00"]:
        assert math_task.verify(junk, "72") is False


# ----------------------------------------------------------------------------- MCQTask

mcq = MCQTask([], letters="ABCD")
mcq10 = MCQTask([], letters="ABCDEFGHIJ")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The answer is (B).", "B"),
        (r"So the final answer is \boxed{C}", "C"),
        (r"\boxed{(d)}", "D"),
        (r"\boxed{\text{B}}", "B"),
        (r"\boxed{B. the second one}", "B"),
        ("Answer: D", "D"),
        ("Answer: b", "B"),
        ("answer: (c)", "C"),
        ("I believe the answer is **D**", "D"),
        ("The correct option is C.", "C"),
        # boxed beats a later explicit or standalone letter
        (r"\boxed{A}. Not B.", "A"),
        # explicit statement beats a later standalone letter
        ("The answer is (B). Option D is a distractor.", "B"),
        # last standalone letter
        ("Comparing C and D, I pick D", "D"),
        ("B", "B"),
        ("(C)", "C"),
        # lowercase "a" (article) is not choice A; "A cat" / "I think" are words
        ("It is a good question, but I think C", "C"),
        ("C. A cat would not agree.", "C"),
        ("the answer is a bit tricky; D", "D"),
        ("A is correct", "A"),
        # letters inside words are not choices
        ("Bob and Dave agree", None),
        ("I'm not sure", None),
        # invalid letters outside the choices
        (r"\boxed{E}", None),
        ("The answer is (F).", None),
        (r"\boxed{E} hmm, so B", "B"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_mcq_extract(completion, expected):
    assert mcq.extract(completion) == expected


def test_mcq_with_ten_choices_reads_I_as_a_letter_only_when_not_a_pronoun():
    assert mcq10.extract("I think the answer is (I).") == "I"
    assert mcq10.extract("I believe it's G") == "G"
    assert mcq10.extract("G. I am sure.") == "G"
    assert mcq10.extract("Answer: I") == "I"
    assert mcq.extract("Answer: I") is None  # outside A-D


def test_mcq_verify_compares_letters_case_insensitively():
    assert mcq.verify(r"\boxed{b}", "B") is True
    assert mcq.verify("The answer is (C).", "B") is False
    assert mcq.verify("no idea", "B") is False


def test_mcq_prompt_lists_choices_with_letters():
    p = MCQTask.format_prompt("Which is a prime?", ["4", "6", "7"])
    assert "Which is a prime?" in p and "A) 4\nB) 6\nC) 7" in p and r"\boxed{}" in p


# ----------------------------------------------------------------------------- loading


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_gsm8k_from_local_jsonl(tmp_path):
    src = write_jsonl(tmp_path / "gsm8k_test.jsonl", [
        {"question": "Q1?", "answer": "Work.\n#### 72"},
        {"question": "Q2?", "answer": "Work.\n#### 1,000"},
        {"question": "Q3?", "answer": "#### 5"},
    ])
    task = load_task(TaskConfig(name="gsm8k", source=src, n=2))
    assert isinstance(task, MathTask) and task.name == "gsm8k" and len(task) == 2
    assert [q.id for q in task.questions] == ["0", "1"]
    assert [q.answer for q in task.questions] == ["72", "1000"]
    assert task.questions[0].prompt.startswith("Q1?") and r"\boxed{}" in task.questions[0].prompt
    assert task.verify(r"so \boxed{1000}", task.questions[1].answer)


def test_load_ids_are_source_row_indices_even_when_rows_are_skipped(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "Q0?", "answer": "#### 1"},
        {"question": "", "answer": "#### 2"},  # unusable: empty question
        {"question": "Q2?", "answer": "#### 3"},
    ])
    task = load_task(TaskConfig(name="math", source=src))
    assert [q.id for q in task.questions] == ["0", "2"]
    assert load_task(TaskConfig(name="math", source=src)).questions == task.questions


def test_load_supergpqa_style_mcq_with_id_column_and_custom_fields(tmp_path):
    src = write_jsonl(tmp_path / "sgpqa.jsonl", [
        {"uuid": "u1", "q": "Pick two", "opts": ["one", "two", "three"], "ans": "B"},
        {"uuid": "u2", "q": "Pick three", "opts": ["one", "two", "three"], "ans": 2},
    ])
    cfg = TaskConfig(name="supergpqa", source=src, question_field="q", answer_field="ans",
                     choices_field="opts", id_field="uuid")
    task = load_task(cfg)
    assert isinstance(task, MCQTask) and task.letters == "ABC"
    assert [(q.id, q.answer) for q in task.questions] == [("u1", "B"), ("u2", "C")]
    assert "A) one\nB) two\nC) three" in task.questions[0].prompt
    assert task.questions[0].meta["choices"] == ["one", "two", "three"]


def test_load_mcq_defaults_are_supergpqa_fields(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"question": "Q", "options": ["x", "y"], "answer_letter": "A"}])
    assert load_task(TaskConfig(name="mcq", source=src)).questions[0].answer == "A"


def test_load_json_list_and_split_keyed_object(tmp_path):
    rows = [{"question": "Q", "answer": "#### 4"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"test": rows}))
    assert load_task(TaskConfig(name="gsm8k", source=str(tmp_path / "a.json"))).questions[0].answer == "4"
    assert load_task(TaskConfig(name="gsm8k", source=str(tmp_path / "b.json"), split="test")).questions[0].answer == "4"
    with pytest.raises(DataError, match="'train'"):
        load_task(TaskConfig(name="gsm8k", source=str(tmp_path / "b.json"), split="train"))


def test_load_empty_file_is_a_data_error_naming_the_file(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    with pytest.raises(DataError, match="empty.jsonl.*no usable rows"):
        load_task(TaskConfig(name="gsm8k", source=str(src)))


def test_load_rows_missing_fields_is_a_data_error_naming_the_fields(tmp_path):
    src = write_jsonl(tmp_path / "wrong.jsonl", [{"problem": "Q", "solution": "#### 1"}] * 3)
    with pytest.raises(DataError, match=r"wrong.jsonl.*'question'.*'answer'"):
        load_task(TaskConfig(name="gsm8k", source=src))


def test_load_malformed_json_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "Q", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_task(TaskConfig(name="gsm8k", source=str(src)))


def test_load_mcq_answer_outside_choices_names_row_and_value(tmp_path):
    src = write_jsonl(tmp_path / "m.jsonl", [{"question": "Q", "options": ["x", "y"], "answer_letter": "D"}])
    with pytest.raises(DataError, match=r"row 0.*'D'"):
        load_task(TaskConfig(name="mcq", source=src))


def test_load_missing_local_file_and_bad_config(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_task(TaskConfig(name="gsm8k", source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match="'poetry'"):
        load_task(TaskConfig(name="poetry", source="x.jsonl"))
    with pytest.raises(ConfigError, match="task.source"):
        load_task(TaskConfig(name="gsm8k"))
    with pytest.raises(ConfigError, match="n must be"):
        load_task(TaskConfig(name="gsm8k", source="x.jsonl", n=0))


def test_load_hub_id_offline_fails_fast_naming_dataset_and_local_file_route():
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        load_task(TaskConfig(name="gsm8k", source="openai/gsm8k-does-not-exist-locally", subset="main", split="test"))
    assert time.monotonic() - t0 < 20
    msg = str(err.value)
    assert "openai/gsm8k-does-not-exist-locally" in msg and "task.source=" in msg and ".jsonl" in msg


def test_load_arithmetic_delegates_to_the_organism_task():
    task = load_task(TaskConfig(name="arithmetic", split="eval", n=5, seed=1))
    assert len(task) == 5 and task.name == "arithmetic"
    again = load_task(TaskConfig(name="arithmetic", split="eval", n=5, seed=1))
    assert [q.id for q in task.questions] == [q.id for q in again.questions]
    with pytest.raises(ConfigError, match="source"):
        load_task(TaskConfig(name="arithmetic", source="x.jsonl"))


def test_task_config_group_files_only_use_task_config_fields():
    import dataclasses
    import pathlib

    import yaml

    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    conf = pathlib.Path(__file__).resolve().parents[1] / "conf" / "task"
    for name in ("arithmetic", "gsm8k", "supergpqa"):
        data = yaml.safe_load((conf / f"{name}.yaml").read_text())
        assert set(data) <= fields, (name, set(data) - fields)
        TaskConfig(**data)
