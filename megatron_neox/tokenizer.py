"""Tokenizers: training a byte-level BPE, the runtime wrapper, and a fast exact encoder.

The file format is HF `tokenizers`' tokenizer.json: ours is a BPE model with a ByteLevel
pre-tokenizer and decoder; any other loads too (Llama-3's Split + ByteLevel, Llama-2's
SentencePiece-style BPE with byte fallback). The end of document is the token `<|endoftext|>`,
wherever it sits: id 0 in GPT-NeoX-20B's tokenizer and ours (with `<|padding|>` = id 1), 50256
(the last id) in GPT-2's; a tokenizer without it uses its family's (`EOD_TOKENS`). The BOS a
family puts before each text is read from the file's own post-processor (`Tokenizer.bos_ids`).

Encoding semantics (the same in every path): text is encoded as plain text -- special tokens
written literally in a document ("<|endoftext|>" in a file about GPT-2) are *not* turned into
their ids, and no BOS/EOS is added. Special tokens (EOD, domain tokens) are added as ids by the
caller. The reference is HF `Tokenizer.encode(text, add_special_tokens=False)` with
`encode_special_tokens = True`.

The fast path: tiktoken's engine gives the same ids as HF 4-8x faster (measured on Python
source and prose). tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF
merges the pair that comes first in the merge list. These agree when token ids follow the merge
order, which `_fast_encoder_or_reason` checks along with everything else that would make the
two differ. The split regex is GPT-2's for a ByteLevel pre-tokenizer, or the file's own for a
Split + ByteLevel one (Llama-3). Two HF steps that come before the BPE are reproduced: a Unicode normalizer (NFC for
GPT-NeoX-20B; HF's own normalizer object is applied to each non-ASCII document), and added
tokens that are runs of spaces (GPT-NeoX-20B's 2-24 spaces, cut out before the split regex: see
`_space_run_pattern`). The result is then verified by encoding every vocabulary token and a
probe text both ways. Anything it cannot vouch for falls back to HF `encode_batch`, with the
reason in `Tokenizer.fast_reason`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from megatron_neox.durable import atomic_paths, write_text
from megatron_neox.errors import ConfigError, DataError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
# The end-of-document token of each family, looked for in this order: GPT-2/GPT-NeoX, Llama-3
# (its base model's EOS), Llama-2/Mistral (SentencePiece's </s>). The latter two count only as
# special added tokens, as the families declare them, never as text a BPE happened to learn.
EOD_TOKENS = (EOD_TOKEN, "<|end_of_text|>", "</s>")


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


def byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level token spells ("Ġthe" -> b" the"); KeyError naming the first
    character that is not in the byte-level alphabet."""
    bad = _NOT_BYTE_LEVEL.search(token)
    if bad:
        raise KeyError(bad.group())
    return token.translate(_TO_LATIN1).encode("latin-1")  # str.translate: one C pass, no per-char Python


_TO_LATIN1 = {ord(c): b for b, c in byte_level_alphabet().items()}
_NOT_BYTE_LEVEL = re.compile("[^" + "".join(re.escape(c) for c in byte_level_alphabet().values()) + "]")


# HF ByteLevel's split regex (GPT-2's), written in tiktoken's regex dialect. The contractions
# are grouped differently from HF's `'s|'t|'re|'ve|'m|'ll|'d` but none is a prefix of another, so
# both match the same pieces.
BYTE_LEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text that exercises every branch of the split regex and the byte map: contractions, letters
# and digits of several scripts, combining marks (NFD text), whitespace runs before words and at
# the end, runs of 1-49 spaces (GPT-NeoX-20B's added whitespace tokens stop at 24), CRLF, tabs,
# emoji (4-byte UTF-8), and literal special-token text (must stay plain text).
SELF_CHECK_TEXT = (
    "Hello world! It's a test: they'll, we've, I'm, you'd, don't, O'Neil's 'quoted'.\n"
    "def f(x):\n    return x ** 2  # comment\n\n\n\tindented\ttabs \t \n"
    "Numbers 1234567890 3.14159 -42 1e-9 ١٢٣ ½ Ⅻ; email a.b@c.org http://x.y/z?q=1&r=2\n"
    "Ünïcödé café naïve résumé São Paulo Ελληνικά Кириллица 日本語のテキスト 한국어 العربية עברית हिन्दी\n"
    "e\u0301 (combining) Cafe\u0301 A\u030a\u0327 \u1100\u1161\u11a8 "
    "\u00a0nbsp \u2003em-space \u200bzwsp \u3000ideographic\n"
    "emoji 👍🏽 🇫🇷 👨‍👩‍👧 ∑∫√ ≠ ≤ ≥ → ← ⇒\r\n"
    + "".join(f"{' ' * n}x{n}\n{' ' * n}\t{' ' * n}\n\n" for n in (1, 2, 3, 23, 24, 25, 26, 47, 48, 49))
    + "<|endoftext|> <|padding|> <|domain:Github|>   trailing spaces   \n   \n  "
)


# ---------------------------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------------------------

# Normalizers whose output HF computes on the whole text (before the byte-level split) and that
# leave ASCII unchanged, so ASCII documents -- most of the Pile -- skip them.
_UNICODE_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")


_NOT_IN_UTF8 = frozenset((0xC0, 0xC1, *range(0xF5, 0x100)))  # RFC 3629 section 1


def _space_run_pattern(longest: int) -> str:
    """BYTE_LEVEL_PATTERN for a tokenizer whose added tokens are the runs of 2..`longest` spaces.

    HF cuts those tokens out of the text *before* the split regex runs (leftmost-longest: a run
    of n spaces gives n // longest tokens of `longest`, then one of the rest if it is >= 2; a
    single leftover space stays with the text after it), and splits the pieces between them
    separately. One regex over the whole text does the same when (1) its first branch takes up
    to `longest` spaces at the start of a run of >= 2, and (2) its whitespace branches never
    step into such a run: they match HF's `\\s+(?!\\S)|\\s+` over whitespace in which every
    space stands alone, which is all HF's pieces can hold. Where HF's piece ends at a cut-out
    token, `(?!\\S)` sees a space, as HF sees the end of its piece.
    """
    # A whitespace run with no two spaces in a row: single spaces each followed by another
    # whitespace character, optionally one trailing space that is not followed by a space.
    lone = r"(?: ?[^\S ])+"
    return (rf" {{2,{longest}}}|'(?:[sdmt]|ll|ve|re)| ?\p{{L}}+| ?\p{{N}}+| ?[^\s\p{{L}}\p{{N}}]+"
            rf"|{lone}(?: (?![\S ])|(?!\S))| (?![\S ])|\s")


class _FastEncoder:
    """tiktoken's engine, plus the HF normalizer for the non-ASCII documents when there is one."""

    def __init__(self, enc, normalize=None, what: str = ""):
        self.enc, self.normalize, self.what = enc, normalize, what

    def encode(self, text: str) -> list[int]:
        if self.normalize is not None and not text.isascii():  # isascii is O(1) in CPython
            text = self.normalize(text)
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # A plain loop: tiktoken's own batch call starts a thread pool, which only competes
        # with the other preprocessing workers for the same cores.
        encode, normalize = self.enc.encode_ordinary, self.normalize
        if normalize is None:
            return [encode(t) for t in texts]
        return [encode(t if t.isascii() else normalize(t)) for t in texts]


def _space_tokens_or_reason(spec: dict, plain_added: list[dict]) -> tuple[dict[int, int], str]:
    """({run length: id}, "") when the added non-special tokens are exactly the runs of 2..K
    spaces (GPT-NeoX-20B: 2..24, ids 50254-50276), matched the way `_space_run_pattern`
    reproduces; else ({}, reason)."""
    runs: dict[int, int] = {}
    for t in plain_added:
        content = t["content"]
        if set(content) != {" "} or len(content) < 2:
            return {}, (f"it has {len(plain_added)} added non-special tokens and {content!r} is not a run "
                        "of 2 or more spaces (the only kind the fast path reproduces)")
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return {}, f"its added whitespace token of {len(content)} spaces has lstrip/rstrip/single_word set"
        kind = (spec.get("normalizer") or {}).get("type")
        if not t.get("normalized", True) and kind in ("NFKC", "NFKD"):
            # Matched before a normalizer that makes new spaces (U+00A0 -> U+0020).
            return {}, f"its whitespace tokens are matched before its {kind} normalizer"
        runs[len(content)] = t["id"]
    if sorted(runs) != list(range(2, len(runs) + 2)):
        return {}, f"its added whitespace tokens are runs of {sorted(runs)} spaces, not every length from 2 up"
    for t in spec.get("added_tokens") or []:
        if t.get("special") and "  " in t["content"]:
            return {}, f"its special token {t['content']!r} holds a run of spaces"
    return runs, ""


def _sentencepiece_reason(spec: dict) -> str:
    """Why a SentencePiece-style BPE (Llama-2's tokenizer.json: "▁" for spaces via a Metaspace
    pre-tokenizer or a Prepend/Replace normalizer, byte fallback to `<0xNN>` tokens) has no fast
    path, or "" when `spec` is not one.

    Its merges run over Unicode characters and a character missing from the vocabulary becomes
    its UTF-8 bytes as `<0xNN>` tokens that never merge again; tiktoken merges bytes, so a
    character the vocabulary holds would have to be reached through byte pairs that are not in
    it. And with no split regex the whole document is one piece, on which tiktoken's merge loop
    is quadratic. HF's Rust encoder is the exact path for these."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    normalizer = json.dumps(spec.get("normalizer") or {}, ensure_ascii=False)
    kinds = {pre.get("type"), *(p.get("type") for p in pre.get("pretokenizers") or [])}
    if model.get("byte_fallback") or "Metaspace" in kinds or "\u2581" in normalizer:
        return ("it is a SentencePiece-style BPE (Llama-2's kind: '▁' for spaces, merges over Unicode "
                "characters, byte fallback to <0xNN> tokens), which tiktoken's byte-level engine cannot reproduce")
    return ""


def _split_pattern_or_reason(pre: dict) -> tuple[str, str]:
    """(the regex that splits text before the BPE, "") for the two byte-level layouts tiktoken
    reproduces, else ("", reason):

    - GPT-2 / GPT-NeoX: a ByteLevel pre-tokenizer that splits with GPT-2's regex itself;
    - Llama-3 / tiktoken conversions: Sequence[Split(Regex, Isolated), ByteLevel(use_regex=False)],
      the regex being the tokenizer's own (HF runs it with Oniguruma, tiktoken with fancy-regex:
      the self-check encodes the probe text and the vocabulary both ways to vouch for them).
    """
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return "", "its ByteLevel pre-tokenizer adds a prefix space or does not split with GPT-2's regex"
        return BYTE_LEVEL_PATTERN, ""
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and [p.get("type") for p in steps] == ["Split", "ByteLevel"]:
        split, byte_level = steps
        regex = (split.get("pattern") or {}).get("Regex")
        if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
            return "", ("its Split pre-tokenizer is not a regex whose matches are kept as pieces (pattern "
                        f"{split.get('pattern')}, behavior {split.get('behavior')}, invert {split.get('invert')})")
        if byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
            return "", "its ByteLevel step after the Split adds a prefix space or splits again with GPT-2's regex"
        return regex, ""
    return "", f"its pre-tokenizer is {_describe_pre(pre)}, not ByteLevel or Split + ByteLevel"


def _describe_pre(pre: dict) -> str:
    steps = pre.get("pretokenizers")
    return f"Sequence[{', '.join(str(p.get('type')) for p in steps)}]" if steps else str(pre.get("type"))


def _fast_encoder_or_reason(spec: dict, name: str, hf=None):
    """(_FastEncoder, "") when `spec` (a parsed tokenizer.json) is a byte-level BPE whose ids
    tiktoken can reproduce, else (None, reason). `hf` is the loaded tokenizer, whose normalizer
    is reused as it is (a Unicode normal form only)."""
    reason = _sentencepiece_reason(spec)
    if reason:
        return None, reason
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in _UNICODE_NORMALIZERS:
        return None, f"it has a normalizer the fast path does not apply ({normalizer.get('type')})"
    model = spec.get("model") or {}
    split_pattern, reason = _split_pattern_or_reason(spec.get("pre_tokenizer") or {})
    if reason:
        return None, reason
    if model.get("type") != "BPE":
        return None, f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") not in (None, 0, 0.0):
        return None, "its BPE uses dropout (non-deterministic)"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "its BPE uses subword prefixes/suffixes"
    added = spec.get("added_tokens") or []
    space_runs, reason = _space_tokens_or_reason(spec, [t for t in added if not t.get("special")])
    if reason:
        return None, reason

    alphabet = byte_level_alphabet()
    vocab: dict[str, int] = model.get("vocab") or {}
    added_ids = {t["id"] for t in added}
    # Bytes that never occur in UTF-8 text (0xC0, 0xC1, 0xF5-0xFF) may be missing, as 13 are
    # from GPT-NeoX-20B's vocabulary; any other byte must have a token.
    missing = [b for b, c in alphabet.items() if c not in vocab and b not in _NOT_IN_UTF8]
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
        ranks = {byte_level_bytes(tok): i for tok, i in vocab.items() if i not in added_ids}
    except KeyError as e:
        return None, f"a vocabulary token contains {e.args[0]!r}, not a byte-level character"
    if len(ranks) != len({i for i in vocab.values() if i not in added_ids}):
        return None, "two vocabulary tokens spell the same bytes"
    pattern = split_pattern
    what = [] if pattern == BYTE_LEVEL_PATTERN else ["its own split regex"]
    if space_runs and pattern != BYTE_LEVEL_PATTERN:
        return None, "it has both a custom split regex and added whitespace tokens"
    if space_runs:
        # A run of spaces never reaches the BPE (see _space_run_pattern), so the BPE's own
        # multi-space tokens are unreachable and the added ids take their bytes.
        ranks.update({b" " * n: tid for n, tid in space_runs.items()})
        if len(set(ranks.values())) != len(ranks):
            return None, "an added whitespace token's id is also a BPE token's id"
        pattern = _space_run_pattern(max(space_runs))
        what.append(f"{len(space_runs)} whitespace tokens")
    normalize = None
    if normalizer is not None:
        if hf is None or hf.normalizer is None:
            return None, "its normalizer could not be loaded"
        normalize = hf.normalizer.normalize_str
        what.insert(0, normalizer["type"])
    import tiktoken

    enc = tiktoken.Encoding(f"megatron_neox:{name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return _FastEncoder(enc, normalize, " + ".join(what)), ""


def _self_check(hf, fast: _FastEncoder, vocab_strings: Sequence[str]) -> str:
    """"" when the fast encoder reproduces HF on the probe text and on every vocabulary token
    spelled out as text (catches merges that tiktoken could reach by a different pair), else
    the reason."""
    texts = [SELF_CHECK_TEXT, *SELF_CHECK_TEXT.splitlines(keepends=True), *vocab_strings]
    want = _hf_encode_batch(hf, texts)
    for text, ids, got in zip(texts, want, fast.encode_batch(texts)):
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

    def __init__(self, path: str, hf, spec: dict, encoder: str = "auto", verify: bool = True, digest: str = ""):
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
        self._digest = digest  # sha256 of the file: the key of the vocabulary check's cache
        self._fast = None
        self.fast_reason = "HF encoder requested"
        if encoder != "hf":
            self._fast, self.fast_reason = _fast_encoder_or_reason(spec, os.path.basename(self.path), hf)
            if self._fast is not None and verify:
                self.verify_fast_path()
            if self._fast is None and encoder == "tiktoken":
                raise ConfigError(f"{self.path}: the tiktoken fast path cannot reproduce this tokenizer: "
                                  f"{self.fast_reason}")

    def verify_fast_path(self, texts: Sequence[str] = ()) -> str:
        """Encode the probe text, every vocabulary token and `texts` both ways; on any difference
        switch to HF for good and return the reason ("" when the fast path stays on).

        The vocabulary part (~50k encodings each way, seconds for GPT-NeoX-20B's) depends only on
        the file, the two libraries and this module, so a pass is remembered under that key in
        `vocab_check_cache_dir()`; the probe text and `texts` are checked every time."""
        if self._fast is None:
            return self.fast_reason
        marker = _vocab_check_marker(self._digest)
        known_good = marker is not None and marker.exists()
        vocab = [] if known_good else self._vocab_texts(self._spec)
        reason = _self_check(self._hf, self._fast, [*vocab, *texts])
        if reason:
            self._fast, self.fast_reason = None, reason
        elif not known_good and marker is not None:
            _touch(marker)
        return reason

    @staticmethod
    def _vocab_texts(spec: dict) -> list[str]:
        added_ids = {t["id"] for t in spec.get("added_tokens") or []}
        texts = []
        for tok, i in (spec["model"].get("vocab") or {}).items():
            if i in added_ids:
                continue
            try:
                texts.append(byte_level_bytes(tok).decode("utf-8"))
            except (KeyError, UnicodeDecodeError):
                pass  # partial UTF-8 sequences cannot be written as text
        return texts

    # -- identity --------------------------------------------------------------------------

    @property
    def encoder_name(self) -> str:
        return "tiktoken" if self._fast is not None else "hf"

    def describe_encoder(self) -> str:
        if self._fast is not None:
            extras = f" with {self._fast.what}" if self._fast.what else ""
            return f"tiktoken fast path{extras} (verified identical to HF tokenizers)"
        return f"HF tokenizers encode_batch (fast path off: {self.fast_reason})"

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    @property
    def eod_token(self) -> str:
        """The end-of-document token: the first of EOD_TOKENS the tokenizer has (see there)."""
        special = {t["content"] for t in self._spec.get("added_tokens") or [] if t.get("special")}
        for i, token in enumerate(EOD_TOKENS):
            if (i == 0 or token in special) and self._hf.token_to_id(token) is not None:
                return token
        raise DataError(f"{self.path}: tokenizer has none of the end-of-document tokens {list(EOD_TOKENS)} "
                        "(the last two must be special added tokens); train one with tools/train_tokenizer.py "
                        "or add one as a special token")

    @property
    def eod_id(self) -> int:
        return self._hf.token_to_id(self.eod_token)

    @property
    def bos_ids(self) -> list[int]:
        """The special tokens the tokenizer's own post-processor puts before a text (Llama-2's
        `<s>`, Llama-3's `<|begin_of_text|>`: HF `encode(text)` with special tokens on starts
        with them); [] for tokenizers that add none (GPT-2, GPT-NeoX, ours)."""
        return _template_prefix(self._spec.get("post_processor"))

    @property
    def pad_id(self) -> int:
        """`<|padding|>`, or EOD when the tokenizer has none (padding is masked out anyway)."""
        tid = self._hf.token_to_id(PAD_TOKEN)
        return self.eod_id if tid is None else tid

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return self._fast.encode_batch(texts)
        return _hf_encode_batch(self._hf, list(texts))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def hf(self):
        """The underlying `tokenizers.Tokenizer`, configured as above: special-token text is not
        parsed (`encode_special_tokens`), no truncation, no padding."""
        return self._hf


def _template_prefix(processor: dict | None) -> list[int]:
    """The ids a TemplateProcessing (alone or in a Sequence) puts before `$A` in its single template."""
    if not processor:
        return []
    if processor.get("type") == "Sequence":
        return [i for p in processor.get("processors") or [] for i in _template_prefix(p)]
    if processor.get("type") != "TemplateProcessing":
        return []
    ids: list[int] = []
    for piece in processor.get("single") or []:
        if "Sequence" in piece:
            break
        name = piece.get("SpecialToken", {}).get("id")
        ids += (processor.get("special_tokens") or {}).get(name, {}).get("ids", [])
    return ids


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
        data = path.read_bytes()
        raw = data.decode("utf-8")
        spec = json.loads(raw)
        hf = HFTokenizer.from_str(raw)
    except Exception as e:  # bad UTF-8 or JSON, or whatever tokenizers raises (a bare Exception)
        raise DataError(f"{path}: not a valid tokenizer.json ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: not a valid tokenizer.json (top level is {type(spec).__name__}, expected an object)")
    return Tokenizer(str(path), hf, spec, encoder=encoder, verify=verify, digest=hashlib.sha256(data).hexdigest())


def vocab_check_cache_dir() -> Path:
    """Where passed vocabulary checks are remembered: $MEGATRON_NEOX_CACHE, else
    $XDG_CACHE_HOME/megatron_neox, else ~/.cache/megatron_neox (subdirectory tokenizer_checks)."""
    root = os.environ.get("MEGATRON_NEOX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "megatron_neox")
    return Path(root) / "tokenizer_checks"


def _vocab_check_marker(digest: str) -> Path | None:
    """The marker file of a passed check for this file under these library and module versions."""
    if not digest:
        return None
    import tiktoken
    import tokenizers

    key = hashlib.sha256("\0".join((digest, tokenizers.__version__, tiktoken.__version__,
                                      hashlib.sha256(Path(__file__).read_bytes()).hexdigest())).encode())
    return vocab_check_cache_dir() / f"{key.hexdigest()[:32]}.ok"


def _touch(marker: Path) -> None:
    """Create the marker; a cache dir we cannot write only means checking again next time."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_text(marker, "vocabulary self-check passed\n")
    except OSError:
        pass


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
    with atomic_paths(path) as (tmp,):
        hf.save(str(tmp), pretty=True)
