"""A confidence reward: mean token log-prob of the completion under the policy (G2's `LP` arm).

G1's cheapest control — the mean token log-prob of a response — often predicts correctness as
well as a feature pack does; as a GRPO reward it asks "does the SAE reward beat a plain
confidence reward?". TRL does not pass log-probs to reward functions, so this reward runs the
trainer's own no-grad log-prob pass of its current policy (adapters on; each distinct prompt once)
over the exact ids TRL sampled (prompt ids from `MechGRPOTrainer`'s generation, checked against
the completion ids TRL passes): mean over real completion tokens of log softmax(logits / T)[token]
at the sampling temperature T.
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
        from trl.trainer.utils import pad

        model = tr.model
        device = next(model.parameters()).device
        pad_id = tr._tokenizer.pad_token_id if tr._tokenizer.pad_token_id is not None else 0
        was_training = model.training
        model.eval()
        out: list[float] = []
        try:
            for start in range(0, len(comp), self.batch_size):
                rows = range(start, min(start + self.batch_size, len(comp)))
                p = [torch.tensor(prompt_ids[i]) for i in rows]
                c = [torch.tensor(comp[i] or [pad_id]) for i in rows]  # an empty completion: one masked pad
                n = torch.tensor([len(comp[i]) for i in rows])
                # TRL's layout (prompts left-padded, completions right-padded) and its log-prob pass at the
                # sampling temperature, which runs each distinct prompt once (`mechreward.prefix`)
                ids = torch.cat([pad(p, padding_value=pad_id, padding_side="left"),
                                 pad(c, padding_value=pad_id, padding_side="right")], 1).to(device)
                cmask = torch.arange(max(len(x) for x in c))[None, :] < n[:, None]
                attn = torch.cat([pad([torch.ones_like(x) for x in p], padding_value=0, padding_side="left"),
                                  cmask.long()], 1).to(device)
                logps, _, _ = tr._get_per_token_logps_and_entropies(model, ids, attn, cmask.shape[1],
                                                                    batch_size=self.batch_size)
                mean = (logps.float().cpu() * cmask).sum(1) / n.clamp(min=1)
                out.extend(float(m) if k > 0 else float("nan") for m, k in zip(mean, n))
        finally:
            model.train(was_training)
        return out
