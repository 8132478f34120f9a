"""Chat / prompt-completion (SFT) and preference (DPO) jsonl -> token and loss-mask datasets.

    sft: {prefix}_text_document.{bin,idx}      tokens of each example (one document each)
         {prefix}_loss_mask_document.{bin,idx}  1 where the token is trained (uint8), same sizes
    dpo: {prefix}_chosen_document, {prefix}_chosen_loss_mask_document,
         {prefix}_rejected_document, {prefix}_rejected_loss_mask_document: document i of each is pair i

Examples are small next to pretraining text, so this runs in one process. Every output is written
under a temporary name and renamed only when the whole input was read (IndexedDatasetBuilder), so a
failure leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

from megatron_neox.data.chat import BadExample, ChatEncoder, dpo_example, fit_length, load_record, sft_example
from megatron_neox.data.indexed import IndexedDatasetBuilder, best_dtype
from megatron_neox.data.readers import SKIP_HINT, BadStream, expand_inputs, iter_line_blocks
from megatron_neox.errors import ConfigError, DataError

MAX_BAD_EXAMPLES = 10
MASK_KEY = "loss_mask"


def sft_prefixes(prefix: str) -> tuple[str, str]:
    """(tokens, loss mask) dataset prefixes of an SFT dataset written with --output-prefix `prefix`."""
    return f"{prefix}_text_document", f"{prefix}_{MASK_KEY}_document"


def dpo_prefixes(prefix: str) -> tuple[str, str, str, str]:
    """(chosen, chosen mask, rejected, rejected mask) prefixes of a preference dataset."""
    return (f"{prefix}_chosen_document", f"{prefix}_chosen_{MASK_KEY}_document",
            f"{prefix}_rejected_document", f"{prefix}_rejected_{MASK_KEY}_document")


@dataclass
class ChatSummary:
    outputs: list
    template: str
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    bad_lines: int = 0
    bad_examples: list = field(default_factory=list)


def _lines(files):
    for path in files:
        try:
            for first, block, _ in iter_line_blocks(path):
                for k, line in enumerate(block.split(b"\n")):
                    if line.strip():
                        yield f"{path}:{first + k}", line
        except BadStream as e:
            yield f"{path}:{e.line}", e


def preprocess_chat(inputs: Sequence[str], tokenizer: str, output_prefix: str, kind: str, *,
                    max_length: int | None = None, truncate: bool = False, skip_bad_lines: bool = False
                    ) -> ChatSummary:
    """Write the datasets of `kind` ('sft' or 'dpo'); raises DataError naming the first bad line unless
    `skip_bad_lines` (then they are counted, the first few listed)."""
    if kind not in ("sft", "dpo"):
        raise ConfigError(f"--format {kind}: expected sft or dpo")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"--max-length {max_length}: expected at least 2 tokens")
    files = expand_inputs(inputs)
    enc = ChatEncoder(tokenizer)
    prefixes = sft_prefixes(output_prefix) if kind == "sft" else dpo_prefixes(output_prefix)
    summary = ChatSummary(list(prefixes), enc.template.source)
    dtype = best_dtype(enc.vocab_size)
    with contextlib.ExitStack() as stack:
        builders = [stack.enter_context(IndexedDatasetBuilder(p, dtype if i % 2 == 0 else "uint8"))
                    for i, p in enumerate(prefixes)]
        for where, line in _lines(files):
            try:
                if isinstance(line, BadStream):
                    raise BadExample(line.reason)
                record = load_record(line)
                seqs = [sft_example(enc, record)] if kind == "sft" else list(dpo_example(enc, record))
                fitted = [fit_length(ids, mask, max_length, truncate) for ids, mask in seqs]
            except BadExample as e:
                if not skip_bad_lines:
                    raise DataError(f"{where}: {e}\n({SKIP_HINT})") from None
                summary.bad_lines += 1
                if len(summary.bad_examples) < MAX_BAD_EXAMPLES:
                    summary.bad_examples.append(f"{where}: {e}")
                continue
            summary.truncated += sum(len(f[0]) < len(s[0]) for f, s in zip(fitted, seqs))
            for k, (ids, mask) in enumerate(fitted):
                builders[2 * k].add_document(ids)
                builders[2 * k + 1].add_document(mask)
                summary.tokens += len(ids)
                summary.trained_tokens += int(mask.sum())
            summary.examples += 1
        if summary.examples == 0:
            raise DataError(f"{', '.join(map(str, files))}: no usable example "
                            f"({summary.bad_lines} bad lines skipped); nothing written")
    return summary


def format_chat_summary(s: ChatSummary) -> str:
    lines = [f"  {p}.{{bin,idx}}" for p in s.outputs]
    lines.append(f"{s.examples:,} examples, {s.tokens:,} tokens ({s.trained_tokens:,} trained); "
                 f"truncated: {s.truncated:,}; chat template: {s.template}")
    lines.append(f"bad lines skipped: {s.bad_lines:,}")
    lines += [f"  bad: {ex}" for ex in s.bad_examples]
    if s.bad_lines > len(s.bad_examples):
        lines.append(f"  ... and {s.bad_lines - len(s.bad_examples)} more")
    return "\n".join(lines)

