"""One prompt format from G1 to RL: a tokenizer that adds a BOS and one with a chat template (and a
default system prompt, as SmolLM2's) get the same prompt ids in rollouts/G1, in G2's evaluation, and in
the GRPO trainer (TRL's own tokenisation included); formats are recorded and read back from packs."""

import json

import pytest
import torch
from datasets import Dataset

from mechreward.errors import ConfigError, DataError
from mechreward.prompts import PromptFormat, encode_prompt, format_of_header, format_of_pack, prompt_ids
from tests.tiny import save_tiny, tiny_tokenizer

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
          "You are a helpful AI assistant named Tiny<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A ChatML template that injects a default system prompt when none is given (as SmolLM2's does)."""


def bos_tokenizer():
    from tokenizers import processors

    tok = tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", bos)])
    tok.bos_token = "<|endoftext|>"
    return tok


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _trl_ids(tok, prompts, tmp_path):
    """What TRL's own GRPOTrainer._tokenize_prompts makes of `prompts` (strings or conversations)."""
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, num_generations=2,
                      max_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    tr = GRPOTrainer(str(save_tiny(tmp_path / "trlm", "qwen3")), reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                     args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * 2), processing_class=tok)
    return [list(map(int, x)) for x in GRPOTrainer._tokenize_prompts(tr, prompts)[0]]


def test_bos_tokenizer_gets_the_ids_trl_gives_string_prompts(tmp_path):
    tok = bos_tokenizer()
    text = "The quick brown fox 12+7"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"] == [tok.bos_token_id] + plain  # the tokenizer really adds a BOS
    fmt = PromptFormat(chat_template=False).resolve(tok)
    ours = encode_prompt(tok, fmt, text)
    assert ours == [tok.bos_token_id] + plain  # G1's ids now carry the BOS, as TRL's do
    assert _trl_ids(tok, [text], tmp_path) == [ours]
    # the older G1 spelling (no special tokens) is what a pre-format rollout header means
    old = format_of_header({"chat_template": False})
    assert encode_prompt(tok, old, text) == plain


def test_system_prompt_none_empty_and_text_and_template_file(tmp_path):
    tok = chat_tokenizer()
    q = "12+7"

    def text(**kw):
        return tok.decode(encode_prompt(tok, PromptFormat(**kw).resolve(tok), q))

    assert "named Tiny" in text()  # null: the template's own default system prompt
    assert "named Tiny" not in text(system_prompt="") and "<|im_start|>system\n<|im_end|>" in text(system_prompt="")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text(system_prompt="Be brief.")
    f = tmp_path / "t.txt"
    f.write_text("Solve this.\n{prompt}\nThink {step} by step.")
    t = text(prompt_template_file=str(f), chat_template=False)
    assert t == "Solve this.\n12+7\nThink {step} by step."  # only {prompt} is substituted
    with pytest.raises(ConfigError, match="placeholder"):
        PromptFormat(prompt_template="no placeholder").resolve(tok)
    with pytest.raises(ConfigError, match="not both"):
        PromptFormat(prompt_template="A {prompt}", prompt_template_file=str(f)).resolve(tok)
    with pytest.raises(ConfigError, match="no chat template"):
        PromptFormat(chat_template=True).resolve(tiny_tokenizer())
    assert PromptFormat().resolve(tok).chat and not PromptFormat().resolve(tiny_tokenizer()).chat


def test_rollouts_g2_and_rl_feed_the_same_ids_with_a_chat_template(tmp_path):
    """G1's rollouts record the format; a pack pointing at them gives G2's evaluation and the GRPO trainer
    (MechGRPOTrainer, tokenising TRL's prompts) exactly the rollouts' prompt ids, which equal TRL's own
    conversational tokenisation."""
    from mechreward.grpo import MechGRPOTrainer, evaluate_policy
    from mechreward.models import ModelConfig, load_model
    from mechreward.probe import FeaturePack
    from mechreward.reward import OutcomeReward
    from mechreward.rl import RLConfig, run_format
    from mechreward.rollouts import RolloutsConfig, RolloutSet, SamplingConfig, SAERef, generate_rollouts
    from mechreward.rollouts import sae_reference
    from mechreward.run import Run
    from mechreward.tasks import TaskConfig, load_task
    from mechreward.tasks.arithmetic import ArithmeticTask

    model_dir = save_tiny(tmp_path / "m", "qwen3")
    chat_tokenizer().save_pretrained(model_dir)
    mcfg = ModelConfig(str(model_dir), device="cpu")
    model, tok = load_model(mcfg)
    assert tok.chat_template
    fmt_cfg = PromptFormat(system_prompt="Be brief.")
    rcfg = RolloutsConfig(model=mcfg, task=TaskConfig(split="eval", n=3),
                          sampling=SamplingConfig(n=1, greedy=True, max_new_tokens=3, prompt=fmt_cfg),
                          sae=SAERef(None), layers=[1], store_token_codes=False)
    rs = RolloutSet(generate_rollouts(rcfg, Run(tmp_path / "roll", "rollouts"), model, tok))
    header = json.loads((rs.dir / "manifest.json").read_text())
    assert header["chat_template"] is True and header["prompt_format"]["system_prompt"] == "Be brief."
    assert "Be brief." in header["prompt_example"]
    g1_ids = {r["question_id"]: r["prompt_ids"] for r in rs.records}

    from mechreward.sae import SAEConfig, SparseAutoencoder
    from mechreward.sae.formats import load_sae, save_sae

    sae = load_sae(save_sae(SparseAutoencoder.from_config(SAEConfig(64, 128, 8, metadata={"layer": 1})),
                            tmp_path / "sae"))
    pack = FeaturePack(model=str(model_dir), layer=1, hook="model.layers.1", sae=sae_reference(sae),
                       features=[{"index": 0, "weight": 1.0}], provenance={"rollouts": str(rs.dir)})
    fmt = format_of_pack(pack).resolve(tok)  # read from the rollout header, as g2 and rl do
    assert fmt.chat and fmt.system_prompt == "Be brief."
    qs = load_task(TaskConfig(split="eval", n=3)).questions
    # G2's (and the rl monitor's) evaluation
    ev = evaluate_policy(model, tok, qs, ArithmeticTask(n=3), None, max_new_tokens=2, prompt_format=fmt)
    assert ev["prompt_ids"] == [g1_ids[q.id] for q in qs]
    # rl: the pack's format (a different prompt: setting is refused)
    assert run_format(RLConfig(), pack, tok).same_as(fmt)
    with pytest.raises(ConfigError, match="differs from the format"):
        run_format(RLConfig(prompt=PromptFormat(system_prompt="Other.")), pack, tok)
    # the GRPO trainer: ids TRL generates from and scores
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=2, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                      save_strategy="no", beta=0.0)
    trainer = MechGRPOTrainer(model, reward_funcs=[OutcomeReward(ArithmeticTask(n=3))], args=args,
                              train_dataset=Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in qs]),
                              processing_class=tok, prompt_format=fmt)
    ids, _, _ = trainer._tokenize_prompts([q.prompt for q in qs])
    assert ids == [g1_ids[q.id] for q in qs]
    rows = [{"prompt": qs[0].prompt, "answer": qs[0].answer}] * 2
    trainer.model.train()
    out = trainer._generate_and_score_completions(rows)
    p = out["prompt_ids"][0][out["prompt_mask"][0].bool()].tolist()
    assert p == g1_ids[qs[0].id]
    # and TRL's own chat tokenisation of the same conversation gives the same ids
    assert _trl_ids(tok, [fmt.messages(qs[0].prompt)], tmp_path) == [g1_ids[qs[0].id]]


def test_pack_records_the_format_or_refuses(tmp_path):
    from mechreward.probe import FeaturePack

    kw = dict(model="m", layer=1, hook="h", sae={"d_sae": 4}, features=[{"index": 0, "weight": 1.0}])
    with pytest.raises(DataError, match="records no prompt format"):
        format_of_pack(FeaturePack(**kw))
    f = PromptFormat(chat_template=True, system_prompt="", chat_template_kwargs={"enable_thinking": False})
    assert format_of_pack(FeaturePack(**kw, provenance={"prompt_format": f.to_dict()})) == f
    # prompt_ids over questions is encode_prompt per question
    tok = chat_tokenizer()
    from mechreward.tasks.arithmetic import ArithmeticTask

    qs = ArithmeticTask(n=2).questions
    r = PromptFormat().resolve(tok)
    assert prompt_ids(tok, qs, r) == [encode_prompt(tok, r, q.prompt) for q in qs]
    assert torch.tensor(prompt_ids(tok, qs, r)[0]).numel() > 5
