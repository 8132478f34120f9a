"""The BioS knowledge probe: accuracy per attribute, and the knowledge stored in bits.

For each person of a `bios_facts.jsonl` (tools/make_sample_corpus.py) and each of the six
attributes, the prompt is a bio sentence cut before the value ("Abigail Ada Abernathy was born
on"), after an end-of-document token as at the start of a training document; the target is the
true value's tokens (" March 3, 1954"; byte-level BPE keeps the space with the following word).

- accuracy: greedy generation after the prompt starts with the target (one teacher-forced pass
  decides it: the target is the greedy continuation exactly when each of its tokens is the argmax
  given the ones before).
- knowledge in bits (Allen-Zhu & Li, "Physics of Language Models: Part 3.3, Knowledge Capacity
  Scaling Laws", 2024): for each person p and attribute a,

      bits(p, a) = max(0, log2 N_a - CE(p, a)),   CE(p, a) = -sum_t log2 P(target_t | prompt, target_<t)

  summed over people and attributes; N_a is the number of values attribute a can take in the
  generator (below). A model that knows the value (CE ~ 0) stores log2 N_a bits; one that guesses
  uniformly stores none. bits per parameter divides by all the model's parameters (embeddings
  included); the paper measures ~2 bits/parameter at capacity for models trained long enough.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from megatron_neox.errors import DataError


def value_counts() -> Dict[str, int]:
    """attribute -> N_a, the number of values make_sample_corpus's PersonFactory draws from."""
    from megatron_neox.data import corpus

    # Dates: 12 months x days 1-28 x years 1900-2099 (PersonFactory.new_person, after the paper).
    # An employer has one city, so the employer's city adds no knowledge once the employer is
    # known: N = 1 (log2 1 = 0 bits), else the sum would count the employer twice.
    return {
        "birth_date": len(corpus._MONTHS) * 28 * 200,
        "birth_city": len(set(corpus._CITIES)),
        "university": len(set(corpus._UNIVERSITIES)),
        "major": len(set(corpus._MAJORS)),
        "employer": len({name for name, _ in corpus._EMPLOYERS}),
        "employer_city": 1,
    }


def probe_prefixes() -> Dict[str, str]:
    """attribute -> the part before the value of its first template that names the person in full
    and needs no pronoun (the facts file does not record gender)."""
    from megatron_neox.data.corpus import ATTRIBUTES, BIO_TEMPLATES

    out = {}
    for attr in ATTRIBUTES:
        for template in BIO_TEMPLATES[attr]:
            head = template[: template.index("{v}")]
            if head.startswith("{s} ") and head.count("{") == 1:
                out[attr] = head.rstrip()
                break
    return out


@dataclass
class AttributeResult:
    correct: int
    total: int
    bits: float  # knowledge stored about this attribute, summed over the people


def read_facts(path: Path, people: int) -> List[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(records) >= people:
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            missing = [k for k in ("name", *probe_prefixes()) if k not in rec]
            if missing:
                raise DataError(f"{path}:{lineno}: missing keys {missing} (expected a bios_facts.jsonl from "
                                "tools/make_sample_corpus.py)")
            records.append(rec)
    return records


def knowledge_probe(lm, facts_path: Path, people: int, doc_start: Optional[List[int]] = None
                    ) -> Dict[str, AttributeResult]:
    """attribute -> AttributeResult over the first `people` people; `lm` is a `NeoXLM`.

    `doc_start`: the ids a training document starts with, put before each prompt (default: the
    EOD that ends the document before and the tokenizer's BOS, as preprocessing writes documents;
    add a domain token when the data has them)."""
    records = read_facts(Path(facts_path), people)
    counts = value_counts()
    tok = lm.tokenizer
    start = [tok.eod_id] + tok.bos_ids if doc_start is None else doc_start
    results = {}
    for attr, head in probe_prefixes().items():
        prompts = [list(start) + tok.encode(head.format(s=rec["name"])) for rec in records]
        targets = [tok.encode(" " + str(rec[attr])) for rec in records]
        scores = lm.score_pairs(prompts, targets)
        bits = sum(max(0.0, math.log2(counts[attr]) + logprob / math.log(2)) for logprob, _ in scores)
        results[attr] = AttributeResult(sum(greedy for _, greedy in scores), len(scores), bits)
    return results
