"""Chat / prompt-completion / preference preprocessing (megatron_neox/data/chat.py, chat_preprocess.py)."""
import numpy as np
import pytest

from megatron_neox.data.chat import ChatEncoder, dpo_example, sft_example
from megatron_neox.data.chat_preprocess import dpo_prefixes, sft_prefixes
from megatron_neox.data.indexed import IndexedDataset
from tests._chat import chat_tokenizer, hf_tokenizer, write_jsonl
from tests._train import load_tool

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And in words?"},
    {"role": "assistant", "content": "The answer is four."},
]


@pytest.fixture(scope="module", params=["builtin", "chatml"])
def tok(request, tmp_path_factory):
    return chat_tokenizer(tmp_path_factory.mktemp(request.param), chatml=request.param == "chatml")


def test_chat_ids_equal_hf_apply_chat_template_and_only_answers_are_trained(tok):
    enc = ChatEncoder(tok)
    ids, mask = sft_example(enc, {"messages": CONVERSATION})
    hf = hf_tokenizer(tok)
    assert ids.tolist() == list(hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))
    # The trained tokens decode to the two answers, each with the template's end of turn.
    trained = hf.decode(ids[mask == 1].tolist())
    eot = hf.eos_token
    assert trained == f"Four.{eot}\nThe answer is four.{eot}\n"
    # The prompt of the last turn (everything up to its generation prompt) is untrained.
    prompt = hf.apply_chat_template(CONVERSATION[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert mask[:len(prompt)].sum() == len(hf.encode("Four." + eot + "\n", add_special_tokens=False))


def test_prompt_completion_strings_train_the_completion_and_end_of_text(tok):
    enc = ChatEncoder(tok)
    ids, mask = sft_example(enc, {"prompt": "Name a colour:", "completion": " red"})
    hf = hf_tokenizer(tok)
    assert ids.tolist() == hf.encode("Name a colour: red", add_special_tokens=False) + [enc.eod_id]
    assert hf.decode(ids[mask == 1].tolist()) == " red<|endoftext|>"


def test_dpo_pair_shares_the_prompt_tokens(tok):
    enc = ChatEncoder(tok)
    prompt = [{"role": "user", "content": "Name a colour."}]
    (c, cm), (r, rm) = dpo_example(enc, {"prompt": prompt, "chosen": [{"role": "assistant", "content": "red"}],
                                         "rejected": [{"role": "assistant", "content": "blue"}]})
    start = int(np.argmax(cm))
    assert start == int(np.argmax(rm)) and c[:start].tolist() == r[:start].tolist()
    hf = hf_tokenizer(tok)
    assert c.tolist() == list(hf.apply_chat_template(prompt + [{"role": "assistant", "content": "red"}],
                                                     tokenize=True, return_dict=False))
    # Implicit prompt: full conversations that differ in their last message only.
    (c2, _), (r2, _) = dpo_example(enc, {"chosen": prompt + [{"role": "assistant", "content": "red"}],
                                         "rejected": prompt + [{"role": "assistant", "content": "blue"}]})
    assert c2.tolist() == c.tolist() and r2.tolist() == r.tolist()


def _preprocess(tmp_path, tok, lines, *extra):
    tool = load_tool("preprocess_data")
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    return tool.main(["--input", str(src), "--tokenizer", str(tok), "--output-prefix", str(tmp_path / "out"),
                      *extra])


def test_sft_preprocess_writes_tokens_and_mask_side_by_side(tmp_path, tok, capsys):
    rc = _preprocess(tmp_path, tok, [{"messages": CONVERSATION}, {"prompt": "Hi", "completion": " there"}],
                     "--format", "sft")
    assert rc == 0, capsys.readouterr().err
    tokens, mask = (IndexedDataset(p) for p in sft_prefixes(str(tmp_path / "out")))
    enc = ChatEncoder(tok)
    for i, record in enumerate([{"messages": CONVERSATION}, {"prompt": "Hi", "completion": " there"}]):
        ids, m = sft_example(enc, record)
        assert tokens[i].tolist() == ids.tolist() and mask[i].tolist() == m.tolist()
    assert mask[0].dtype == np.uint8


BAD = {
    "no_assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    "unknown_role": ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
                     "robot"),
    "malformed_message": ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
    "too_long": ({"prompt": "Hello there! " * 20, "completion": " hi"}, "more than --max-length 16"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sft_line_names_the_line_and_exits_2(tmp_path, tok, capsys, case):
    record, words = BAD[case]
    rc = _preprocess(tmp_path, tok, [{"prompt": "a", "completion": " b"}, record], "--format", "sft",
                     "--max-length", "16")
    err = capsys.readouterr().err
    assert rc == 2 and f"in.jsonl:2: " in err and words in err, err
    assert not list(tmp_path.glob("out_*")), "nothing half-written"


def test_skipped_lines_are_counted_and_truncation_keeps_the_answer(tmp_path, tok, capsys):
    long_answer = {"prompt": "Hi", "completion": " there" * 30}
    long_prompt = {"prompt": "Hello there! " * 20, "completion": " hi"}
    rc = _preprocess(tmp_path, tok, [long_answer, long_prompt, {"messages": [{"role": "user", "content": "x"}]}],
                     "--format", "sft", "--max-length", "16", "--truncate", "--skip-bad-lines")
    out = capsys.readouterr().out
    assert rc == 0
    assert "bad lines skipped: 2" in out and "truncated: 1" in out
    assert "in.jsonl:2: " in out and "no answer token would remain" in out
    tokens, mask = (IndexedDataset(p) for p in sft_prefixes(str(tmp_path / "out")))
    assert len(tokens) == 1 and len(tokens[0]) == 16 and mask[0].sum() > 0


def test_dpo_preprocess_and_mismatched_prompt(tmp_path, tok, capsys):
    user = [{"role": "user", "content": "Name a colour."}]
    good = {"chosen": user + [{"role": "assistant", "content": "red"}],
            "rejected": user + [{"role": "assistant", "content": "blue"}]}
    rc = _preprocess(tmp_path, tok, [good, {"prompt": "Hi", "chosen": " there", "rejected": " you"}], "--format", "dpo")
    assert rc == 0, capsys.readouterr().err
    c, cm, r, rm = (IndexedDataset(p) for p in dpo_prefixes(str(tmp_path / "out")))
    assert len(c) == len(r) == 2 and c[1].tolist()[:1] == r[1].tolist()[:1]
    bad = {"chosen": user + [{"role": "assistant", "content": "red"}],
           "rejected": [{"role": "user", "content": "Other."}, {"role": "assistant", "content": "blue"}]}
    rc = _preprocess(tmp_path, tok, [good, bad], "--format", "dpo")
    err = capsys.readouterr().err
    assert rc == 2 and "in.jsonl:2: the prompts of chosen and rejected differ" in err


def test_pretraining_flags_are_refused_with_a_fine_tuning_format(tmp_path, tok, capsys):
    rc = _preprocess(tmp_path, tok, [{"prompt": "a", "completion": " b"}], "--format", "sft", "--append-eod")
    assert rc == 2 and "--append-eod does not apply to --format sft" in capsys.readouterr().err
