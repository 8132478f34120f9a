"""Tokenizer files for tests: the repo's copy of GPT-NeoX-20B's, and a GPT-2-style BPE."""
import json
from pathlib import Path

import zstandard

DATA = Path(__file__).resolve().parent / "data"
NEOX_20B_ZST = DATA / "gpt-neox-20b.json.zst"


def neox20b_tokenizer(out_dir: Path) -> Path:
    """tests/data/gpt-neox-20b.json.zst decompressed into out_dir (see tests/data/README.md)."""
    path = Path(out_dir) / "gpt-neox-20b.json"
    if not path.exists():
        path.write_bytes(zstandard.ZstdDecompressor().decompress(NEOX_20B_ZST.read_bytes()))
    return path


def gpt2_style_tokenizer(texts, vocab_size: int, path: Path) -> Path:
    """A byte-level BPE laid out like GPT-2's tokenizer.json: no `<|padding|>`, and
    `<|endoftext|>` is the LAST id (GPT-2: 50256), present in the BPE vocabulary and listed as a
    special added token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    eod = len(spec["model"]["vocab"])
    spec["model"]["vocab"]["<|endoftext|>"] = eod
    spec["added_tokens"] = [{"id": eod, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": True, "special": True}]
    Path(path).write_text(json.dumps(spec))
    return Path(path)


def whitespace_stress_documents(n: int = 400, seed: int = 0) -> list[str]:
    """Documents that hit every step HF takes before its BPE: NFD text (the NFC normalizer),
    runs of 1-40 spaces anywhere (GPT-NeoX-20B's added 2-24-space tokens), tabs, CRLF, lone CR,
    other Unicode spaces, emoji, and literal special-token text (must stay text)."""
    import random
    import unicodedata

    rng = random.Random(seed)
    words = ["def", "return", "x", "Café", "naïve", "Ångström", "São", "Ελληνικά", "日本語", "한국어",
             "العربية", "👍🏽", "🇫🇷", "👨‍👩‍👧", "1234", "3.14", "'s", "don't", "<|endoftext|>",
             "<|padding|>", "(", "):", "\u00a0", "\u3000", "\u2003", "e\u0301", "A\u030a", "\u1100\u1161"]
    seps = ["\t", "\r\n", "\n", "\r", "\n\t", " \n", "\t "]
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            w = rng.choice(words)
            parts.append(unicodedata.normalize("NFD", w) if rng.random() < 0.3 else w)
            r = rng.random()
            parts.append(" " * rng.randint(1, 40) if r < 0.45 else rng.choice(seps) if r < 0.7 else " ")
            if rng.random() < 0.15:  # indentation, as in source code
                parts.append("\n" + " " * rng.choice((2, 4, 8, 12, 16, 24, 25, 28, 32, 40)))
        docs.append("".join(parts))
    return docs


# Llama-3's pre-tokenizer regex, as its tokenizer.json writes it (a Split step before ByteLevel).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_style_tokenizer(texts, vocab_size: int, path: Path, reserved: int = 4) -> Path:
    """A byte-level BPE laid out like Llama-3's tokenizer.json: Split(its own regex, Isolated) +
    ByteLevel(use_regex=False), `ignore_merges`, then special tokens after the BPE ids
    (<|begin_of_text|>, <|end_of_text|>, reserved ones), no <|endoftext|>, and a post-processor
    that puts <|begin_of_text|> before a text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>",
                *(f"<|reserved_special_token_{i}|>" for i in range(reserved))]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(path))
    return Path(path)


def llama2_style_tokenizer(texts, vocab_size: int, path: Path, legacy: bool = True,
                           limit_alphabet: int = 100) -> Path:
    """A SentencePiece-style BPE laid out like Llama-2's tokenizer.json: <unk>, <s>, </s> at ids
    0-2, the 256 byte-fallback tokens <0x00>..<0xFF> at 3-258, then characters and merges; '▁'
    for spaces (legacy: a Prepend + Replace normalizer, as Llama-2's own file; else a Metaspace
    pre-tokenizer with prepend_scheme "first", as newer conversions), byte fallback on, and a
    post-processor that puts <s> before a text. `limit_alphabet` keeps rare characters out of
    the vocabulary, so they take the byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training splits at '▁' so no merge spans two words (SentencePiece's pieces start at a space).
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  limit_alphabet=limit_alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    # In Llama-2's file only <unk>, <s>, </s> are added tokens; the byte tokens are plain vocabulary.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    if legacy:
        spec["pre_tokenizer"] = None
    else:
        spec["normalizer"] = None
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                 "split": False}
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
    ]).__getstate__())
    spec["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]).__getstate__())
    Path(path).write_text(json.dumps(spec, ensure_ascii=False))
    return Path(path)


def hard_texts() -> list[str]:
    """Text a family's tokenizer must get right: Unicode of many scripts, characters the small
    vocabularies lack (byte fallback / raw bytes), whitespace runs, digit runs, CJK, emoji,
    leading and trailing spaces, literal special-token text."""
    return [
        "Hello world", " leading space", "   three leading spaces", "trailing   ", "", " ", "\n", "\t\t",
        "Numbers 1234567890 and 3.14159, 007, -42, 1e-9; ١٢٣ ½",
        "日本語のテキストと中文字符, 한국어 텍스트", "emoji 👍🏽 🇫🇷 👨‍👩‍👧 ∑∫√ ≠ ≤",
        "Ünïcödé café naïve résumé Ελληνικά Кириллица العربية עברית हिन्दी",
        "rare: \U0001F9EC \u16A0\u16A1 \U00010348 \u2603\ufe0f \u00a0nbsp \u3000ideo",
        "def f(x):\n    return x ** 2  # comment\n\n\n\tindented\r\nCRLF line\r\n",
        "it's, they'll, we've, I'M, YOU'D, DON'T", "many     spaces    between\n\n\n   \n  words",
        "<s> </s> <unk> <|begin_of_text|> <|end_of_text|> <|endoftext|> <0x41>", "▁already▁has▁meta",
    ]
