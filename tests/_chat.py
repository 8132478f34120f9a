"""Tiny chat tokenizers for the fine-tuning tests: our byte-level BPE, with or without a ChatML
template (and its two special tokens) in a tokenizer_config.json beside it."""
import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXTS = ["What is two plus two? Four. The answer is four.", "Hello there! How are you today?",
         "Name a colour: red, green or blue.", "def add(a, b):\n    return a + b\n"] * 20


def chat_tokenizer(out_dir, chatml: bool = False, vocab_size: int = 300) -> Path:
    """tokenizer.json in `out_dir`; with `chatml`, <|im_start|>/<|im_end|> added as special tokens and
    a tokenizer_config.json holding the ChatML template (eos <|im_end|>)."""
    from megatron_neox.tokenizer import save_tokenizer, train_bpe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok, _ = train_bpe(((t, None) for t in TEXTS), vocab_size)
    config = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    if chatml:
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        config.update(chat_template=CHATML, eos_token="<|im_end|>")
    save_tokenizer(tok, out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir / "tokenizer.json"


def hf_tokenizer(path: Path):
    """transformers' fast tokenizer over the same files (reads tokenizer_config.json's template)."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((Path(path).parent / "tokenizer_config.json").read_text())
    from megatron_neox.data.chat import BUILTIN_TEMPLATE

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=config["eos_token"],
                                   chat_template=config.get("chat_template", BUILTIN_TEMPLATE))


def write_jsonl(path: Path, records) -> Path:
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return Path(path)
