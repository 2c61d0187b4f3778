"""The layer locator and residual capture on every supported architecture."""

import pytest
import torch
from torch import nn

from mechreward.errors import LayerError, ModelError
from mechreward.models import (ResidualCapture, find_final_norm, find_layers, hidden_size, layer_types,
                               load_model, normalize_layer, num_layers, residuals, unwrap)
from tiny import ARCHS, VOCAB, save_tiny, tiny_model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def _ids(batch=2, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


@pytest.fixture(scope="module", params=[(a, w) for a in ARCHS for w in (False, True)],
                ids=lambda p: p[0] + ("+lora" if p[1] else ""))
def model(request):
    arch, wrap = request.param
    m = tiny_model(arch)
    return _lora(m) if wrap else m


def test_capture_equals_hidden_states_of_next_index(model):
    ids = _ids()
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = num_layers(model)
    assert len(hs) == n + 1
    out = ResidualCapture(model, range(n), early_exit=False).run(input_ids=ids)
    for layer in range(n - 1):
        torch.testing.assert_close(out[layer], hs[layer + 1], rtol=0, atol=0)
    # The last layer's output is the residual BEFORE the final norm; hidden_states[-1] is after it.
    last = out[n - 1]
    assert not torch.allclose(last, hs[-1], atol=1e-3)
    norm = find_final_norm(model)
    torch.testing.assert_close(norm(last), hs[-1], rtol=1e-5, atol=1e-5)


def test_early_exit_is_identical_and_runs_no_deeper_layer(model):
    ids = _ids(seed=2)
    layers = find_layers(model)
    calls = [0] * len(layers)
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, m in enumerate(layers)]
    lm_head_calls = []
    head = unwrap(model).get_output_embeddings()
    handles.append(head.register_forward_pre_hook(lambda *a: lm_head_calls.append(1)))
    try:
        full = ResidualCapture(model, [1], early_exit=False).run(input_ids=ids)
        assert calls == [1] * len(layers) and len(lm_head_calls) == 1
        calls[:] = [0] * len(layers)
        cap = ResidualCapture(model, [0, 1], early_exit=True)
        early = cap.run(input_ids=ids)
        assert cap.stopped_early
        assert calls == [1, 1, 0, 0] and len(lm_head_calls) == 1
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(early[1], full[1], rtol=0, atol=0)
    # hooks are removed after the block: a plain forward runs every layer and returns logits
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 9, VOCAB)


def test_transform_runs_inside_the_hook_and_keeps_only_its_result(model):
    ids = _ids(seed=3)
    seen_shapes = []

    def top2(layer, h):
        seen_shapes.append(tuple(h.shape))
        return h.topk(2, dim=-1).indices  # [B, T, 2]

    out = ResidualCapture(model, [-1, 2], transform=top2).run(input_ids=ids)
    assert sorted(out) == [2, 3]
    assert all(s == (2, 9, hidden_size(model)) for s in seen_shapes)
    assert out[3].shape == (2, 9, 2) and out[3].dtype == torch.long


def test_negative_layers_and_out_of_range():
    m = tiny_model("qwen3")
    assert normalize_layer(-1, 4) == 3 and normalize_layer(-4, 4) == 0
    for bad in (4, -5, 100):
        with pytest.raises(LayerError, match=str(bad)):
            ResidualCapture(m, [bad])
    out = residuals(m, -1, _ids())
    assert list(out) == [3]


def test_locator_paths_for_wrappers():
    vlm = tiny_model("qwen3_5_vlm")
    assert find_layers(vlm) is vlm.model.language_model.layers
    assert layer_types(vlm) == ["linear_attention"] * 3 + ["full_attention"]
    gpt2 = tiny_model("gpt2")
    assert find_layers(gpt2) is gpt2.transformer.h
    compiled = torch.compile(tiny_model("qwen3"))
    assert find_layers(compiled) is compiled._orig_mod.model.layers
    assert find_layers(_lora(tiny_model("qwen3_moe"))) is not None


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        m = tiny_model("qwen3")
        ddp = nn.parallel.DistributedDataParallel(m)
        assert unwrap(ddp) is m and find_layers(ddp) is m.model.layers
        out = ResidualCapture(ddp, [0]).run(input_ids=_ids())
        with torch.no_grad():
            torch.testing.assert_close(out[0], m(input_ids=_ids(), output_hidden_states=True).hidden_states[1])
    finally:
        dist.destroy_process_group()


def test_not_a_decoder_model_is_a_clear_error():
    with pytest.raises(ModelError, match="Linear"):
        find_layers(nn.Linear(3, 3))


def test_load_model_text_part_of_a_vlm_checkpoint(tmp_path):
    """Qwen3.5/3.6 checkpoints are VLMs: AutoModelForCausalLM must load their text model."""
    vlm = tiny_model("qwen3_5_vlm", seed=5)
    vlm.save_pretrained(tmp_path)
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), device="cpu")
    assert find_layers(model) is model.model.layers
    ids = _ids(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, vlm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert tok.pad_token is not None


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no/such/model-dir"):
        load_model("./no/such/model-dir")
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_load_model_local_dir_roundtrip(tmp_path):
    save_tiny(tmp_path, "qwen3_moe", seed=3)
    model, _ = load_model(str(tmp_path), device="cpu", dtype="float32")
    ref = tiny_model("qwen3_moe", seed=3)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    with pytest.raises(ModelError, match="float13"):
        load_model(str(tmp_path), dtype="float13")


def test_a_capture_only_sees_forwards_of_the_thread_that_entered_it():
    import threading

    m = tiny_model("qwen3")
    ids = _ids()
    ref = ResidualCapture(m, [2], early_exit=False).run(input_ids=ids)[2]
    outer = ResidualCapture(m, [1], early_exit=True)
    result = {}
    with outer:  # hooks of another thread's capture stay registered during the worker's forward
        t = threading.Thread(target=lambda: result.update(ResidualCapture(m, [2]).run(input_ids=ids)))
        t.start()
        t.join()
    assert outer.outputs == {} and not outer.stopped_early
    torch.testing.assert_close(result[2], ref, rtol=0, atol=0)
