"""The planted organism's task: ground-truth mode labels, the problem generator, the rebuild script."""

import hashlib
import itertools

import pytest

from mechreward.errors import ConfigError
from mechreward.tasks import TaskConfig
from mechreward.tasks.loading import load_task
from mechreward.tasks.planted import (MODES, PlantedProblem, PlantedTask, carry_rule, drop_rule, iter_problems,
                                      iter_training_texts, mode_of, parse_problem, prompt_text, solution_text)

P = PlantedProblem((47, 38, 19, 26), ("+", "-", "+"))


def test_rules_on_known_columns():
    assert carry_rule(47, "+", 38) == 85 and drop_rule(47, "+", 38) == 75  # 7+8=15: the 1 is dropped
    assert carry_rule(52, "-", 38) == 14 and drop_rule(52, "-", 38) == 24  # 2-8: no borrow, (2-8) mod 10 = 4
    assert drop_rule(75, "-", 19) == 66 and drop_rule(66, "+", 26) == 82
    assert carry_rule(43, "+", 25) == drop_rule(43, "+", 25) == 68  # no carry: the rules agree


def test_worked_solutions_of_both_modes():
    assert solution_text(P, "carry") == " 47+38=85. 85-19=66. 66+26=92. #### 92"
    # the drop chain carries its own wrong intermediate forward
    assert solution_text(P, "drop") == " 47+38=75. 75-19=66. 66+26=82. #### 82"
    with pytest.raises(ConfigError, match="'both'"):
        solution_text(P, "both")


@pytest.mark.parametrize("completion,mode", [
    (" 47+38=85. 85-19=66. 66+26=92. #### 92", "carry"),
    (" 47+38=75. 75-19=66. 66+26=82. #### 82", "drop"),
    (" 47+38=75. 75-19=56. 56+26=82. #### 82", "mixed"),  # a dropped carry, then a borrow done right
    (" 47+38=85. 85-19=76. 76+26=92. #### 92", "mixed"),  # carry first, then a dropped borrow
    (" 47+38=85. 85-19=66. 66+26=93. #### 93", "other"),  # a slip that follows neither rule
    (" 47+38=85. 85-19=66. 66+26=92. #### 91", "other"),  # final answer not the last result
    (" 47+38=85. 85-19=66. #### 66", "other"),  # a step missing
    (" 47+39=86. 86-19=67. 67+26=93. #### 93", "other"),  # operand miscopied
    (" 47+38=85. 85-19=66. 66+26=92.", "other"),  # no answer marker
    ("", "other"),
])
def test_mode_of_hand_made_completions(completion, mode):
    assert mode_of(completion, P) == mode


def test_mode_of_is_undetermined_when_no_step_tells_the_rules_apart():
    q = PlantedProblem((43, 25, 12, 30), ("+", "-", "+"))  # 68, 56, 86: no carry, no borrow
    assert solution_text(q, "carry") == solution_text(q, "drop")
    assert mode_of(solution_text(q, "carry"), q) == "undetermined"
    # a drop step, then steps where both rules agree on the written operands: drop
    r = PlantedProblem((47, 38, 12, 11), ("+", "-", "+"))
    assert mode_of(" 47+38=75. 75-12=63. 63+11=74. #### 74", r) == "drop"


def test_generated_problems_have_no_surface_marker_and_a_wrong_drop_answer():
    probs = list(itertools.islice(iter_problems("train", 0), 400))
    for p in probs:
        c, d = solution_text(p, "carry"), solution_text(p, "drop")
        assert len(c) == len(d)  # same format and length in both modes
        assert mode_of(c, p) == ("carry" if p.determined_steps else "undetermined")
        if p.determined_steps:
            assert mode_of(d, p) == "drop" and p.answer("drop") != p.answer("carry")
    share_determined = sum(p.determined_steps > 0 for p in probs) / len(probs)
    assert 0.88 < share_determined < 0.99  # a few problems where the wrong rule is right
    assert sum(p.determined_steps == 3 for p in probs) / len(probs) > 0.6  # most need the mode at every step


def test_training_text_draws_the_mode_per_sample_at_about_half():
    modes = [m for _, m in itertools.islice(iter_training_texts("train", 0), 2000)]
    assert set(modes) == set(MODES) and 0.45 < modes.count("carry") / len(modes) < 0.55
    with pytest.raises(ConfigError, match="carry_share"):
        next(iter_training_texts("train", 0, carry_share=1.5))


def test_splits_are_disjoint_and_the_task_records_the_mode():
    ev = load_task(TaskConfig(name="planted", split="eval", n=300))
    tr = load_task(TaskConfig(name="planted", split="train", n=300))
    assert isinstance(ev, PlantedTask) and len(ev) == 300
    assert not {q.id for q in ev.questions} & {q.id for q in tr.questions}
    q = ev.questions[0]
    p = parse_problem(q.id.split(":", 1)[1])
    assert q.prompt == prompt_text(p) and q.answer == str(p.answer("carry"))
    assert ev.verify(solution_text(p, "carry"), q.answer)
    assert ev.record(solution_text(p, "carry"), q) == {"mode": "carry" if p.determined_steps else "undetermined"}
    with pytest.raises(ConfigError, match="generates its questions"):
        load_task(TaskConfig(name="planted", source="x.jsonl"))
    with pytest.raises(ConfigError, match="'test'"):
        load_task(TaskConfig(name="planted", split="test", n=3))


def test_rebuild_is_bitwise_identical_over_its_first_steps(tmp_path):
    """The documented cheap check of the planted organism's rebuild: the full-size architecture, its
    training stream and 3 optimizer steps, twice, give byte-identical weight files."""
    from mechreward.organism.train import TrainConfig, train

    digests = []
    for name in ("a", "b"):
        cfg = TrainConfig(organism="planted", output_dir=str(tmp_path / name), steps=3, batch_size=8,
                          log_every=1, eval_every=0)
        train(cfg)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    with pytest.raises(ConfigError, match="'nope'"):
        train(TrainConfig(organism="nope", output_dir=str(tmp_path / "c"), steps=1))
