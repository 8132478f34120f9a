"""SFT and DPO objectives (training/objectives.py) on the fine-tuning batches (data/finetune.py):
equal to Hugging Face's loss with prompt labels -100, and to TRL's DPO loss and statistics."""
import types

import numpy as np
import pytest
import torch

from megatron_neox.config import ModelConfig
from megatron_neox.convert.hf import save_hf
from megatron_neox.data.chat_preprocess import preprocess_chat
from megatron_neox.data.finetune import FinetuneLoader, build_finetune_datasets
from megatron_neox.model.gpt_neox import GPTNeoX
from megatron_neox.training.objectives import DPO_STATS, DPOObjective, SFTObjective, dpo_loss
from tests._chat import chat_tokenizer, write_jsonl

transformers = pytest.importorskip("transformers")

SEQ = 128
SFT_LINES = [
    {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Colour?"},
                  {"role": "assistant", "content": "Red, green or blue."}]},
    {"prompt": "Name a colour:", "completion": " red"},
    {"prompt": "def add(a, b):", "completion": "\n    return a + b"},
    {"messages": [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Well, today."}]},
    {"prompt": "Two plus two is", "completion": " four"},
]
COLOURS = ["red", "green", "blue"]
DPO_LINES = [{"prompt": [{"role": "user", "content": f"Name colour {i}."}],
              "chosen": [{"role": "assistant", "content": COLOURS[i % 3]}],
              "rejected": [{"role": "assistant", "content": f"{COLOURS[(i + 1) % 3]} today"}]} for i in range(6)]


def _model(vocab: int, seed: int, noise: float = 0.1) -> tuple:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=SEQ, vocab_size=vocab,
                      rotary_pct=0.25, parallel_residual=True)
    padded = cfg.padded_vocab(1)
    model = GPTNeoX(cfg, padded, seed=seed).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model, cfg, padded


def _export(model, cfg, padded, out):
    return transformers.GPTNeoXForCausalLM.from_pretrained(save_hf(out, model.state_dict(), cfg, padded)).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return chat_tokenizer(tmp_path_factory.mktemp("tok"))


def _datasets(tmp_path, tok, kind, lines, num_samples=64):
    preprocess_chat([str(write_jsonl(tmp_path / f"{kind}.jsonl", lines))], str(tok), str(tmp_path / kind), kind,
                    max_length=SEQ + 1)
    data = types.SimpleNamespace(prefixes=[str(tmp_path / kind)], split="1,0,0")
    return build_finetune_datasets(data, kind, seq_length=SEQ, seed=3, num_samples=(num_samples, 0, 0))[0]


def _step_loss(model, objective, micro_batches):
    """The loss a train step reports: the mean of the micro-batch losses (one data-parallel rank)."""
    losses = [objective.loss(model(mb["tokens"], mb["position_ids"], doc_ids=mb.get("doc_ids")),
                             objective.labels(mb)) for mb in micro_batches]
    return torch.stack(losses).mean()


def test_sft_step_loss_equals_hf_loss_with_prompt_labels_ignored(tmp_path, tok):
    ds = _datasets(tmp_path, tok, "sft", SFT_LINES)
    assert len(ds[0][2]) == SEQ + 1 and ds[0][2].max() >= 1, "several examples share a packed sample"
    loader = FinetuneLoader(ds, "sft", micro_batch_size=1, dp_rank=0, dp_size=1)
    batch = loader.next_global_batch(2)
    model, cfg, padded = _model(300, seed=1)
    hf = _export(model, cfg, padded, tmp_path / "hf")
    with torch.no_grad():
        ours = _step_loss(model, SFTObjective(), batch)
        # HF: every example of the global batch alone in a right-padded batch, untrained labels -100.
        rows, labels = [], []
        for j in range(2):
            tokens, mask, example = ds[j]
            for k in range(int(example.max())):  # the last index is the padding
                keep = example == k
                rows.append(torch.from_numpy(tokens[keep]))
                labels.append(torch.from_numpy(np.where(mask[keep] == 1, tokens[keep], -100)))
        L = max(len(r) for r in rows)
        ids = torch.stack([torch.nn.functional.pad(r, (0, L - len(r))) for r in rows])
        lab = torch.stack([torch.nn.functional.pad(r, (0, L - len(r)), value=-100) for r in labels])
        att = torch.stack([torch.arange(L) < len(r) for r in rows]).long()
        expected = hf(input_ids=ids, attention_mask=att, labels=lab).loss
    assert len(rows) >= 3
    assert abs(float(ours) - float(expected)) < 1e-5, (float(ours), float(expected))


def test_sft_loss_is_per_token_over_the_global_batch_whatever_the_split(tmp_path, tok):
    ds = _datasets(tmp_path, tok, "sft", SFT_LINES)
    model, _, _ = _model(300, seed=2)
    with torch.no_grad():
        whole = _step_loss(model, SFTObjective(), FinetuneLoader(ds, "sft", micro_batch_size=4, dp_rank=0,
                                                                dp_size=1).next_global_batch(4))
        per_rank = [_step_loss(model, SFTObjective(), FinetuneLoader(ds, "sft", micro_batch_size=1, dp_rank=r,
                                                                     dp_size=2).next_global_batch(4))
                    for r in range(2)]
    torch.testing.assert_close(sum(per_rank) / 2, whole, rtol=0, atol=1e-6)


def test_dpo_loss_rewards_and_logps_equal_trl(tmp_path, tok):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = _datasets(tmp_path, tok, "dpo", DPO_LINES)
    policy, cfg, padded = _model(300, seed=4)
    reference, _, _ = _model(300, seed=4)
    with torch.no_grad():  # the reference differs from the policy, so the rewards are not zero
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loader = FinetuneLoader(ds, "dpo", micro_batch_size=len(DPO_LINES), dp_rank=0, dp_size=1)
    (mb,) = loader.next_global_batch(len(DPO_LINES))
    objective = DPOObjective(beta=0.1)
    with torch.no_grad():
        objective.recorded = []
        objective.loss(reference(mb["tokens"], mb["position_ids"]), objective.labels(mb))
        mb["ref_logps"] = objective.recorded[0]
        objective.recorded = None
        objective.pop_stats()
        ours = objective.loss(policy(mb["tokens"], mb["position_ids"]), objective.labels(mb))
        stats = objective.pop_stats()

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token="<|endoftext|>",
                                                  pad_token="<|padding|>")
    from megatron_neox.data.chat import BUILTIN_TEMPLATE

    hf_tok.chat_template = BUILTIN_TEMPLATE
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to="none", use_cpu=True,
                     per_device_train_batch_size=len(DPO_LINES), max_length=None, bf16=False, fp16=False)
    trainer = DPOTrainer(model=_export(policy, cfg, padded, tmp_path / "pol"),
                         ref_model=_export(reference, cfg, padded, tmp_path / "ref"), args=args,
                         train_dataset=Dataset.from_list(DPO_LINES), processing_class=hf_tok)
    order = mb["pair_ids"].tolist()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in order])
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, batch)
    got = trainer._metrics["eval"]  # the models are in eval mode (no dropout): TRL files the figures there
    assert abs(float(ours) - float(expected)) < 1e-5
    names = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
             "rewards_accuracy": "rewards/accuracies", "rewards_margin": "rewards/margins",
             "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}
    assert set(names) == set(DPO_STATS)
    for ours_key, trl_key in names.items():
        assert abs(stats[ours_key] - got[trl_key][-1]) < 1e-5, (ours_key, stats[ours_key], got[trl_key][-1])
    assert abs(stats["rewards_margin"]) > 1e-3, "the test needs non-zero rewards"


def test_dpo_loss_is_rafailov_eq7():
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    loss, stats = dpo_loss(c, r, rc, rr, beta=0.5)
    z = 0.5 * ((c - rc) - (r - rr))
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-z)).mean())
    assert stats["rewards_accuracy"].tolist() == [1.0, 0.0]


def test_generate_chat_renders_the_template_and_stops_at_end_of_turn(tok):
    from megatron_neox.data.chat import ChatEncoder
    from megatron_neox.generate import LoadedModel, generate_chat

    model, cfg, padded = _model(300, seed=5)
    enc = ChatEncoder(tok)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token="<|endoftext|>")
    from megatron_neox.data.chat import BUILTIN_TEMPLATE

    hf_tok.chat_template = BUILTIN_TEMPLATE
    messages = [{"role": "user", "content": "Name a colour."}]
    assert enc.prompt_ids(messages) == list(hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                                      add_generation_prompt=True))
    # A head whose every hidden state scores the end-of-turn token highest: the answer ends at once.
    with torch.no_grad():
        norm = model._modules[str(cfg.num_layers + 1)].norm
        norm.weight.zero_()
        norm.bias.fill_(1.0)
        head = model._modules[str(cfg.num_layers + 2)].final_linear.weight
        head.zero_()
        head[enc.end_of_turn_id] = 1.0
    calls = []
    original = model.forward
    model.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    answer = generate_chat(LoadedModel(model, cfg, None, padded), str(tok), messages, max_new_tokens=10)
    assert answer == "" and len(calls) == 1


@pytest.mark.parametrize("data,words", [({"prefixes": ["a", "b"]}, "train.objective='sft' reads one dataset"),
                                        ({"prefixes": ["a"], "reset_attention_mask": True},
                                         "data.reset_attention_mask does not apply to train.objective='sft'")])
def test_finetune_objective_config_conflicts_are_refused_at_config_time(data, words):
    from megatron_neox.config import config_from_dict
    from megatron_neox.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                                    "vocab_size": 96},
                          "train": {"iters": 1, "objective": "sft"}, "data": data, "tokenizer": {"path": "t.json"}})
