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
