"""Tiny random models and an offline tokenizer for tests (hidden 64, 4 layers, few experts)."""

from __future__ import annotations

import functools

import torch

VOCAB = 300
ARCHS = ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_vlm", "qwen3_5_moe", "qwen3_5_moe_vlm", "llama", "gpt2")

_ATTN = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
_LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
               linear_value_head_dim=16, linear_conv_kernel_dim=4)
_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
               num_position_embeddings=64)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "qwen3":
        return tf.Qwen3Config(**_ATTN)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_ATTN, **_MOE, decoder_sparse_step=1)
    if arch in ("qwen3_5", "qwen3_5_vlm"):
        text = tf.Qwen3_5TextConfig(**_ATTN, **_LINEAR)
        return tf.Qwen3_5Config(text_config=text.to_dict(), vision_config=_VISION) if arch.endswith("vlm") else text
    if arch in ("qwen3_5_moe", "qwen3_5_moe_vlm"):
        text = tf.Qwen3_5MoeTextConfig(**_ATTN, **_LINEAR, **_MOE, shared_expert_intermediate_size=32)
        return tf.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=_VISION) if arch.endswith("vlm") else text
    if arch == "llama":
        return tf.LlamaConfig(**_ATTN)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=256,
                             bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str = "qwen3", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    if arch == "qwen3_5_vlm":
        model = tf.Qwen3_5ForConditionalGeneration(cfg)
    elif arch == "qwen3_5_moe_vlm":
        model = tf.Qwen3_5MoeForConditionalGeneration(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["The quick brown fox jumps over the lazy dog. 12+7=19. #### 19"] * 50
    tok.train_from_iterator(text, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def save_tiny(path, arch: str = "qwen3", seed: int = 0):
    """Write a tiny model + tokenizer directory loadable with the Auto classes."""
    model = tiny_model(arch, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def identity_sae(d: int, **metadata):
    """An exact identity SAE: d_sae = 2d, W_enc = [I, −I], k = d. Each ±x_i pair has one
    non-negative member, so the top d pre-activations are exactly |x_i| and ReLU + W_dec = [I; −I]
    gives x back."""
    from mechreward.sae import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder.from_config(SAEConfig(d, 2 * d, d, metadata=dict(metadata)))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
