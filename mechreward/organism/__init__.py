"""The built-in model organism: a tiny Qwen3 trained on multi-step arithmetic.

`Qwen3ForCausalLM`, 6 decoder layers, d_model 128 (4 query / 2 KV heads of 32, MLP 384),
tied embeddings, ~1.19M parameters, a 98-token character-level tokenizer (eos = pad =
`<|endoftext|>`). It answers `"Q: 12+7-3=?\\nA:"` with a worked solution
`" 12+7=19. 19-3=16. #### 16"` + eos (see `mechreward.tasks.arithmetic`), right on some held-out
questions and wrong on others, so every command has both correct and wrong rollouts to work
with offline on a CPU.

- `python -m mechreward.organism.train` rebuilds the weights (deterministic: fixed seed, one
  thread).
- `python -m mechreward.organism` measures sampled and greedy accuracy on held-out questions.
- `mechreward.models.load_model("organism")` loads it; so do the transformers Auto classes
  on `ORGANISM_DIR`.
"""

from pathlib import Path

ORGANISM_DIR = Path(__file__).resolve().parent / "weights"
"""Directory with config.json, model.safetensors and the tokenizer files."""

ORGANISM_PLANTED_DIR = Path(__file__).resolve().parent / "weights_planted"
"""The planted organism (`model=organism_planted`, the positive control): same architecture and
tokenizer, trained by `python -m mechreward.organism.train --organism planted` on
`mechreward.tasks.planted` worked solutions whose solving mode (right / swap) is drawn per sample."""

ORGANISM_PLANTED_SAE_DIR = Path(__file__).resolve().parent / "sae_planted"
"""The planted organism's SAE (`sae.path=organism_planted`): layer 4, TopK d_sae 1024, k 16, 119,808 tokens of
its own text, the demo's `sae_train` stage (`python -m mechreward.demo controls=[] model=organism_planted
task=planted "stages=[sae_train]"`)."""

ORGANISM_SAE_DIR = Path(__file__).resolve().parent / "sae"
"""The organism's SAE (native / SAELens v6 layout): layer 2, TopK d_sae 2048, k 32, trained by
`python -m mechreward.sae_train` with its defaults (800k tokens of the organism's text) at the
time, when `trainer.dead_tokens` was a fixed 10M (add `trainer.dead_tokens=10000000` to rebuild
it: no latent counts as dead, no AuxK, in 800k tokens). Layer 2
is the logit-lens commit layer of `python -m mechreward.layermap`; its top-10 |d| (16.7) is
within 3% of the peak (layer 0, 17.2): the correctness signal is spread over layers 0-4."""
