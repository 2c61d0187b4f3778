"""The planted organism's task: ground-truth mode labels, the problem generator, the rebuild script."""

import hashlib
import itertools

import pytest

from mechreward.errors import ConfigError
from mechreward.tasks import TaskConfig
from mechreward.tasks.loading import load_task
from mechreward.tasks.planted import (MODES, PlantedProblem, PlantedTask, iter_problems, iter_training_texts, mode_of,
                                      parse_problem, prompt_text, right_rule, solution_text, swap_rule)

P = PlantedProblem((27, 49, 44, 29), ("+", "-", "+"))


def test_rules_on_known_results():
    assert right_rule(27, "+", 49) == 76 and swap_rule(27, "+", 49) == 67  # the result's digits swapped
    assert right_rule(52, "-", 38) == 14 and swap_rule(52, "-", 38) == 41
    assert swap_rule(67, "-", 44) == 32 and swap_rule(32, "+", 29) == 16
    assert right_rule(20, "+", 24) == swap_rule(20, "+", 24) == 44  # a palindrome: the rules agree


def test_worked_solutions_of_both_modes():
    assert solution_text(P, "right") == " 27+49=76. 76-44=32. 32+29=61. #### 61"
    # the swap chain carries its own wrong intermediate forward (67-44 = 23, written 32)
    assert solution_text(P, "swap") == " 27+49=67. 67-44=32. 32+29=16. #### 16"
    with pytest.raises(ConfigError, match="'both'"):
        solution_text(P, "both")


@pytest.mark.parametrize("completion,mode", [
    (" 27+49=76. 76-44=32. 32+29=61. #### 61", "right"),
    (" 27+49=67. 67-44=32. 32+29=16. #### 16", "swap"),
    (" 27+49=67. 67-44=23. 23+29=52. #### 52", "mixed"),  # swapped first, then right
    (" 27+49=76. 76-44=23. 23+29=52. #### 52", "mixed"),  # right first, then a swapped result
    (" 27+49=76. 76-44=32. 32+29=62. #### 62", "other"),  # a slip that follows neither rule
    (" 27+49=76. 76-44=32. 32+29=61. #### 16", "other"),  # final answer not the last result
    (" 27+49=76. 76-44=32. #### 32", "other"),  # a step missing
    (" 27+48=75. 75-44=31. 31+29=60. #### 60", "other"),  # operand miscopied
    (" 27+49=76. 76-44=32. 32+29=61.", "other"),  # no answer marker
    ("", "other"),
])
def test_mode_of_hand_made_completions(completion, mode):
    assert mode_of(completion, P) == mode


def test_mode_of_is_undetermined_when_no_step_tells_the_rules_apart():
    q = PlantedProblem((20, 24, 11, 11), ("+", "-", "+"))  # 44, 33, 44: palindromes only
    assert solution_text(q, "right") == solution_text(q, "swap")
    assert mode_of(solution_text(q, "right"), q) == "undetermined"
    # a swapped step, then steps where both rules agree on the written operands: swap
    r = PlantedProblem((27, 49, 23, 11), ("+", "-", "+"))
    assert mode_of(" 27+49=67. 67-23=44. 44+11=55. #### 55", r) == "swap"


def test_generated_problems_have_no_surface_marker_and_a_wrong_swap_answer():
    probs = list(itertools.islice(iter_problems("train", 0), 400))
    for p in probs:
        c, d = solution_text(p, "right"), solution_text(p, "swap")
        assert len(c) == len(d)  # same format and length in both modes
        assert mode_of(c, p) == ("right" if p.determined_steps else "undetermined")
        if p.determined_steps:
            assert mode_of(d, p) == "swap" and p.answer("swap") != p.answer("right")
        for mode in MODES:  # every result, and every right result before its swap, two digits, no trailing 0
            for a, op, b, r in p.steps(mode):
                assert 10 <= r <= 99 and 10 <= right_rule(a, op, b) <= 99 and right_rule(a, op, b) % 10
    assert sum(p.determined_steps >= 2 for p in probs) / len(probs) > 0.95  # the mode needed at most steps
    assert sum(p.determined_steps == 3 for p in probs) / len(probs) > 0.6


def test_training_text_draws_the_mode_per_sample_at_about_half():
    modes = [m for _, m in itertools.islice(iter_training_texts("train", 0), 2000)]
    assert set(modes) == set(MODES) and 0.45 < modes.count("right") / len(modes) < 0.55
    with pytest.raises(ConfigError, match="right_share"):
        next(iter_training_texts("train", 0, right_share=1.5))


def test_splits_are_disjoint_and_the_task_records_the_mode():
    ev = load_task(TaskConfig(name="planted", split="eval", n=300))
    tr = load_task(TaskConfig(name="planted", split="train", n=300))
    assert isinstance(ev, PlantedTask) and len(ev) == 300
    assert not {q.id for q in ev.questions} & {q.id for q in tr.questions}
    q = ev.questions[0]
    p = parse_problem(q.id.split(":", 1)[1])
    assert q.prompt == prompt_text(p) and q.answer == str(p.answer("right"))
    assert ev.verify(solution_text(p, "right"), q.answer)
    assert ev.record(solution_text(p, "right"), q) == {"mode": "right" if p.determined_steps else "undetermined"}
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
