"""Batched sampling: exact ids, log-probs that a teacher-forced pass reproduces, left padding."""

import pytest
import torch

from mechreward.errors import ConfigError, DataError
from mechreward.generate import left_pad, sample
from mechreward.models import load_model
from mechreward.tasks.arithmetic import ArithmeticTask


@pytest.fixture(scope="module")
def organism():
    return load_model("organism", device="cpu")


@pytest.fixture(scope="module")
def prompts():
    qs = ArithmeticTask("eval", n=40, seed=7).questions
    # different lengths, so a batch really is left-padded
    out = sorted({q.prompt for q in qs}, key=len)
    return [out[0], out[len(out) // 2], out[-1], out[1]]


def test_left_pad_right_aligns_rows():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_samples_come_in_prompt_major_order_with_exact_ids(organism, prompts):
    model, tok = organism
    out = sample(model, tok, prompts, n=3, batch_size=5, seed=0, max_new_tokens=64)
    assert [(s.prompt_index, s.sample_index) for s in out] == [(i, j) for i in range(4) for j in range(3)]
    eos = tok.eos_token_id
    for s in out:
        assert s.prompt_ids == tok(prompts[s.prompt_index], add_special_tokens=False)["input_ids"]
        assert len(s.logprobs) == len(s.completion_ids) > 0
        if s.finish_reason == "eos":
            assert s.completion_ids[-1] == eos and eos not in s.completion_ids[:-1]
        else:
            assert len(s.completion_ids) == 64 and eos not in s.completion_ids
        assert s.text == tok.decode(s.completion_ids, skip_special_tokens=True)
        assert all(lp <= 0 for lp in s.logprobs)
    assert any(s.finish_reason == "eos" for s in out)


def test_logprobs_match_a_teacher_forced_forward_over_the_exact_ids(organism, prompts):
    model, tok = organism
    out = sample(model, tok, prompts, n=2, batch_size=8, seed=1, temperature=1.0)
    for s in out:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()  # [seq, vocab]
        lp = torch.log_softmax(logits[len(s.prompt_ids) - 1:-1], -1)
        ref = lp.gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(s.logprobs), atol=1e-3), (ref - torch.tensor(s.logprobs)).abs().max()


def test_logprobs_are_untempered(organism, prompts):
    model, tok = organism
    hot = sample(model, tok, prompts[:2], n=2, batch_size=4, seed=2, temperature=2.0, max_new_tokens=24)
    for s in hot:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1].float(), -1)
        ref = lp.gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(s.logprobs), atol=1e-3)


def test_batched_greedy_equals_unbatched_greedy(organism, prompts):
    model, tok = organism
    batched = sample(model, tok, prompts, greedy=True, batch_size=len(prompts))
    single = [sample(model, tok, [p], greedy=True, batch_size=1)[0] for p in prompts]
    assert [s.completion_ids for s in batched] == [s.completion_ids for s in single]
    for a, b in zip(batched, single):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3


def test_sampling_is_deterministic_for_a_seed(organism, prompts):
    model, tok = organism
    a = sample(model, tok, prompts, n=2, seed=11, batch_size=8, max_new_tokens=32)
    b = sample(model, tok, prompts, n=2, seed=11, batch_size=8, max_new_tokens=32)
    c = sample(model, tok, prompts, n=2, seed=12, batch_size=8, max_new_tokens=32)
    assert [s.completion_ids for s in a] == [s.completion_ids for s in b]
    assert [s.completion_ids for s in a] != [s.completion_ids for s in c]


def test_length_cut_and_token_id_prompts(organism, prompts):
    model, tok = organism
    ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
    out = sample(model, tok, [ids], max_new_tokens=3, greedy=True)
    assert out[0].finish_reason == "length" and len(out[0].completion_ids) == 3
    assert out[0].prompt_ids == ids


def test_bad_arguments(organism):
    model, tok = organism
    with pytest.raises(ConfigError, match="-1"):
        sample(model, tok, ["Q: 1+1=?\nA:"], n=-1)
    with pytest.raises(ConfigError, match="0.0"):
        sample(model, tok, ["Q: 1+1=?\nA:"], temperature=0.0)
    with pytest.raises(DataError, match="no prompts"):
        sample(model, tok, [])
