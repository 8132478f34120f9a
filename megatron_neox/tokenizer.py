"""Tokenizers: training a byte-level BPE, the runtime wrapper, and a fast exact encoder.

The file format is HF `tokenizers`' tokenizer.json, as for GPT-NeoX-20B: a BPE model with a
ByteLevel pre-tokenizer and decoder, `<|endoftext|>` = id 0 (end of document) and `<|padding|>`
= id 1.

Encoding semantics (the same in every path): text is encoded as plain text -- special tokens
written literally in a document ("<|endoftext|>" in a file about GPT-2) are *not* turned into
their ids, and no BOS/EOS is added. Special tokens (EOD, domain tokens) are added as ids by the
caller. The reference is HF `Tokenizer.encode(text, add_special_tokens=False)` with
`encode_special_tokens = True`.

The fast path: for a plain byte-level BPE, tiktoken's engine gives the same ids ~5x faster
than HF (measured on Python source). tiktoken merges the adjacent pair whose concatenation has the
lowest rank; HF merges the pair that comes first in the merge list. These agree when token ids
follow the merge order, which `_fast_encoder_or_reason` checks along with everything else that would
make the two differ (normalizer, other pre-tokenizers, added non-special tokens, ...), and then
verifies by encoding every vocabulary token and a probe text both ways. Anything it cannot vouch
for falls back to HF `encode_batch`, with the reason in `Tokenizer.fast_reason`.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from megatron_neox.errors import ConfigError, DataError
from megatron_neox.config import pad_vocab_size  # noqa: F401  (the padding rule lives with the config)

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


def domain_token(name: str) -> str:
    """The special token put before each document of a domain (Physics of LMs 3.3)."""
    return f"<|domain:{name}|>"


# ---------------------------------------------------------------------------------------------
# Byte-level alphabet
# ---------------------------------------------------------------------------------------------


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which HF ByteLevel uses to spell tokens: printable
    Latin-1 bytes stand for themselves, the other 68 bytes are shifted to U+0100 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


# HF ByteLevel's split regex (GPT-2's), written in tiktoken's regex dialect. The contractions
# are grouped differently from HF's `'s|'t|'re|'ve|'m|'ll|'d` but none is a prefix of another, so
# both match the same pieces.
BYTE_LEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text that exercises every branch of the split regex and the byte map: contractions, letters
# and digits of several scripts, combining marks, whitespace runs before words and at the end,
# CRLF, tabs, emoji (4-byte UTF-8), and literal special-token text (must stay plain text).
SELF_CHECK_TEXT = (
    "Hello world! It's a test: they'll, we've, I'm, you'd, don't, O'Neil's 'quoted'.\n"
    "def f(x):\n    return x ** 2  # comment\n\n\n\tindented\ttabs \t \n"
    "Numbers 1234567890 3.14159 -42 1e-9 ١٢٣ ½ Ⅻ; email a.b@c.org http://x.y/z?q=1&r=2\n"
    "Ünïcödé café naïve résumé São Paulo Ελληνικά Кириллица 日本語のテキスト 한국어 العربية עברית हिन्दी\n"
    "e\u0301 (combining) \u00a0nbsp \u2003em-space \u200bzwsp \u3000ideographic\n"
    "emoji 👍🏽 🇫🇷 👨‍👩‍👧 ∑∫√ ≠ ≤ ≥ → ← ⇒\r\n"
    "<|endoftext|> <|padding|> <|domain:Github|>   trailing spaces   \n   \n"
)


# ---------------------------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------------------------


def _fast_encoder_or_reason(spec: dict, name: str):
    """(tiktoken.Encoding, "") when `spec` (a parsed tokenizer.json) is a plain byte-level BPE
    whose ids tiktoken can reproduce, else (None, reason)."""
    if spec.get("normalizer") is not None:
        return None, f"it has a normalizer ({spec['normalizer'].get('type')})"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel":
        return None, f"its pre-tokenizer is {pre.get('type')}, not ByteLevel"
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None, "its ByteLevel pre-tokenizer adds a prefix space or does not split with GPT-2's regex"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") not in (None, 0, 0.0):
        return None, "its BPE uses dropout (non-deterministic)"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        return None, "its BPE uses subword prefixes/suffixes or byte fallback"
    added = spec.get("added_tokens") or []
    plain_added = [t["content"] for t in added if not t.get("special")]
    if plain_added:
        # HF matches these in the text before splitting; tiktoken knows nothing of them.
        return None, f"it has {len(plain_added)} added non-special tokens (e.g. {plain_added[0]!r})"

    alphabet = byte_level_alphabet()
    char_to_byte = {c: b for b, c in alphabet.items()}
    vocab: dict[str, int] = model.get("vocab") or {}
    added_ids = {t["id"] for t in added}
    missing = [b for b, c in alphabet.items() if c not in vocab]
    if missing:
        return None, f"its vocabulary lacks {len(missing)} of the 256 byte tokens (e.g. byte {missing[0]})"

    # Merge i must create a token whose id grows with i: then tiktoken's "lowest rank first" is
    # HF's "earliest merge first".
    merged: set[str] = set()
    last_id = -1
    for i, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = left + right
        tid = vocab.get(token)
        if tid is None or left not in vocab or right not in vocab:
            return None, f"merge {i} ({left!r} + {right!r}) uses or makes a token missing from the vocabulary"
        if tid <= last_id:
            return None, f"its merges are not in id order (merge {i} makes id {tid} after id {last_id})"
        last_id = tid
        merged.add(token)
    base = set(alphabet.values())
    extra = [t for t, i in vocab.items() if i not in added_ids and t not in merged and t not in base]
    if extra:
        # tiktoken returns any whole piece found in its table; a token no merge produces would be
        # reachable by tiktoken but not by HF.
        return None, f"{len(extra)} vocabulary tokens are neither bytes nor merge results (e.g. {extra[0]!r})"

    try:
        ranks = {bytes(char_to_byte[c] for c in tok): i for tok, i in vocab.items() if i not in added_ids}
    except KeyError as e:
        return None, f"a vocabulary token contains {e.args[0]!r}, not a byte-level character"
    if len(ranks) != len(vocab) - len(added_ids & set(vocab.values())):
        return None, "two vocabulary tokens spell the same bytes"
    import tiktoken

    enc = tiktoken.Encoding(f"megatron_neox:{name}", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks,
                            special_tokens={})
    return enc, ""


def _self_check(hf, enc, vocab_strings: Sequence[str]) -> str:
    """"" when tiktoken reproduces HF on the probe text and on every vocabulary token spelled
    out as text (catches merges that tiktoken could reach by a different pair), else the reason."""
    texts = [SELF_CHECK_TEXT, *SELF_CHECK_TEXT.splitlines(keepends=True), *vocab_strings]
    want = _hf_encode_batch(hf, texts)
    for text, ids in zip(texts, want):
        got = enc.encode_ordinary(text)
        if got != ids:
            return f"self-check differs on {text[:40]!r}: tiktoken {got[:8]} vs HF {ids[:8]}"
    return ""


def _hf_encode_batch(hf, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast skips offset tracking (tokenizers >= 0.21); same ids.
    encode = getattr(hf, "encode_batch_fast", hf.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------
# The runtime wrapper
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """What the trainer and tools use: HF tokenizers for decoding and special tokens, tiktoken's
    engine for encoding when it gives identical ids.

    `vocab_size` is the unpadded size (model vocab + added tokens); see `megatron_neox.config.pad_vocab_size`.
    """

    def __init__(self, path: str, hf, spec: dict, encoder: str = "auto", verify: bool = True):
        if encoder not in ("auto", "hf", "tiktoken"):
            raise ConfigError(f"encoder must be auto, hf or tiktoken, got {encoder!r}")
        self.path = str(path)
        self._hf = hf
        # Literal "<|endoftext|>" in a document is text, not the EOD id (see module docstring).
        self._hf.encode_special_tokens = True
        # A tokenizer.json may carry truncation/padding settings (saved from a fine-tuning
        # setup); applied to whole documents they would silently cut or pad them.
        self._hf.no_truncation()
        self._hf.no_padding()
        self._spec = spec
        self._fast = None
        self.fast_reason = "HF encoder requested"
        if encoder != "hf":
            self._fast, self.fast_reason = _fast_encoder_or_reason(spec, os.path.basename(self.path))
            if self._fast is not None and verify:
                self.verify_fast_path()
            if self._fast is None and encoder == "tiktoken":
                raise ConfigError(f"{self.path}: the tiktoken fast path cannot reproduce this tokenizer: "
                                  f"{self.fast_reason}")

    def verify_fast_path(self, texts: Sequence[str] = ()) -> str:
        """Encode the probe text, every vocabulary token and `texts` both ways; on any difference
        switch to HF for good and return the reason ("" when the fast path stays on)."""
        if self._fast is None:
            return self.fast_reason
        added_ids = {t["id"] for t in self._spec.get("added_tokens") or []}
        reason = _self_check(self._hf, self._fast, [*self._vocab_texts(self._spec, added_ids), *texts])
        if reason:
            self._fast, self.fast_reason = None, reason
        return reason

    @staticmethod
    def _vocab_texts(spec: dict, added_ids: set[int]) -> list[str]:
        char_to_byte = {c: b for b, c in byte_level_alphabet().items()}
        texts = []
        for tok, i in (spec["model"].get("vocab") or {}).items():
            if i in added_ids:
                continue
            try:
                texts.append(bytes(char_to_byte[c] for c in tok).decode("utf-8"))
            except (KeyError, UnicodeDecodeError):
                pass  # partial UTF-8 sequences cannot be written as text
        return texts

    # -- identity --------------------------------------------------------------------------

    @property
    def encoder_name(self) -> str:
        return "tiktoken" if self._fast is not None else "hf"

    def describe_encoder(self) -> str:
        if self._fast is not None:
            return "tiktoken fast path (verified identical to HF tokenizers)"
        return f"HF tokenizers encode_batch (fast path off: {self.fast_reason})"

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    @property
    def eod_id(self) -> int:
        tid = self._hf.token_to_id(EOD_TOKEN)
        if tid is None:
            raise DataError(f"{self.path}: tokenizer has no {EOD_TOKEN} token (the end-of-document marker); "
                            "train one with tools/train_tokenizer.py or add it as a special token")
        return tid

    @property
    def pad_id(self) -> int:
        """`<|padding|>`, or EOD when the tokenizer has none (padding is masked out anyway)."""
        tid = self._hf.token_to_id(PAD_TOKEN)
        return self.eod_id if tid is None else tid

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            # A plain loop: tiktoken's own batch call starts a thread pool, which only competes
            # with the other preprocessing workers for the same cores.
            encode = self._fast.encode_ordinary
            return [encode(t) for t in texts]
        return _hf_encode_batch(self._hf, list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def hf(self):
        """The underlying `tokenizers.Tokenizer`, configured as above: special-token text is not
        parsed (`encode_special_tokens`), no truncation, no padding."""
        return self._hf


def load_tokenizer(path: str | os.PathLike, encoder: str = "auto", verify: bool = True) -> Tokenizer:
    """Load a tokenizer.json. `encoder`: "auto" (fast path when exact), "hf" (never fast) or
    "tiktoken" (fast path or an error). `verify=False` skips the self-check, for worker
    processes of a run whose main process already checked the same file."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found (expected a HF tokenizers tokenizer.json; "
                        "make one with tools/train_tokenizer.py)")
    try:
        raw = path.read_text(encoding="utf-8")
        spec = json.loads(raw)
        hf = HFTokenizer.from_str(raw)
    except Exception as e:  # bad UTF-8 or JSON, or whatever tokenizers raises (a bare Exception)
        raise DataError(f"{path}: not a valid tokenizer.json ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: not a valid tokenizer.json (top level is {type(spec).__name__}, expected an object)")
    return Tokenizer(str(path), hf, spec, encoder=encoder, verify=verify)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_bpe(documents: Iterable[tuple[str, str | None]], vocab_size: int, domain_tokens: bool = False,
              min_frequency: int = 2, show_progress: bool = False):
    """Train a GPT-NeoX-style byte-level BPE on (text, domain) pairs; returns (HF tokenizer, domains).

    `vocab_size` counts the BPE vocabulary including `<|endoftext|>` (id 0) and `<|padding|>`
    (id 1). With `domain_tokens`, one special `<|domain:NAME|>` per domain seen is appended after
    the BPE vocabulary (sorted by name), so the total is `vocab_size + len(domains)`: the domains
    are only known once the stream is read, and the BPE ids stay those of a run without them.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 258 + 1:  # 2 specials + 256 bytes, and at least one merge
        raise ConfigError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs 258 ids "
                          "before its first merge")
    domains: set[str] = set()

    def texts():
        for text, domain in documents:
            if domain_tokens and domain is not None:
                domains.add(domain)
            yield text

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],  # ids 0 and 1, in this order
        # All 256 bytes up front: any input, however rare its bytes, stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    if tok.token_to_id(EOD_TOKEN) != 0 or tok.token_to_id(PAD_TOKEN) != 1:
        raise ConfigError("internal: the BPE trainer did not put <|endoftext|> at id 0 and <|padding|> at id 1")
    if domain_tokens and domains:
        tok.add_special_tokens([domain_token(d) for d in sorted(domains)])
    return tok, sorted(domains)


def save_tokenizer(hf, path: str | os.PathLike) -> None:
    """Write tokenizer.json atomically (a reader never sees a half-written file)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        hf.save(str(tmp), pretty=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
