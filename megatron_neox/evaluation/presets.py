"""The task suites of the papers' tables, as lm-evaluation-harness 0.4.13 names them.

Only tasks whose data lm-eval downloads from the Hugging Face hub by itself are listed; each
omission says why. `tests/test_evaluation.py` checks every name against the installed lm-eval.
"""
from typing import Dict, List, Sequence

_ARITHMETIC = ["arithmetic_1dc", "arithmetic_2da", "arithmetic_2dm", "arithmetic_2ds", "arithmetic_3da",
               "arithmetic_3ds", "arithmetic_4da", "arithmetic_4ds", "arithmetic_5da", "arithmetic_5ds"]

PRESETS: Dict[str, List[str]] = {
    # GPT-NeoX-20B (Black et al. 2022), Tables 2-4 and Appendix: natural language tasks,
    # mathematics (arithmetic and the MATH subjects) and MMLU (the paper shows 0- and 5-shot).
    "neox20b": [
        "anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "headqa_en", "hellaswag", "lambada_openai",
        "logiqa", "openbookqa", "piqa", "prost", "qa4mre_2013", "sciq", "triviaqa", "winogrande", "wsc",
        *_ARITHMETIC,
        "hendrycks_math_algebra", "hendrycks_math_counting_and_prob", "hendrycks_math_geometry",
        "hendrycks_math_intermediate_algebra", "hendrycks_math_num_theory", "hendrycks_math_prealgebra",
        "hendrycks_math_precalc",
        "mmlu",
    ],
    # GPT-3 (Brown et al. 2020), Sections 3.1-3.9. Left out: StoryCloze (lm-eval needs a manually
    # downloaded data_dir), QuAC, SAT analogies and the PTB language-modelling set (no lm-eval
    # 0.4.13 task), RACE-m (lm-eval's `race` is RACE-h only).
    "gpt3": [
        "lambada_openai", "hellaswag", "triviaqa", "nq_open", "webqs", "wsc273", "winogrande", "piqa", "arc_easy",
        "arc_challenge", "openbookqa", "race", "squadv2", "coqa", "drop",
        "boolq", "cb", "copa", "multirc", "record", "sglue_rte", "wic", "wsc",
        "anli_r1", "anli_r2", "anli_r3",
        *_ARITHMETIC,
        "anagrams1", "anagrams2", "cycle_letters", "random_insertion", "reversed_words",
        "wmt14-en-fr", "wmt14-fr-en", "wmt16-de-en", "wmt16-en-de", "wmt16-en-ro", "wmt16-ro-en",
    ],
}


def expand_tasks(names: Sequence[str]) -> List[str]:
    """Task names with presets replaced by their tasks (order kept, duplicates dropped)."""
    out: List[str] = []
    for name in names:
        for task in PRESETS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out
