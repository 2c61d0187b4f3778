"""A confidence reward: mean token log-prob of the completion under the policy (G2's `LP` arm).

G1's cheapest control — the mean token log-prob of a response — often predicts correctness as
well as a feature pack does; as a GRPO reward it asks "does the SAE reward beat a plain
confidence reward?". TRL does not pass log-probs to reward functions, so this reward runs one
no-grad forward of the trainer's current policy (adapters on) over the exact ids TRL sampled
(prompt ids from `MechGRPOTrainer`'s generation, checked against the completion ids TRL passes):
mean over real completion tokens of log softmax(logits / T)[token] at the sampling temperature T.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, MismatchError


class MeanLogProbReward:
    """Trajectory reward: mean log-prob of the completion's tokens under the current policy."""

    def __init__(self, batch_size: int = 64):
        self.batch_size = batch_size
        self.trainer = None
        self.name = "mean_logprob"
        self.__name__ = "mean_logprob"

    def bind(self, trainer) -> MeanLogProbReward:
        """Attach the `MechGRPOTrainer` whose policy and sampled ids the reward reads."""
        self.trainer = trainer
        return self

    @torch.no_grad()
    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        tr = self.trainer
        if tr is None or getattr(tr, "_mech_ids", None) is None:
            raise ConfigError("MeanLogProbReward needs a mechreward.grpo.MechGRPOTrainer: call reward.bind(trainer)")
        prompt_ids, sampled = tr._mech_ids[:2]
        comp = [list(map(int, c)) for c in completion_ids]
        if comp != sampled:
            raise MismatchError("MeanLogProbReward: the completion ids TRL passes differ from the ids it sampled")
        model = tr.model
        device = next(model.parameters()).device
        pad_id = tr._tokenizer.pad_token_id if tr._tokenizer.pad_token_id is not None else 0
        temperature = float(getattr(tr, "temperature", 1.0) or 1.0)
        was_training = model.training
        model.eval()
        out: list[float] = []
        try:
            for start in range(0, len(comp), self.batch_size):
                rows = [(prompt_ids[i], comp[i]) for i in range(start, min(start + self.batch_size, len(comp)))]
                width = max(len(p) + len(c) for p, c in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attn = torch.zeros_like(ids)
                target = torch.zeros_like(ids, dtype=torch.bool)  # positions whose token is a completion token
                for b, (p, c) in enumerate(rows):
                    ids[b, :len(p) + len(c)] = torch.tensor(p + c)
                    attn[b, :len(p) + len(c)] = 1
                    target[b, len(p):len(p) + len(c)] = True
                ids, attn, target = ids.to(device), attn.to(device), target.to(device)
                logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()  # [b, T, V]
                logp = torch.log_softmax(logits[:, :-1] / temperature, -1)  # position t predicts token t+1
                tok = logp.gather(-1, ids[:, 1:, None])[..., 0]  # [b, T-1]
                mask = target[:, 1:]
                n = mask.sum(1)
                mean = (tok * mask).sum(1) / n.clamp(min=1)
                out.extend(float(m) if k > 0 else float("nan") for m, k in zip(mean.cpu(), n.cpu()))
        finally:
            model.train(was_training)
        return out
