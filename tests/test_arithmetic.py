"""The arithmetic task: generator, split, worked solutions, answer extraction."""

import pytest

from mechreward.errors import ConfigError
from mechreward.tasks.arithmetic import (
    ArithmeticTask,
    Problem,
    organism_corpus,
    parse_problem,
    solution_text,
    split_of,
    worked_solution,
)


def test_generator_is_deterministic_for_a_seed_and_differs_across_seeds():
    a = ArithmeticTask("eval", n=50, seed=3).questions
    b = ArithmeticTask("eval", n=50, seed=3).questions
    c = ArithmeticTask("eval", n=50, seed=4).questions
    assert [q.id for q in a] == [q.id for q in b]
    assert [q.id for q in a] != [q.id for q in c]
    # a longer request extends the shorter one (same stream)
    assert [q.id for q in ArithmeticTask("eval", n=80, seed=3).questions][:50] == [q.id for q in a]


def test_train_and_eval_never_overlap_across_seeds():
    ev = {q.id for s in range(3) for q in ArithmeticTask("eval", n=300, seed=s).questions}
    tr = {q.id for s in range(3) for q in ArithmeticTask("train", n=2000, seed=s).questions}
    assert len(ev) > 500 and len(tr) > 5000
    assert not ev & tr
    assert all(split_of(i.split(":", 1)[1]) == "eval" for i in ev)
    # corpus docs come from the train split only
    for doc in organism_corpus(500, seed=1):
        canonical = doc.split("\n")[0][len("Q: "):-len("=?")]
        assert split_of(canonical) == "train"


def test_questions_are_distinct_and_spread_in_difficulty():
    qs = ArithmeticTask("eval", n=200, seed=0).questions
    assert len({q.id for q in qs}) == 200
    assert {q.meta["n_operands"] for q in qs} == {2, 3, 4}
    assert {q.meta["max_digits"] for q in qs} == {1, 2, 3}
    assert len({q.meta["difficulty"] for q in qs}) >= 8


def test_worked_solution_folds_left_to_right_with_negative_intermediates():
    p = parse_problem("12-50+7")
    assert p == Problem((12, 50, 7), ("-", "+"))
    assert solution_text(p) == " 12-50=-38. -38+7=-31. #### -31"
    q = next(q for q in ArithmeticTask("train", n=50, seed=0).questions if q.meta["n_operands"] == 4)
    sol = worked_solution(q)
    assert sol.count("=") == 3 and sol.endswith(f"#### {q.answer}")
    assert q.prompt.startswith("Q: ") and q.prompt.endswith("=?\nA:")
    assert eval(q.id.split(":", 1)[1]) == int(q.answer)  # plain +/- chain: Python agrees


def test_every_worked_solution_verifies_and_its_answer_is_right():
    task = ArithmeticTask("eval", n=200, seed=1)
    for q in task.questions:
        assert int(q.answer) == eval(q.id.split(":", 1)[1])
        assert task.verify(task.worked_solution(q), q.answer)
        assert task.extract(task.worked_solution(q)) == q.answer


@pytest.mark.parametrize("completion,expected", [
    (" 3-10=-7. #### -7", "-7"),
    ("#### - 7", "-7"),
    ("####1,234", "1234"),
    ("#### 12 then more text", "12"),
    ("#### 5. #### 6", "6"),           # the last marker wins
    ("#### 007", "7"),
    ("no marker 42", None),
    ("#### ", None),
    ("#### x 5", None),
])
def test_extract(completion, expected):
    assert ArithmeticTask("eval", n=1).extract(completion) == expected


def test_verify_edge_cases():
    t = ArithmeticTask("eval", n=1)
    assert t.verify(" 2-9=-7. #### -7", "-7")
    assert not t.verify(" 2-9=-7. #### 7", "-7")
    assert not t.verify("the answer is -7", "-7")          # no #### → wrong
    assert not t.verify("#### -7 #### 8", "-7")             # the last #### counts
    assert t.verify("#### 1,000", "1000")
    assert not t.verify("####", "0")


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="'test'"):
        ArithmeticTask("test", n=5)
    with pytest.raises(ConfigError, match="0"):
        ArithmeticTask("eval", n=0)
    with pytest.raises(ConfigError, match="1\\*2"):
        parse_problem("1*2")
