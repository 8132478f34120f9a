"""Chat, prompt/completion and preference data: rendered text -> token ids + a per-token loss mask.

A conversation (`{"messages": [{"role", "content"}, ...]}`) is rendered with the tokenizer's own
`chat_template` (read from `tokenizer_config.json` beside `tokenizer.json`) the way HF
`apply_chat_template` renders it: jinja2's sandboxed environment with `trim_blocks` and
`lstrip_blocks`, `raise_exception`, the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
as variables. The rendered text is encoded with `add_special_tokens=False` and special-token text
parsed, so the ids equal `apply_chat_template(messages, tokenize=True)`.

Which tokens are trained: the text of assistant turn i is what rendering messages[:i+1] adds to
rendering messages[:i] with `add_generation_prompt=True` (the answer and the template's end of
turn, not the "assistant" header); a token is trained when it overlaps such a span (HF's rule for
`return_assistant_tokens_mask`). This works for templates without `{% generation %}` blocks; a
template whose earlier turns change when a turn is added is refused (the prefix would not hold).

Without a `chat_template` the built-in one below is used (documented in the README).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatron_neox.errors import ConfigError

# Built-in template: one header line per turn and the tokenizer's end-of-text token as the end of
# every turn, so it needs no token the tokenizer lacks (the layout of Zephyr-style templates). A
# role other than system/user/assistant is an error.
BUILTIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; the template knows system, user, assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The tokenizer_config.json keys apply_chat_template passes to the template (special_tokens_map).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ROLES_WITH_LOSS = ("assistant",)


def _compile(template: str, where: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}` blocks (HF's assistant-mask markers) render their body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: the chat template does not compile: {e}") from None


@dataclass
class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    source: str  # where it came from: a tokenizer_config.json, or "built-in"
    text: str
    special: dict

    @classmethod
    def for_tokenizer(cls, tokenizer_path: str, eos_token: str) -> "ChatTemplate":
        """The `chat_template` of the tokenizer_config.json beside `tokenizer_path`, else the built-in
        one. `eos_token` (the end-of-text token) fills `eos_token` when the config has none."""
        config = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), "tokenizer_config.json")
        special, text, source = {"eos_token": eos_token}, None, "built-in"
        if os.path.exists(config):
            try:
                with open(config, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{config}: cannot read it as JSON ({e})") from None
            for key in _SPECIAL_KEYS:
                value = data.get(key)
                if isinstance(value, dict):  # AddedToken form {"content": ...}
                    value = value.get("content")
                if isinstance(value, str):
                    special[key] = value
            text = data.get("chat_template")
            if isinstance(text, list):  # named templates: HF uses "default"
                named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
                text = named.get("default")
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"{config}: chat_template must be a string or a list of named templates")
            source = config if text else source
        return cls(source, text or BUILTIN_TEMPLATE, special)

    def __post_init__(self):
        self._compiled = _compile(self.text, self.source)

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                     documents=None, **self.special)


class BadExample(Exception):
    """One input line cannot become a training example: the reason, for the line's message."""


def _check_messages(messages, what: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise BadExample(f"{what} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadExample(f"{what}[{i}] must be an object with string 'role' and 'content', got {m!r:.80}")
    return messages


def _render(template: ChatTemplate, messages: list, add_generation_prompt: bool = False) -> str:
    import jinja2

    try:
        return template.render(messages, add_generation_prompt)
    except jinja2.TemplateError as e:
        raise BadExample(f"the chat template ({template.source}) fails to render it: {e}") from None


def render_conversation(template: ChatTemplate, messages: list, first_trained: int = 0) -> tuple[str, list]:
    """(text, [(start, end) character spans trained]): every assistant turn at index >= first_trained."""
    text = _render(template, messages)
    spans = []
    for i, m in enumerate(messages):
        if i < first_trained or m["role"] not in ROLES_WITH_LOSS:
            continue
        before = _render(template, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(template, messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise BadExample(f"the chat template ({template.source}) renders turn {i} differently once later "
                             "turns follow, so its answer cannot be located; use a prefix-stable template")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    if not spans:
        raise BadExample("no assistant turn to train on (a conversation needs at least one 'assistant' message)")
    return text, spans


class ChatEncoder:
    """Text + trained spans -> (ids, mask), with HF tokenizers' offsets; special-token text in the
    rendered chat becomes the special token (as in apply_chat_template)."""

    def __init__(self, tokenizer_path: str):
        from tokenizers import Tokenizer

        self.path = str(tokenizer_path)
        self.hf = Tokenizer.from_file(self.path)
        self.hf.no_truncation()
        self.hf.no_padding()
        eos = "<|endoftext|>"
        if self.hf.token_to_id(eos) is None:
            raise ConfigError(f"{tokenizer_path}: no {eos} token (the end of document and of the built-in template's turns)")
        self.eod_id = self.hf.token_to_id(eos)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.template = ChatTemplate.for_tokenizer(tokenizer_path, eos)
        eot = self.template.special.get("eos_token", eos)
        self.end_of_turn_id = self.hf.token_to_id(eot)

    def prompt_ids(self, messages: list) -> list[int]:
        """The ids a model continues to answer `messages`: rendered with the generation prompt."""
        try:
            text = _render(self.template, _check_messages(messages, "messages"), add_generation_prompt=True)
        except BadExample as e:
            raise ConfigError(str(e)) from None
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.hf.encode(text, add_special_tokens=False)
        mask = np.zeros(len(enc.ids), dtype=np.uint8)
        k = 0
        for t, (a, b) in enumerate(enc.offsets):
            while k < len(spans) and a >= spans[k][1]:
                k += 1
            if k == len(spans):
                break
            if b > spans[k][0]:
                mask[t] = 1
        return np.asarray(enc.ids, dtype=np.int64), mask


def sft_example(enc: ChatEncoder, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """One SFT line -> (ids, mask). `messages`: assistant turns trained. `prompt`/`completion`: strings
    (plain text, the completion and an end-of-text token trained) or message lists (rendered, the
    completion's turns trained)."""
    if "messages" in record:
        text, spans = render_conversation(enc.template, _check_messages(record["messages"], "messages"))
        return enc.encode(text, spans)
    if "prompt" in record and "completion" in record:
        return _completion(enc, record["prompt"], record["completion"])
    raise BadExample("expected a 'messages' list, or 'prompt' and 'completion'")


def _completion(enc: ChatEncoder, prompt, completion) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise BadExample("the completion is empty: nothing to train on")
        ids, mask = enc.encode(prompt + completion, [(len(prompt), len(prompt) + len(completion))])
        # A plain completion ends with the end-of-text token, trained, so generation learns to stop.
        return np.append(ids, enc.eod_id), np.append(mask, 1).astype(np.uint8)
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt = _check_messages(prompt, "prompt")
        messages = prompt + _check_messages(completion, "completion")
        text, spans = render_conversation(enc.template, messages, first_trained=len(prompt))
        return enc.encode(text, spans)
    raise BadExample("prompt and completion must both be strings or both be message lists, got "
                     f"{type(prompt).__name__} and {type(completion).__name__}")


def dpo_example(enc: ChatEncoder, record: dict) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """One preference line -> ((chosen ids, mask), (rejected ids, mask)), the prompt's tokens
    identical in both. `prompt` + `chosen`/`rejected` (strings or message lists), or no `prompt`
    and two conversations that differ only in their last (assistant) message."""
    if "chosen" not in record or "rejected" not in record:
        raise BadExample("expected 'chosen' and 'rejected' (and 'prompt', or full conversations in both)")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list):
            n = len(prompt)
            if chosen[:n] == prompt and rejected[:n] == prompt:  # full conversations that repeat the prompt
                chosen, rejected = chosen[n:], rejected[n:]
    else:
        chosen, rejected = _check_messages(chosen, "chosen"), _check_messages(rejected, "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise BadExample("the prompts of chosen and rejected differ (every message but the last must match)")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if not prompt:
            raise BadExample("chosen and rejected hold one message each: no prompt")
    pair = (_completion(enc, prompt, chosen), _completion(enc, prompt, rejected))
    (c_ids, c_mask), (r_ids, r_mask) = pair
    c_start, r_start = int(np.argmax(c_mask)), int(np.argmax(r_mask))
    if c_start != r_start or not np.array_equal(c_ids[:c_start], r_ids[:r_start]):
        raise BadExample("the prompt tokenizes differently in chosen and rejected (a token spans the prompt/answer "
                         "boundary); end the prompt with a space or newline, or start the answers with one")
    return pair


def fit_length(ids: np.ndarray, mask: np.ndarray, max_length: int | None, truncate: bool
               ) -> tuple[np.ndarray, np.ndarray]:
    """Keep an example within `max_length` tokens: refused, or cut at the end when `truncate`
    (refused anyway when the cut would leave no trained token: the answer is never dropped silently)."""
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    if not truncate:
        raise BadExample(f"{len(ids)} tokens, more than --max-length {max_length}; shorten it, raise "
                         "--max-length (model.seq_length + 1) or pass --truncate")
    if not mask[:max_length].any():
        raise BadExample(f"{len(ids)} tokens: cut to --max-length {max_length}, no answer token would remain")
    return ids[:max_length], mask[:max_length]


def load_record(line: bytes) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise BadExample(f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise BadExample(f"expected a JSON object, got {type(record).__name__}")
    return record

