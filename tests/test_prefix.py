"""The shared-prompt forward (`mechreward.prefix`) against TRL's one-pass forward, on real TRL 1.16 + PEFT.

Specifications: with each distinct prompt run once, TRL's per-token log-probs, entropies and the LoRA
gradients of a loss over them equal the one-pass forward's (to float summation order), while the model
embeds far fewer tokens; HF `generate` with the shared prefill gives the same greedy tokens and step
scores as a plain `generate`; the LP arm's mean log-prob equals an independent full-logits computation;
a model with linear-attention layers (Qwen3.5) keeps the one-pass forward.
"""

import pytest
import torch

from mechreward.confidence import MeanLogProbReward
from mechreward.prefix import generate_shared, prompt_groups, supports_shared_prompt
from tests.test_grpo import _rows, _trainer, sae_and_pack, tiny_dir  # noqa: F401  (fixtures)
from tests.tiny import tiny_model


def test_prompt_groups_index_each_row_to_its_distinct_prompt():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1]] * 2 + [[1, 1, 1]] + [[0, 1, 1]] + [[1, 1, 1]])
    first, inverse = prompt_groups(ids, mask)
    assert torch.equal(ids[first][inverse], ids) and torch.equal(mask[first][inverse], mask)
    assert sorted(first.tolist()) == [0, 2]
    # the same ids under another mask are another prompt; no repeat -> None
    mask2 = mask.clone()
    mask2[1] = torch.tensor([1, 1, 1])
    assert len(prompt_groups(ids, mask2)[0]) == 3
    assert prompt_groups(ids[[0, 2]], mask[[0, 2]]) is None


def _batch(trainer):
    torch.manual_seed(1)
    out = trainer._generate_and_score_completions(_rows(trainer))
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    return out, ids, attn


def _embedded_tokens(model):
    counts = []
    emb = model.get_input_embeddings()
    return counts, emb.register_forward_hook(lambda m, a, o: counts.append(a[0].numel()))


def test_shared_prompt_logps_entropies_and_lora_gradients_equal_trls_one_pass(tmp_path, tiny_dir, sae_and_pack):  # noqa: F811 (fixtures)
    trainer, _ = _trainer(tmp_path, tiny_dir, sae_and_pack, peft=True, beta=0.0, per_device_train_batch_size=8,
                          num_generations=4)
    out, ids, attn = _batch(trainer)
    C = out["completion_ids"].shape[1]
    assert prompt_groups(out["prompt_ids"], out["prompt_mask"]) is not None
    res = {}
    for share in (True, False):
        trainer.share_prompts = share
        trainer.model.zero_grad()
        counts, h = _embedded_tokens(trainer.model)
        try:
            lp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, C, 8,
                                                                    compute_entropy=True)
        finally:
            h.remove()
        (lp * out["completion_mask"]).sum().backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        res[share] = lp.detach(), ent.detach(), grads, sum(counts)
    (lp1, ent1, g1, n1), (lp0, ent0, g0, n0) = res[True], res[False]
    assert lp0.abs().max() > 1  # real log-probs, not zeros
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-5)
    assert g1.keys() == g0.keys() and any("lora_A" in n for n in g0)
    for n in g0:
        assert g0[n].abs().max() > 0
        assert ((g1[n] - g0[n]).norm() / g0[n].norm()).item() < 1e-4, n
    # 2 distinct prompts of width P minus 1, then 8 rows of (1 + C) tokens, against 8 rows of P + C
    P = out["prompt_ids"].shape[1]
    assert n0 == 8 * (P + C) and n1 == 2 * (P - 1) + 8 * (C + 1)


def test_generate_with_the_shared_prefill_gives_plain_generates_tokens_and_scores(tmp_path, tiny_dir, sae_and_pack):  # noqa: F811 (fixtures)
    trainer, _ = _trainer(tmp_path, tiny_dir, sae_and_pack, peft=True, per_device_train_batch_size=8,
                          num_generations=4)
    out, _, _ = _batch(trainer)
    model = trainer.model.eval()
    ids, mask = out["prompt_ids"], out["prompt_mask"]
    assert (mask == 0).any()  # left padding is exercised
    kw = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    tokens = {}
    for name, gen in (("plain", lambda: model.generate(input_ids=ids, attention_mask=mask, **kw)),
                      ("shared", lambda: generate_shared(model, ids, mask, **kw))):
        counts, h = _embedded_tokens(model)
        try:
            with torch.no_grad():
                tokens[name] = (gen(), sum(counts))
        finally:
            h.remove()
    (plain, n_plain), (shared, n_shared) = tokens["plain"], tokens["shared"]
    # the shared path ran: 2 distinct prompts prefilled once, then the last prompt token per row
    P = ids.shape[1]
    assert n_plain - n_shared == 8 * P - (2 * (P - 1) + 8)
    assert torch.equal(plain.sequences, shared.sequences)
    for a, b in zip(plain.scores, shared.scores):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_lp_reward_equals_an_independent_full_logits_mean_logprob(tmp_path, tiny_dir, sae_and_pack):  # noqa: F811 (fixtures)
    trainer, _ = _trainer(tmp_path, tiny_dir, sae_and_pack, peft=True, per_device_train_batch_size=8,
                          num_generations=4, temperature=0.7)
    out, _, _ = _batch(trainer)
    lp = MeanLogProbReward().bind(trainer)
    prompts, comps = trainer._mech_ids[:2]
    got = lp(completion_ids=comps)
    model = trainer.model.eval()
    for p, c, g in zip(prompts, comps, got):  # one row at a time, no padding, full logits
        if not c:
            assert g != g
            continue
        x = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1].float() / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[len(p) - 1:, 0].mean().item()
        assert g == pytest.approx(want, abs=1e-5)
    assert len(set(round(g, 4) for g in got if g == g)) > 2


@pytest.mark.parametrize("arch,shared", [("qwen3", True), ("qwen3_5", False)])
def test_shared_prompt_applies_only_to_plain_key_value_caches(arch, shared):
    assert supports_shared_prompt(tiny_model(arch)) is shared
