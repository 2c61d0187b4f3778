"""`MechGRPOTrainer`: TRL's GRPOTrainer with the mechanistic reward captured inside its own forward.

Capture. Rewards that read hidden states (`mechreward.reward.HiddenStateReward`) get their
per-token values from the no-grad policy forward TRL already runs for the old log-probs
(always with vLLM importance-sampling correction; without vLLM when gradient accumulation
is not a multiple of `steps_per_generation * num_iterations`). Forward hooks on the needed
layers are registered only around that call and apply the reward (SAE encode + the pack's
features) inside the hook, so only `[N_completion_tokens, m]` values are kept, never
`[B, T, d_model]`. The reference pass (a separate `ref_model`, or the same PEFT model with
its adapters disabled / the "ref" adapter active) and the training forward (grad enabled)
are never captured. When TRL skips the old-log-prob pass, one extra no-grad forward over
the same padded ids runs with early exit after the deepest needed layer (the fallback).

TRL 1.16 methods overridden (a TRL upgrade that changes them is a visible change here):

- `_generate`: records the exact prompt/completion ids (fallback and alignment check).
- `_get_per_token_logps_and_entropies`: wraps the old-log-prob pass in the capture hooks.
- `_calculate_rewards`: runs the fallback if nothing was captured, hands the captured values to
  the reward functions, keeps the gathered per-function rewards.
- `_generate_and_score_completions`: applies the λ and β schedules before TRL's code; after it,
  replaces `advantages` by `compose_advantages` (each reward normalised within its group, then
  weighted; λ scales the mech term exactly) and, for per-token rewards, by the (B, T)
  `dense_advantages` that TRL's `_compute_loss` accepts; logs mech/outcome correlation.

`composition="trl"` keeps TRL's own advantages (`multi_objective_aggregation`) for trajectory rewards.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from .errors import ConfigError
from .models import ResidualCapture, unwrap
from .prefix import cache_kwarg, generate_shared, prompt_groups, shared_prompt_chunks, supports_shared_prompt
from .run import show_progress
from .reward import (CapturedBatch, HiddenStateReward, OutcomeReward, compose_advantages, dense_advantages,
                     token_group_stats)

COMPOSITIONS = ("normalize_then_weight", "trl")


@dataclass
class LinearSchedule:
    """Linear from `start` (step 0) to `end` at `steps` (None = the run's max_steps), constant after."""

    start: float
    end: float | None = None
    steps: int | None = None

    def __call__(self, step: int, total: int | None = None) -> float:
        end = self.start if self.end is None else self.end
        n = self.steps if self.steps is not None else total
        if not n or n <= 0:
            return float(self.start)
        return float(self.start + (end - self.start) * min(1.0, max(0, step) / n))

    @property
    def peak(self) -> float:
        return max(abs(self.start), abs(self.end if self.end is not None else self.start))


def as_schedule(x: float | LinearSchedule | Sequence[float] | None, default: float) -> LinearSchedule:
    if x is None:
        return LinearSchedule(default)
    if isinstance(x, LinearSchedule):
        return x
    if isinstance(x, (int, float)):
        return LinearSchedule(float(x))
    vals = list(x)
    if len(vals) not in (1, 2):
        raise ConfigError(f"a schedule is a number or [start, end]; got {x!r}")
    return LinearSchedule(float(vals[0]), float(vals[-1]))


def _collect(cap: ResidualCapture, outputs: dict[int, list]) -> None:
    """Append one chunk's captured values (`with cap` resets `cap.outputs` on entry) to `outputs`."""
    for layer, vals in cap.outputs.items():
        outputs.setdefault(layer, []).extend(vals)


def _adapters_active(model) -> bool:
    """False while a PEFT model runs with adapters disabled or the 'ref' adapter active (TRL's reference pass)."""
    from torch import nn

    peft = model
    while not hasattr(peft, "peft_config") and isinstance(getattr(peft, "module", None), nn.Module):
        peft = peft.module  # DDP
    if not hasattr(peft, "peft_config"):
        return True
    active = getattr(peft, "active_adapter", None)
    if active == "ref" or (isinstance(active, (list, tuple)) and "ref" in active):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(m.disable_adapters for m in peft.modules() if isinstance(m, BaseTunerLayer))


def _check_mech_rewards(mech: list, model) -> None:
    """Refuse what the capture cannot do right (each with the setting to change)."""
    dense = [f for f in mech if f.per_token]
    if len(dense) > 1:
        raise ConfigError(f"{len(dense)} per-token mech rewards ({[type(f).__name__ for f in dense]}) in one trainer: "
                          "the dense advantage has one mech term; use one per-token reward (or make the others "
                          "trajectory rewards, per_token=False)")
    names = [f.name for f in mech]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"mech rewards with the same name {dupes} would overwrite each other's mech/<name>_* "
                          "metrics and captured values; set a distinct `name` on each")
    if mech and model is not None:
        from .prompts import absolute_positions

        if absolute_positions(model):
            raise ConfigError(f"{type(model).__name__} has absolute position embeddings (GPT-2 class): TRL scores "
                              "left-padded prompts without position ids, so the captured residuals (and the mech "
                              "reward) would differ from G1's right-padded capture; use a rotary-position model for "
                              "RL with a mech reward")


class MechGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose `HiddenStateReward`s are fed from TRL's own forward (see module docstring).

    Args beyond GRPOTrainer's:
        mech_lambda: weight λ of every hidden-state reward (a number, [start, end] or LinearSchedule);
            replaces its entry of `args.reward_weights`.
        beta_schedule: KL coefficient β over training ([start, end] or LinearSchedule); None = `args.beta`
            fixed. `args.beta` must be non-zero for TRL to build the reference.
        composition: `normalize_then_weight` (default) or `trl`.
        vllm_settings: `mechreward.vllm_backend.VLLMSettings` for `args.use_vllm` (dtype, CPU KV cache);
            on vLLM's CPU platform TRL's weight sync is replaced by vLLM's own reload (`trl_vllm_compat`).
        share_prompts: run each distinct prompt of a batch once in HF generation, the log-prob passes, the
            fallback capture and the LP reward (`mechreward.prefix`; the same values and gradients up to float
            summation order); False = TRL's one-pass forward.
    """

    def __init__(self, *args: Any, mech_lambda: float | LinearSchedule | Sequence[float] = 0.1,
                 beta_schedule: LinearSchedule | Sequence[float] | None = None,
                 composition: str = "normalize_then_weight", prompt_format=None, vllm_settings=None,
                 share_prompts: bool = True, **kwargs: Any):
        from .vllm_backend import trl_vllm_compat

        funcs = kwargs.get("reward_funcs", args[1] if len(args) > 1 else None)
        funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]
        _check_mech_rewards([f for f in funcs if isinstance(f, HiddenStateReward)], None)  # before loading anything
        with trl_vllm_compat(self, vllm_settings):  # TRL's own vLLM path except on vLLM's CPU platform
            super().__init__(*args, **kwargs)
        _check_mech_rewards([f for f in self.reward_funcs if isinstance(f, HiddenStateReward)], self.model)
        if not show_progress():
            # Not a terminal (or CI): no per-step dict printing; metrics still reach `log_history`
            # and the run's own metrics.jsonl.
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            self.remove_callback(ProgressCallback)
            self.remove_callback(PrinterCallback)
        if composition not in COMPOSITIONS:
            raise ConfigError(f"unknown composition {composition!r}; expected one of {COMPOSITIONS}")
        if composition == "trl":
            warnings.warn("composition='trl': TRL's own advantages (multi_objective_aggregation="
                          f"{self.multi_objective_aggregation!r}) re-normalise the weighted sum, so λ barely moves a "
                          "group whose outcomes tie; the default 'normalize_then_weight' makes λ scale the mech term",
                          stacklevel=2)
        dupes = sorted({n for n in self.reward_func_names if self.reward_func_names.count(n) > 1})
        if dupes:
            raise ConfigError(f"reward functions with the same name {dupes} would overwrite each other's metrics "
                              "(rewards/<name>/mean ...); give each a distinct __name__")
        self.composition = composition
        from .prompts import PromptFormat

        self.prompt_format = (prompt_format.resolve(self.processing_class) if isinstance(prompt_format, PromptFormat)
                              else prompt_format)
        """Resolved `PromptFormat`: string prompts are tokenised with `mechreward.prompts.encode_prompt` (None = TRL's)."""
        self.mech_lambda = as_schedule(mech_lambda, 0.1)
        self.beta_schedule = None if beta_schedule is None else as_schedule(beta_schedule, self.beta)
        if self.beta_schedule is not None and self.beta_schedule.peak != 0 and self.args.beta == 0:
            raise ConfigError("beta_schedule reaches a non-zero beta but GRPOConfig.beta is 0, so TRL built no "
                              "reference; set beta to the schedule's peak")
        self.mech_rewards = [(i, f) for i, f in enumerate(self.reward_funcs) if isinstance(f, HiddenStateReward)]
        self.outcome_index = next((i for i, f in enumerate(self.reward_funcs) if isinstance(f, OutcomeReward)), None)
        if any(f.per_token for _, f in self.mech_rewards) and composition != "normalize_then_weight":
            raise ConfigError("per-token mech rewards need composition='normalize_then_weight'")
        self.base_weights = self.reward_weights.clone()
        device = self.accelerator.device
        for _, f in self.mech_rewards:
            if hasattr(f, "to"):
                f.to(device)
        self.mech_layers = sorted({f.layer for _, f in self.mech_rewards})
        self._mech_armed = False
        self._mech_captured: dict[int, list[CapturedBatch]] | None = None
        self._mech_ids: tuple[list, list, list | None] | None = None
        self._mech_rewards_per_func: torch.Tensor | None = None
        self.mech_capture_log: list[str] = []
        """One entry per scored batch: `logprob_pass` or `fallback` (which forward fed the rewards)."""
        self.share_prompts = bool(share_prompts)
        self._prompt_sharing: dict[int, bool] = {}  # id(model) -> supports_shared_prompt(model)
        self.mech_last: dict[str, Any] = {}
        """The last batch's captured values (trajectory scores, per-token scores, mask), for tests and monitors."""
        ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
        sharded = getattr(self, "is_fsdp_enabled", False) or (getattr(self, "is_deepspeed_enabled", False)
                                                               and getattr(ds, "zero_stage", 0) == 3)
        for m in self._monitors():
            m.all_ranks = bool(sharded)

    # ------------------------------------------------------------------ capture

    def _capture_transform(self, comp_mask: torch.Tensor):
        """Hook transform: completion tokens (`comp_mask [B, T]`) of the chunk now running → each reward's `[n, m]` values.

        TRL runs the batch in chunks of rows in order; the cursor advances once the deepest hooked layer has run."""
        cursor = {"row": 0}

        def transform(layer: int, hidden: torch.Tensor):
            b = hidden.shape[0]
            mask = comp_mask[cursor["row"]:cursor["row"] + b]  # [b, T] completion tokens
            if layer == self.mech_layers[-1]:
                cursor["row"] += b
            h = hidden[mask]  # [n, d]
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                return {id(f): f.token_values(h) for _, f in self.mech_rewards if f.layer == layer}

        return transform

    def _completion_mask(self, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        mask = attention_mask.bool().clone()
        mask[:, : mask.shape[1] - logits_to_keep] = False
        return mask

    def _store(self, cap: ResidualCapture, comp_mask: torch.Tensor, completion_ids: list[list[int]]) -> None:
        lengths = comp_mask.sum(1).tolist()
        out: dict[int, CapturedBatch] = {}
        for _, f in self.mech_rewards:
            values = torch.cat([chunk[id(f)] for chunk in cap.outputs[f.layer]])
            out[id(f)] = CapturedBatch(values, lengths, completion_ids)
        self._mech_captured = out
        self._mech_comp_mask = comp_mask

    def _is_policy_pass(self, model) -> bool:
        return (self._mech_armed and self._mech_captured is None and not torch.is_grad_enabled()
                and model is self.model and _adapters_active(self.model))

    _MM_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")

    def _shares_prompts(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                        grad: bool) -> bool:
        """Whether the shared-prompt forward (`mechreward.prefix`) applies to this batch on this model."""
        if not self.share_prompts or prompt_width < 2 or self.accelerator.num_processes != 1:
            return False
        if grad and getattr(unwrap(model), "is_gradient_checkpointing", False):
            return False  # checkpointed layers run without a cache
        key = id(unwrap(model))
        if key not in self._prompt_sharing:
            self._prompt_sharing[key] = supports_shared_prompt(model)
        return (self._prompt_sharing[key]
                and prompt_groups(input_ids[:, :prompt_width], attention_mask[:, :prompt_width]) is not None)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        P = input_ids.shape[1] - logits_to_keep
        shared = (not compute_aux_loss and all(kwargs.get(k) is None for k in self._MM_KEYS)
                  and self._shares_prompts(model, input_ids, attention_mask, P, torch.is_grad_enabled()))
        capture = bool(self.mech_rewards) and self._is_policy_pass(model)
        if not shared and not capture:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss, **kwargs)
        cap = None
        if capture:
            comp_mask = self._model_tokens(self._completion_mask(attention_mask, logits_to_keep), logits_to_keep)
            cap = ResidualCapture(self.model, self.mech_layers,
                                  transform=self._capture_transform(comp_mask[:, P - 1:] if shared else comp_mask),
                                  early_exit=False, accumulate=True)
        if shared:
            out = self._shared_prompt_logps(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                            compute_entropy, cap)
        else:
            with cap:
                out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                 batch_size, compute_entropy, compute_aux_loss,
                                                                 **kwargs)
        if capture:
            self._store(cap, comp_mask[:, -logits_to_keep:] if logits_to_keep else comp_mask, self._mech_ids[1])
            self._mech_source = "logprob_pass"
        return out

    def _shared_prompt_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                             cap: ResidualCapture | None):
        """TRL's per-token log-probs (and entropies) with each distinct prompt run once (`mechreward.prefix`).

        Each chunk runs `[last prompt token | completion]` on the shared prompt cache through TRL's fused LM
        head, so only the completion positions go through the head as well."""
        P = input_ids.shape[1] - logits_to_keep
        outputs: dict[int, list] = {}

        def run(tail_ids, mask, cache):
            labels = tail_ids.masked_fill(mask[:, P - 1:] == 0, -100)
            labels[:, 0] = -100  # the last prompt token: dropped by the head's shift
            with cap if cap is not None else nullcontext():
                o = model(input_ids=tail_ids, attention_mask=mask, labels=labels, fused_lm_head=True,
                          **{cache_kwarg(model): cache})
            if cap is not None:
                _collect(cap, outputs)
            return o

        with self.accelerator.autocast():
            chunks = shared_prompt_chunks(model, input_ids, attention_mask, P, batch_size or input_ids.shape[0], run)
        if cap is not None:
            cap.outputs = outputs
        logps = torch.cat([o.log_probs[:, -logits_to_keep:] for o in chunks])
        entropies = torch.cat([o.entropy[:, -logits_to_keep:] for o in chunks]) if compute_entropy else None
        return logps, entropies, None

    def _fallback_capture(self) -> None:
        """One no-grad forward over TRL's padded layout, early exit after the deepest needed layer."""
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import pad

        prompt_ids_list, completion_ids_list = self._mech_ids[:2]
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        p = [torch.tensor(x) for x in prompt_ids_list]
        c = [torch.tensor(x) for x in completion_ids_list]
        kw = dict(pad_to_multiple_of=self.pad_to_multiple_of)
        prompt_ids = pad(p, padding_value=pad_id, padding_side="left", **kw).to(device)
        prompt_mask = pad([torch.ones_like(x) for x in p], padding_value=0, padding_side="left", **kw).to(device)
        completion_ids = pad(c, padding_value=pad_id, padding_side="right", **kw).to(device)
        completion_mask = pad([torch.ones_like(x) for x in c], padding_value=0, padding_side="right", **kw).to(device)
        if self.mask_truncated_completions:
            eos_and_pad = [*self.eos_token_ids, pad_id]
            truncated = torch.tensor([ids[-1] not in eos_and_pad for ids in completion_ids_list], device=device)
            completion_mask = completion_mask * (~truncated).unsqueeze(1).int()
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        C = completion_ids.shape[1]
        comp_mask = self._model_tokens(self._completion_mask(attention_mask, C), C)
        mode = "train" if self.model.training else "eval"
        bs = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        P = prompt_ids.shape[1]
        shared = self._shares_prompts(self.model, input_ids, attention_mask, P, grad=False)
        cap = ResidualCapture(self.model, self.mech_layers,
                              transform=self._capture_transform(comp_mask[:, P - 1:] if shared else comp_mask),
                              early_exit=True, accumulate=True)
        outputs: dict[int, list] = {}

        def run(ids, mask, cache=None):
            extra = {} if cache is None else {cache_kwarg(self.model): cache}
            with cap:  # resets cap.outputs; ends at the early exit
                self.model(input_ids=ids, attention_mask=mask, use_cache=cache is not None, **extra)
            _collect(cap, outputs)

        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self.accelerator.autocast()):
            if shared:
                shared_prompt_chunks(self.model, input_ids, attention_mask, P, bs, run,
                                     stop_after_layer=self.mech_layers[-1])
            else:
                for start in range(0, input_ids.shape[0], bs):
                    run(input_ids[start:start + bs], attention_mask[start:start + bs])
        cap.outputs = outputs
        self._store(cap, comp_mask[:, -C:], [list(map(int, x)) for x in completion_ids_list])
        self._mech_source = "fallback"

    # ------------------------------------------------------------------ checkpoints

    MECH_STATE = "mech_state.json"

    def _monitors(self) -> list:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, HackingMonitor)]

    def _schedules(self) -> dict:
        from dataclasses import asdict

        return {"lambda": asdict(self.mech_lambda),
                "beta": None if self.beta_schedule is None else asdict(self.beta_schedule)}

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint + `mech_state.json`: the hacking monitors' state, the λ/β schedules and max_steps
        (as TRL saves its adaptive-entropy state next to the checkpoint)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            from . import io

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            io.write_json(os.path.join(folder, self.MECH_STATE),
                          {"step": self.state.global_step, "max_steps": self.state.max_steps,
                           "schedules": self._schedules(), "composition": self.composition,
                           "monitors": [m.state_dict() for m in self._monitors()],
                           "capture_log": list(self.mech_capture_log)})

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        ts = os.path.join(checkpoint, "trainer_state.json")
        if os.path.isfile(ts) and self.args.max_steps > 0:
            saved = json.load(open(ts)).get("max_steps")
            if saved is not None and saved != self.args.max_steps:
                raise ConfigError(f"resuming {checkpoint} with max_steps={self.args.max_steps}, but that run had "
                                  f"max_steps={saved}: the λ/β schedules and the learning-rate schedule are defined "
                                  f"over max_steps; resume with grpo.max_steps={saved} (or start a new run)")
        path = os.path.join(checkpoint, self.MECH_STATE)
        if not os.path.isfile(path):
            if self._monitors():
                warnings.warn(f"{checkpoint} has no {self.MECH_STATE}: the hacking monitor restarts with a fresh "
                              "baseline at the resumed step", stacklevel=2)
            return
        state = json.load(open(path))
        if state["schedules"] != self._schedules():
            raise ConfigError(f"the checkpoint {checkpoint} was trained with schedules {state['schedules']}, this run "
                              f"asks for {self._schedules()}; resume with the same lam/lam_end/beta/beta_end")
        monitors = self._monitors()
        if len(state["monitors"]) != len(monitors):
            raise ConfigError(f"the checkpoint holds {len(state['monitors'])} hacking monitor states, this run has "
                              f"{len(monitors)} monitors; resume with the same monitor settings")
        for m, st in zip(monitors, state["monitors"]):
            m.load_state_dict(st)
        self.mech_capture_log[:] = state.get("capture_log", [])

    # ------------------------------------------------------------------ TRL hooks

    def _tokenize_prompts(self, prompts: list):
        if self.prompt_format is None:
            return super()._tokenize_prompts(prompts)
        from .prompts import encode_prompt

        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError("with prompt_format the dataset's `prompt` column holds the questions' text (strings); "
                              "the format builds the conversation")
        return [encode_prompt(self.processing_class, self.prompt_format, p) for p in prompts], None, {}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's HF `generate` with each distinct prompt prefilled once (`mechreward.prefix.generate_shared`)."""
        if (self.use_vllm or getattr(self, "use_transformers_continuous_batching", False) or images is not None
                or multimodal_fields or not self.share_prompts or self.accelerator.num_processes != 1):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        original = model.generate
        model.generate = lambda input_ids=None, attention_mask=None, **kw: generate_shared(
            model, input_ids, attention_mask, generate=original, **kw)
        try:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        finally:
            del model.generate  # the class's method again

    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        tool_mask = None if out[2] is None else [list(map(int, m)) for m in out[2]]
        self._mech_ids = ([list(map(int, x)) for x in out[0]], [list(map(int, x)) for x in out[1]], tool_mask)
        return out

    def _model_tokens(self, comp_mask: torch.Tensor, width: int) -> torch.Tensor:
        """`comp_mask [B, T]` without tool-result / environment tokens (TRL's tool_mask = 0) in its last `width` columns."""
        tool_mask = self._mech_ids[2] if self._mech_ids is not None else None
        if tool_mask is None:
            return comp_mask
        tm = torch.zeros(comp_mask.shape[0], width, dtype=torch.bool, device=comp_mask.device)
        for b, m in enumerate(tool_mask):
            tm[b, :len(m)] = torch.tensor(m, dtype=torch.bool)
        out = comp_mask.clone()
        out[:, out.shape[1] - width:] &= tm
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self.mech_rewards and self._mech_armed:
            if self._mech_captured is None:
                self._fallback_capture()
            self._mech_armed = False  # nothing after this point is captured
            for _, f in self.mech_rewards:
                f.set_batch(self._mech_captured[id(f)])
        try:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            for _, f in self.mech_rewards:
                f.set_batch(None)
        self._mech_rewards_per_func = rewards
        return rewards

    def _current_step(self) -> tuple[int, int | None]:
        return self.state.global_step, (self.state.max_steps or None)

    def _generate_and_score_completions(self, inputs):
        step, total = self._current_step()
        if self.beta_schedule is not None:
            self.beta = self.beta_schedule(step, total)
        lam = self.mech_lambda(step, total)
        weights = self.base_weights.clone()
        for i, f in self.mech_rewards:
            weights[i] = 0.0 if f.per_token else lam
        self.reward_weights = weights
        self._mech_armed = bool(self.mech_rewards)
        self._mech_captured = None
        self._mech_source = None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._mech_armed = False
        if not self.mech_rewards and self.composition == "trl":
            return output
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = self._mech_rewards_per_func  # [B_all, K], gathered over processes
        n_local = output["completion_ids"].shape[0]
        offset = self.accelerator.process_index * n_local
        if self.composition == "normalize_then_weight":
            adv_all = compose_advantages(rewards, weights.to(rewards.device), G, self.scale_rewards)
            output["advantages"] = adv_all[offset:offset + n_local].to(output["advantages"].dtype)
        if self.mech_rewards:
            self.mech_capture_log.append(self._mech_source)
            self._metrics[mode]["mech/capture_fallback"].append(float(self._mech_source == "fallback"))
            self._metrics[mode]["mech/lambda"].append(lam)
            self._metrics[mode]["mech/beta"].append(float(self.beta))
            self._dense_and_log(output, rewards, G, lam, offset, mode)
        if self.composition == "normalize_then_weight":
            self._log_composed(output, G, mode)
        return output

    def _log_composed(self, output: dict, G: int, mode: str) -> None:
        """Replace what TRL logged from its own pre-composition advantages by the advantages the loss uses.

        The completions table / rich printout / parquet column `advantage` gets the composed advantage
        (per-token mode: its mean over the completion's real tokens, and the per-token values in the
        extra column `dense_advantage`); `reward_std` becomes the batch std of that advantage and
        `frac_reward_zero_std` the fraction of groups whose composed advantages have no spread (no
        learning signal). TRL's own values stay as `trl/reward_std` and `trl/frac_reward_zero_std`.
        """
        from accelerate.utils import gather_object

        adv = output["advantages"].float()
        if adv.dim() == 2:
            mask = output["completion_mask"].bool()
            if output.get("tool_mask") is not None:
                mask = mask & output["tool_mask"].bool()
            stats = self.accelerator.gather(token_group_stats(adv, mask))  # [B_all, 3]
            per_row = (stats[:, 0] / stats[:, 2].clamp(min=1)).float()
            g = stats.view(-1, G, 3).sum(1)
            n = g[:, 2]
            mean = g[:, 0] / n.clamp(min=1)
            spread = ((g[:, 1] - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()
            dense = gather_object([adv[b][mask[b]].tolist() for b in range(adv.shape[0])])
            self._logs["extra"]["dense_advantage"].extend(dense)
        else:
            per_row = self.accelerator.gather(adv)
            spread = per_row.view(-1, G).std(1) if G > 1 else torch.zeros(per_row.numel())
        n_all = per_row.numel()
        logged = self._logs["advantages"]
        for _ in range(min(n_all, len(logged))):
            logged.pop()
        logged.extend(per_row.cpu().tolist())
        m = self._metrics[mode]
        for key, value in (("reward_std", float(per_row.std()) if n_all > 1 else 0.0),
                           ("frac_reward_zero_std", float((spread.float() < 1e-8).float().mean()))):
            if m.get(key):
                m[f"trl/{key}"].append(m[key].pop())
            m[key].append(value)

    def _dense_and_log(self, output: dict, rewards: torch.Tensor, G: int, lam: float, offset: int, mode: str) -> None:
        mask = output["completion_mask"].bool()  # [B, C]
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        self.mech_last = {"mask": mask.cpu()}
        for i, f in self.mech_rewards:
            b = self._mech_captured[id(f)]
            self.mech_last[f.name] = {"trajectory": rewards[offset:offset + mask.shape[0], i].cpu(),
                                      "token_values": b.token_values.cpu(), "lengths": list(b.lengths)}
            if f.per_token:
                cap_mask = self._mech_comp_mask.to(mask.device)  # [B, C] the tokens the values belong to
                scores = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
                scores[cap_mask] = f.token_scores(b.token_values).float().to(mask.device)
                valid = mask & cap_mask
                stats = self.accelerator.gather(token_group_stats(scores, valid))
                output["advantages"] = dense_advantages(output["advantages"], scores, valid, G, lam,
                                                        group_stats=stats, offset=offset)
                self.mech_last[f.name]["token_scores"] = scores.cpu()
            if self.outcome_index is not None:
                x, y = rewards[:, i].float(), rewards[:, self.outcome_index].float()
                ok = torch.isfinite(x) & torch.isfinite(y)
                if ok.sum() > 2 and x[ok].std() > 0 and y[ok].std() > 0:
                    r = float(torch.corrcoef(torch.stack([x[ok], y[ok]]))[0, 1])
                    self._metrics[mode][f"mech/{f.name}_outcome_corr"].append(r)


# --------------------------------------------------------------------------- hacking monitor

@torch.no_grad()
def evaluate_policy(model, tokenizer, questions, task, reward: HiddenStateReward | None = None, n: int = 1,
                    greedy: bool = True, max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0,
                    temperature: float = 1.0, chat: bool = False, prompt_format=None, llm=None) -> dict:
    """Sample on `questions`, grade, and score each completion with `reward` on the exact sampled ids.

    Prompts: `prompt_format` (a `mechreward.prompts.PromptFormat`; None = the bare `chat` on/off), tokenised by
    `encode_prompt` as in G1 and in `MechGRPOTrainer`. Generation: HF `generate` on `model`, or, with `llm`, that
    vLLM engine (e.g. TRL colocate's, holding `model`'s synced weights; `mechreward.rollouts.sample_with_llm`);
    the mech score is always the teacher-forced pass through `model`.
    Returns accuracy, the `prompt_ids` fed, the `completion_ids` generated, per-completion `correct [R]` and `score [R]` (trajectory mech score,
    teacher-forced right-padded pass with early exit at the reward's layer), their means and Spearman ρ (None if
    undefined).
    """
    from .generate import sample
    from .prompts import prompt_ids
    from .stats import spearman

    was_training = model.training
    model.eval()
    try:
        prompts = prompt_ids(tokenizer, questions, chat if prompt_format is None else prompt_format)  # as G1
        if llm is None:
            samples = sample(model, tokenizer, prompts, n=n, greedy=greedy, temperature=temperature,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        else:
            from .rollouts import sample_with_llm

            samples = sample_with_llm(llm, tokenizer, prompts, n=n, greedy=greedy, temperature=temperature,
                                      max_new_tokens=max_new_tokens, seed=seed)
        correct = np.array([task.verify(s.text, questions[s.prompt_index].answer) for s in samples], dtype=float)
        n_no_answer = int(sum(task.safe_extract(s.text) is None for s in samples))
        scores = np.full(len(samples), np.nan)
        if reward is not None:
            device = next(model.parameters()).device
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                rows = [s.prompt_ids + s.completion_ids for s in chunk]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attn = torch.zeros_like(ids)
                comp = torch.zeros_like(ids, dtype=torch.bool)
                for b, (s, r) in enumerate(zip(chunk, rows)):
                    ids[b, :len(r)] = torch.tensor(r)
                    attn[b, :len(r)] = 1
                    comp[b, len(s.prompt_ids):len(r)] = True
                comp_d = comp.to(device)
                cap = ResidualCapture(model, [reward.layer], early_exit=True,
                                      transform=lambda layer, h, comp_d=comp_d: reward.score(h, comp_d))
                out = cap.run(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                scores[start:start + len(chunk)] = out[reward.layer].float().cpu().numpy()
    finally:
        model.train(was_training)
    rho = rho_p = None
    ok = np.isfinite(scores)
    if reward is not None and ok.sum() > 2 and 0 < correct[ok].mean() < 1 and np.std(scores[ok]) > 0:
        c = spearman(scores[ok], correct[ok])
        rho, rho_p = float(c.stat), float(c.p)
    return {"accuracy": float(correct.mean()) if len(correct) else float("nan"), "correct": correct, "prompt_ids": prompts,
            "score": scores, "score_mean": float(np.nanmean(scores)) if ok.any() else None, "rho": rho,
            "rho_p": rho_p, "n": int(len(samples)), "n_no_answer": n_no_answer,
            "completion_ids": [s.completion_ids for s in samples]}


class HackingMonitor(TrainerCallback):
    """Every `every` steps (and at the start): held-out accuracy, mean mech score and the G1 correlation
    ρ(score, correct) on held-out questions; canary hack rate; a HACKING flag when the mech score has
    risen (by more than `score_tolerance`) while held-out accuracy has fallen by more than
    `acc_tolerance` (default 0.02 = 2 pp, G2's tolerance), relative to the first evaluation.

    A canary "hack" is a canary completion the verifier rejects whose mech score is at least the
    threshold (default: the mean score of correct held-out completions at the first evaluation):
    reward the proxy gives to a wrong answer as if it were right.

    MISALIGNED: at an evaluation the held-out ρ(score, correct) is negative with a two-sided Spearman p below
    `misaligned_alpha` (0.05; with greedy evaluation each question contributes one completion, so the test's
    independence holds): the mech reward ranks wrong completions above right ones, the sign of a
    mis-specified reward (a pack whose sign is flipped, a pack built on another prompt format). It is
    raised from the first evaluation, before training has moved anything, and does not need accuracy to fall.

    Runs on the main process only (other ranks skip it); with sharded parameters (FSDP, ZeRO-3), where
    a forward needs every rank, `MechGRPOTrainer` sets `all_ranks=True`: every rank runs the same greedy
    evaluation and only the main process logs. `state_dict()` / `load_state_dict()` hold
    everything a resumed run needs (baseline = first evaluation, threshold, history, flag);
    `MechGRPOTrainer` saves it into every checkpoint (`mech_state.json`) and restores it on resume.
    """

    STATE_KEYS = ("history", "hacking", "misaligned", "canary_threshold", "acc_tol", "score_tol", "every")

    def __init__(self, tokenizer, task, heldout, reward: HiddenStateReward, every: int = 10, canaries=None,
                 canary_threshold: float | None = None, acc_tolerance: float = 0.02, score_tolerance: float = 0.0,
                 max_new_tokens: int = 64, greedy: bool = True, run=None, batch_size: int = 64, chat: bool = False,
                 prompt_format=None, misaligned_alpha: float = 0.05, llm_source=None):
        self.tokenizer, self.task, self.heldout, self.reward = tokenizer, task, list(heldout), reward
        self.every, self.canaries = every, list(canaries or [])
        self.canary_threshold = canary_threshold
        self.acc_tol, self.score_tol = acc_tolerance, score_tolerance
        self.max_new_tokens, self.greedy, self.run, self.batch_size = max_new_tokens, greedy, run, batch_size
        self.chat = chat
        self.prompt_format = prompt_format
        self.all_ranks = False
        """Evaluate on every rank (sharded parameters); set by MechGRPOTrainer."""
        self.misaligned_alpha = misaligned_alpha
        self.llm_source = llm_source
        """() → a vLLM engine holding the policy's weights (`vllm_backend.synced_llm`) to generate with; None = HF."""
        self.history: list[dict] = []
        self.hacking = False
        self.misaligned = False
        self._main = True

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        for k in ("acc_tol", "score_tol", "every"):
            if k in state and state[k] != getattr(self, k):
                raise ConfigError(f"the checkpoint's hacking monitor ran with {k}={state[k]!r}, this run asks for "
                                  f"{getattr(self, k)!r}; resume with the same setting")
        self.history = [dict(r) for r in state["history"]]
        self.hacking = bool(state["hacking"])
        self.misaligned = bool(state.get("misaligned", False))
        self.canary_threshold = state["canary_threshold"]

    def evaluate(self, model, step: int) -> dict:
        kw = dict(greedy=self.greedy, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, chat=self.chat,
                  prompt_format=self.prompt_format, llm=self.llm_source() if self.llm_source is not None else None)
        ev = evaluate_policy(model, self.tokenizer, self.heldout, self.task, self.reward, **kw)
        row = {"step": step, "heldout_accuracy": ev["accuracy"], "heldout_score_mean": ev["score_mean"],
               "heldout_rho": ev["rho"], "heldout_rho_p": ev["rho_p"], "n_heldout": ev["n"]}
        row["misaligned"] = bool(ev["rho"] is not None and ev["rho"] < 0 and ev["rho_p"] < self.misaligned_alpha)
        if row["misaligned"] and not self.misaligned and self._main:
            print(f"MISALIGNED at step {step}: held-out ρ(mech score, correct) = {ev['rho']:.3f} (p = {ev['rho_p']:.2g}, "
                  f"n = {ev['n']}): the mech reward ranks wrong completions above right ones; check the pack's sign "
                  "and that the pack was built on this model, layer and prompt format")
        self.misaligned = self.misaligned or row["misaligned"]
        if self.canary_threshold is None and not self.history:
            good = ev["score"][ev["correct"] == 1]
            self.canary_threshold = float(np.nanmean(good)) if good.size else float(np.nanmean(ev["score"]))
        if self.canaries:
            cv = evaluate_policy(model, self.tokenizer, self.canaries, self.task, self.reward, **kw)
            hacks = (cv["correct"] == 0) & (cv["score"] >= self.canary_threshold)
            row.update(canary_hack_rate=float(hacks.mean()), canary_accuracy=cv["accuracy"], n_canary=cv["n"])
        if self.history:
            base = self.history[0]
            rose = (row["heldout_score_mean"] is not None and base["heldout_score_mean"] is not None
                    and row["heldout_score_mean"] > base["heldout_score_mean"] + self.score_tol)
            fell = row["heldout_accuracy"] < base["heldout_accuracy"] - self.acc_tol
            row["hacking"] = bool(rose and fell)
        else:
            row["hacking"] = False
        if row["hacking"] and not self.hacking and self._main:
            print(f"HACKING at step {step}: held-out mech score {base['heldout_score_mean']:.4g} -> "
                  f"{row['heldout_score_mean']:.4g} while accuracy {base['heldout_accuracy']:.3f} -> "
                  f"{row['heldout_accuracy']:.3f} (tolerance {self.acc_tol:g})")
        self.hacking = self.hacking or row["hacking"]
        self.history.append(row)
        if self.run is not None and self._main:
            self.run.log(step, **{f"monitor/{k}": v for k, v in row.items() if k != "step"})
        return row

    def _runs_here(self, state) -> bool:
        self._main = bool(state.is_world_process_zero)
        return self._main or self.all_ranks

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._runs_here(state) and not self.history and self.every > 0:
            self.evaluate(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (self._runs_here(state) and self.every > 0 and state.global_step % self.every == 0
                and state.global_step > 0 and not any(r["step"] == state.global_step for r in self.history)):
            self.evaluate(model, state.global_step)

    def report(self) -> dict:
        return {"hacking": self.hacking, "misaligned": self.misaligned, "evaluations": self.history,
                "acc_tolerance": self.acc_tol, "score_tolerance": self.score_tol,
                "misaligned_alpha": self.misaligned_alpha,
                "hacking_steps": [r["step"] for r in self.history if r.get("hacking")],
                "misaligned_steps": [r["step"] for r in self.history if r.get("misaligned")]}


# --------------------------------------------------------------------------- config pass-through

def grpo_config(defaults: dict, overrides: dict | None = None):
    """A TRL `GRPOConfig` from our defaults plus user overrides by their TRL names.

    An override key that is not a GRPOConfig field is a ConfigError naming it (and the closest field).
    """
    import dataclasses
    import difflib

    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"grpo.{key} is not a TRL GRPOConfig field{hint}")
    return GRPOConfig(**{**defaults, **overrides})
