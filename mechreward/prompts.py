"""One prompt format from G1 to RL: how a question's text becomes the prompt ids the model sees.

`PromptFormat` (the `prompt:` node of rollouts/layermap/g1 under `sampling.prompt`, of rivalry
and of rl) says:

- `chat_template`: wrap the prompt in the tokenizer's chat template (`true`), never (`false`),
  or when the tokenizer has one (`null`, the default);
- `system_prompt`: the text of a system message, or `null` for none. With `null` no system
  message is passed, so a template with a built-in default system prompt (SmolLM2's "You are a
  helpful AI assistant named SmolLM ...") still injects it; `system_prompt=""` passes an empty
  system message, which keeps such a default out;
- `prompt_template`: the user text, with `{prompt}` replaced by the question's text (only that
  placeholder is substituted; other braces stay literal). `prompt_template_file` reads it
  from a file instead (multi-line templates; the file's text is what is recorded);
- `add_special_tokens`: without a chat template, let the tokenizer add its special tokens (a
  BOS for Llama/Gemma-style tokenizers), as TRL tokenises string prompts. A chat template
  writes its own special tokens, so none are added to templated prompts;
- `chat_template_kwargs`: extra arguments for `apply_chat_template` (e.g. `enable_thinking: false`).

On the command line (hydra): `sampling.prompt.system_prompt="You are a careful solver."`; a value
with spaces, colons or braces needs hydra's quoting inside shell quotes, e.g.
`'sampling.prompt.prompt_template="Q: {prompt}\\nA:"'` — for anything multi-line, use
`sampling.prompt.prompt_template_file=path.txt`. `sampling.prompt.system_prompt=""` is an empty
system message; `sampling.prompt.system_prompt=null` none.

`encode_prompt` is the one function that turns a question's text into prompt ids; rollouts,
layermap, g1, g2, rl (`MechGRPOTrainer` tokenises TRL's prompts with it) and rivalry all call it.
The resolved format (`PromptFormat.resolve`: chat on/off decided, template file read) is
recorded in the rollout header, the feature pack's provenance and every report; g2 and rl take
it from the pack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, DataError

PLACEHOLDER = "{prompt}"


@dataclass
class PromptFormat:
    """How a question's text becomes prompt ids (see the module docstring)."""

    chat_template: bool | None = None
    """Wrap prompts in the tokenizer's chat template; null = when the tokenizer has one."""
    system_prompt: str | None = None
    """System message text; null = no system message (a template's own default may still apply; "" keeps it out)."""
    prompt_template: str = PLACEHOLDER
    """User text; `{prompt}` is replaced by the question's text."""
    prompt_template_file: str | None = None
    """Read `prompt_template` from this file (multi-line templates); null = use `prompt_template`."""
    add_special_tokens: bool = True
    """Without a chat template: the tokenizer adds its special tokens (BOS), as TRL does for string prompts."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments of `apply_chat_template` (e.g. enable_thinking: false)."""

    def resolve(self, tokenizer) -> "PromptFormat":
        """A copy with `chat_template` decided for `tokenizer` and the template file's text read in."""
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template and not has:
            raise ConfigError("prompt chat_template=true but the tokenizer has no chat template "
                              "(set chat_template=false or null)")
        template = self.prompt_template
        if self.prompt_template_file:
            path = Path(self.prompt_template_file)
            if template == PLACEHOLDER:  # not read yet
                if not path.is_file():
                    raise ConfigError(f"prompt_template_file {str(path)!r} does not exist")
                template = path.read_text()
            elif path.is_file() and path.read_text() != template:
                raise ConfigError("give prompt_template or prompt_template_file, not both "
                                  f"(prompt_template={template!r}, file {str(path)!r})")
        if PLACEHOLDER not in template:
            raise ConfigError(f"the prompt template {template!r} has no {PLACEHOLDER} placeholder")
        return replace(self, chat_template=has if self.chat_template is None else bool(self.chat_template),
                       prompt_template=template, chat_template_kwargs=dict(self.chat_template_kwargs or {}))

    @property
    def chat(self) -> bool:
        if self.chat_template is None:
            raise ConfigError("this PromptFormat is not resolved yet (chat_template=null); call resolve(tokenizer)")
        return bool(self.chat_template)

    def user_text(self, text: str) -> str:
        return self.prompt_template.replace(PLACEHOLDER, text)

    def messages(self, text: str) -> list[dict]:
        """The conversation of one question (system message when `system_prompt` is not null, then the user turn)."""
        sys = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return sys + [{"role": "user", "content": self.user_text(text)}]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "PromptFormat":
        if not d:
            raise DataError("no prompt format recorded")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError(f"unknown prompt-format keys {unknown}")
        return cls(**d)

    def same_as(self, other: "PromptFormat") -> bool:
        """Equal as far as the ids are concerned (the template file's name is only provenance)."""
        a, b = self.to_dict(), other.to_dict()
        a.pop("prompt_template_file"), b.pop("prompt_template_file")
        return a == b


def as_format(fmt: "PromptFormat | bool | None", tokenizer) -> PromptFormat:
    """A resolved PromptFormat from a PromptFormat, or from a bare chat on/off flag (older call sites)."""
    if not isinstance(fmt, PromptFormat):
        fmt = PromptFormat(chat_template=fmt)
    return fmt.resolve(tokenizer)  # idempotent


def _ids(x) -> list[int]:
    if hasattr(x, "keys"):  # BatchEncoding
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    x = list(x)
    if x and isinstance(x[0], (list, tuple)):
        x = list(x[0])
    return [int(i) for i in x]


def encode_prompt(tokenizer, fmt: PromptFormat, text: str) -> list[int]:
    """Prompt ids of one question's text under a resolved format: THE tokenisation of every stage."""
    if fmt.chat:
        ids = _ids(tokenizer.apply_chat_template(fmt.messages(text), add_generation_prompt=True, tokenize=True,
                                                 **fmt.chat_template_kwargs))
    else:
        ids = _ids(tokenizer(fmt.user_text(text), add_special_tokens=fmt.add_special_tokens)["input_ids"])
    if not ids:
        raise DataError(f"the prompt {text[:60]!r} is empty after tokenisation")
    return ids


def prompt_ids(tokenizer, questions: Sequence, fmt: "PromptFormat | bool | None" = None, *,
               chat: bool | None = None) -> list[list[int]]:
    """Prompt ids of each question (`Question.prompt`) — `encode_prompt` over a list (`chat`: older spelling
    of a bare on/off format)."""
    fmt = as_format(chat if fmt is None else fmt, tokenizer)
    out = []
    for q in questions:
        try:
            out.append(encode_prompt(tokenizer, fmt, q.prompt))
        except DataError:
            raise DataError(f"question {q.id!r} has an empty prompt after tokenisation") from None
    return out


def use_chat_template(tokenizer, setting: bool | None) -> bool:
    """Chat template on/off for `tokenizer` (`setting` null = when it has one)."""
    return PromptFormat(chat_template=setting).resolve(tokenizer).chat


def describe(fmt: PromptFormat, tokenizer=None, example: str | None = None) -> dict:
    """The resolved format as recorded in headers, packs and reports (+ one rendered example prompt)."""
    out = fmt.to_dict()
    if tokenizer is not None and example is not None:
        out["example"] = tokenizer.decode(encode_prompt(tokenizer, fmt, example))
    return out


def format_from_record(d: dict | None) -> PromptFormat:
    """A PromptFormat from what `describe` recorded (the example is dropped)."""
    d = dict(d or {})
    d.pop("example", None)
    return PromptFormat.from_dict(d)


def absolute_positions(model) -> bool:
    """True for models with learned absolute position embeddings that do not follow the attention mask
    (GPT-2 class: a `wpe` table indexed by raw position): left padding shifts their positions."""
    import torch

    base = getattr(model, "get_base_model", lambda: model)()
    return any(name.split(".")[-1] == "wpe" and isinstance(m, torch.nn.Embedding) for name, m in base.named_modules())


def format_of_header(header: dict) -> PromptFormat:
    """The prompt format a rollout header records (rollouts made before formats were recorded: chat on/off only,
    plain prompts tokenised without special tokens, as they were then)."""
    if header.get("prompt_format"):
        return format_from_record(header["prompt_format"])
    if "chat_template" in header:
        return PromptFormat(chat_template=bool(header["chat_template"]), add_special_tokens=False)
    raise DataError("the rollout header records no prompt format")


def format_of_pack(pack) -> PromptFormat:
    """The prompt format the pack's G1 rollouts were made with (its provenance, else its rollout header)."""
    import json

    prov = pack.provenance or {}
    if prov.get("prompt_format"):
        return format_from_record(prov["prompt_format"])
    manifest = Path(prov["rollouts"]) / "manifest.json" if prov.get("rollouts") else None
    if manifest is not None and manifest.is_file():
        return format_of_header(json.loads(manifest.read_text()))
    raise DataError("the feature pack records no prompt format and its rollouts "
                    f"({prov.get('rollouts')!r}) are not there to read it from; rebuild the pack with G1")
