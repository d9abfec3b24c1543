"""Tokenizers (a byte-level one for the built-in model; HF tokenizer.json, or one built from a GGUF), chat templates, and
incremental detokenisation that never emits half a UTF-8 character."""
from __future__ import annotations

import datetime
import json
import pathlib
import re
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .sequence import InvalidRequest

MESSAGE_KEYS = frozenset({"role", "content", "name"})
ROLES = frozenset({"system", "user", "assistant", "tool"})

# ChatML, the format of the built-in model and of the checkpoints tools/make_checkpoint.py writes.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]: ...


def check_messages(messages: Any) -> None:
    """Raise InvalidRequest unless messages is a non-empty list of {role, content[, name]} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] is not an object")
        unknown = set(m) - MESSAGE_KEYS
        if unknown:
            raise InvalidRequest(f"messages[{i}] has unknown keys: {', '.join(sorted(map(str, unknown)))}")
        if m.get("role") not in ROLES:
            raise InvalidRequest(f"messages[{i}] has role {m.get('role')!r}; known roles: {', '.join(sorted(ROLES))}")
        if not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}] needs a string content")


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def render_chat(
    template: str, messages: list[dict[str, str]], bos_token: str, eos_token: str, add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render a HF chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt,
            tools=tools,
        )
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"chat template: {exc}") from exc


class ByteTokenizer:
    """256 byte tokens followed by the special tokens; ChatML chat template."""

    SPECIALS = ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")

    def __init__(self) -> None:
        self.special_ids = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.bos_token_id = self.special_ids["<|bos|>"]
        self.eos_token_ids = (self.special_ids["<|eos|>"], self.special_ids["<|im_end|>"])
        self._split = re.compile("(" + "|".join(map(re.escape, self.SPECIALS)) + ")")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, raw = [], bytearray()
        for i in ids:
            if i < 256:
                raw.append(i)
            elif not skip_special_tokens:
                out.append(raw.decode("utf-8", errors="replace"))
                raw.clear()
                out.append(self.SPECIALS[i - 256])
        out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        check_messages(messages)
        text = render_chat(CHATML_TEMPLATE, messages, "<|bos|>", "<|eos|>", add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken object."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A `tokenizers` tokenizer with its chat template, BOS/EOS tokens, and EOS ids (the model's
    config's plus the tokenizer's eos_token). `from_dir` reads tokenizer.json and
    tokenizer_config.json (or chat_template.jinja); gguf.py builds one from a GGUF's metadata."""

    def __init__(
        self, tok: Any, chat_template: str | None, bos_token: str, eos_token: str, eos_token_ids: tuple[int, ...] = ()
    ) -> None:
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        eos = list(eos_token_ids)
        eos_id = tok.token_to_id(eos_token) if eos_token else None
        if eos_id is not None and eos_id not in eos:
            eos.append(eos_id)
        self.eos_token_ids = tuple(eos)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def from_dir(cls, path: str | pathlib.Path, eos_token_ids: tuple[int, ...] = ()) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tokenizer

        path = pathlib.Path(path)
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja_path = path / "chat_template.jinja"
        if template is None and jinja_path.exists():
            template = jinja_path.read_text()
        return cls(
            _Tokenizer.from_file(str(path / "tokenizer.json")), template,
            _token_text(cfg.get("bos_token")) or "", _token_text(cfg.get("eos_token")) or "", eos_token_ids,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> Any:
        """The `tokenizers` tokenizer (grammar libraries build their vocabulary from its JSON)."""
        return self._tok

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        check_messages(messages)
        if self.chat_template is None:
            raise InvalidRequest("this model has no chat template: send a prompt instead of messages")
        text = render_chat(self.chat_template, messages, self.bos_token, self.eos_token, add_generation_prompt, tools)
        # The template already wrote BOS where it belongs, as transformers assumes.
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Each step decodes a short window of ids twice (without and with the new tokens) and emits the
    difference once it does not end in U+FFFD, i.e. once no UTF-8 character is left incomplete. A
    few prompt tokens seed the window so that tokenizers that drop a leading space decode right.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-5:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        # A UTF-8 character spans at most 4 tokens: a U+FFFD still there after more is a real one.
        complete = not after.endswith("\ufffd") or len(self.ids) - self.read > 4
        if len(after) > len(before) and complete:
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end (incomplete bytes decode as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
