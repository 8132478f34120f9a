"""The built-in fine-tuning data of `make demo-chat`, made from the sample corpus's biographies
(bios_facts.jsonl, tools/make_sample_corpus.py): nothing is downloaded.

- sft.jsonl: conversations that ask for a person's facts; the answers are sentences the biographies
  taught during pretraining ("Ada Lee was born on May 3, 1950."). One or two questions each, some
  with a system message, some as prompt/completion strings.
- prefs.jsonl: one preference pair per person (people not used for SFT), whose chosen answer
  follows a rule the SFT data never shows -- it ends with "Happy to help!" -- and whose rejected
  answer is the same sentence without it. A model that learnt the rule prefers the chosen answer of
  people it never saw in a pair: `data.split` holds some pairs out to measure that (reward accuracy).
- question.txt: the question of the last pair (held out by the demo's data.split), to ask the model.
- tasks/chat_facts.{yaml,jsonl}: an lm-evaluation-harness multiple-choice task (plain text, no
  template) asking whether the model still tells a person's true fact from another person's.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from megatron_neox.durable import write_text
from megatron_neox.errors import DataError

RULE = "Happy to help!"
QUESTIONS = {  # attribute -> (question, answer sentence)
    "birth_date": ("When was {n} born?", "{n} was born on {v}."),
    "birth_city": ("Where was {n} born?", "{n} was born in {v}."),
    "university": ("Which university did {n} attend?", "{n} attended {v}."),
    "major": ("What did {n} study?", "{n} studied {v}."),
    "employer": ("Who does {n} work for?", "{n} works for {v}."),
}
TASK_YAML = """# Multiple choice: the true fact of a person from the sample corpus, or another person's.
task: chat_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _read_facts(path: Path) -> list[dict]:
    people = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                people.append(json.loads(line))
            except ValueError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
    if len(people) < 20:
        raise DataError(f"{path}: {len(people)} people; the chat demo needs at least 20 (make the sample corpus larger)")
    return people


def _turn(person: dict, attribute: str) -> tuple[str, str]:
    question, answer = QUESTIONS[attribute]
    return question.format(n=person["name"]), answer.format(n=person["name"], v=person[attribute])


def make_chat_data(out_dir: str | os.PathLike, facts: str | os.PathLike, sft_people: int = 600,
                   pref_people: int = 300, task_items: int = 100, seed: int = 1234) -> dict:
    """Write sft.jsonl, prefs.jsonl, question.txt and tasks/chat_facts.* under `out_dir`; returns their counts."""
    rng = random.Random(seed)
    people = _read_facts(Path(facts))
    rng.shuffle(people)
    sft_people = min(sft_people, len(people) * 2 // 3)
    sft, prefs = people[:sft_people], people[sft_people:sft_people + pref_people]
    attributes = list(QUESTIONS)
    sft_lines = []
    for k, person in enumerate(sft):
        first, second = rng.sample(attributes, 2)
        q1, a1 = _turn(person, first)
        if k % 4 == 0:  # prompt/completion strings, no template
            sft_lines.append({"prompt": f"Question: {q1}\nAnswer:", "completion": f" {a1}"})
            continue
        messages = [{"role": "system", "content": "You answer questions about people."}] if k % 3 == 0 else []
        messages += [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
        if k % 2 == 0:
            q2, a2 = _turn(person, second)
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        sft_lines.append({"messages": messages})
    pref_lines = []
    for person in prefs:
        question, answer = _turn(person, rng.choice(attributes))
        pref_lines.append({"prompt": [{"role": "user", "content": question}],
                           "chosen": [{"role": "assistant", "content": f"{answer} {RULE}"}],
                           "rejected": [{"role": "assistant", "content": answer}]})
    task_lines = []
    for person in sft[:task_items]:
        attribute = rng.choice(attributes)
        other = rng.choice([p for p in people[:50] if p[attribute] != person[attribute]])
        question, answer = _turn(person, attribute)
        wrong = QUESTIONS[attribute][1].format(n=person["name"], v=other[attribute])
        label = rng.randint(0, 1)
        choices = [answer, wrong] if label == 0 else [wrong, answer]
        task_lines.append({"question": f"Question: {question}\nAnswer:", "choices": [f" {c}" for c in choices],
                           "label": label})
    out = Path(out_dir)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    for name, lines in (("sft.jsonl", sft_lines), ("prefs.jsonl", pref_lines), ("tasks/chat_facts.jsonl", task_lines)):
        write_text(out / name, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    write_text(out / "question.txt", pref_lines[-1]["prompt"][0]["content"] + "\n")
    write_text(out / "tasks" / "chat_facts.yaml", TASK_YAML.format(data=out / "tasks" / "chat_facts.jsonl"))
    return {"sft": len(sft_lines), "prefs": len(pref_lines), "task": len(task_lines)}
