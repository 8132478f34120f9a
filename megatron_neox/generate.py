"""Text generation from a checkpoint: the merged model on one process (pp = 1, tp = 1), on any device.

Decoding feeds the prompt once and then one token per step through the KV cache. The padded
vocabulary rows (ids >= the tokenizer's size) are masked before choosing, so they can never be
produced; temperature 0 is greedy (argmax), as Hugging Face `generate(do_sample=False)`, which
gives the same tokens on the exported model (tools/convert_to_hf.py writes the padded ids into
its generation_config as `suppress_tokens`).
"""
from typing import List, NamedTuple, Optional, Sequence

import torch

from megatron_neox.config import Config, ModelConfig
from megatron_neox.convert.checkpoint_io import load_full_state_dict
from megatron_neox.errors import ConfigError
from megatron_neox.model.gpt_neox import GPTNeoX


class LoadedModel(NamedTuple):
    model: GPTNeoX
    model_config: ModelConfig
    run: Optional[Config]  # the run config when the checkpoint has one
    padded_vocab: int


def load_model(checkpoint, *, device="cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The whole model of any checkpoint layout on `device` in `dtype`, in eval mode (dropout off).

    The model is built directly on the device in the target dtype (a 20B model in bf16 needs 41 GB
    there, never 82 GB of fp32 anywhere); the checkpoint's tensors are copied in one at a time.
    """
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device name: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but torch sees no CUDA device; use --device cpu")
    if dtype == torch.bfloat16 and device.type == "cuda":
        from megatron_neox.hardware import bf16_native

        if not bf16_native():
            raise ConfigError(f"{torch.cuda.get_device_name(device)} has no native bf16; use --dtype fp16 or fp32")
    ck = load_full_state_dict(checkpoint)
    rng_devices = [device] if device.type == "cuda" else []
    # The constructor seeds and draws from the global RNG for its init: leave the caller's alone.
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), _default_dtype(dtype):
        model = GPTNeoX(ck.model, ck.padded_vocab)
    model.load_state_dict(ck.state_dict, strict=True)  # copy_ casts each tensor to the parameter's dtype/device
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), ck.model, ck.run, ck.padded_vocab)


class _default_dtype:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def tokenizer_path(run: Optional[Config]) -> Optional[str]:
    """The run config's tokenizer.path, if the checkpoint has a run config."""
    return run.tokenizer.path if run is not None else None


def check_tokenizer_fits(tokenizer, padded_vocab: int) -> None:
    """A tokenizer with more ids than the model has rows is the wrong one for this model."""
    if tokenizer.vocab_size > padded_vocab:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
                          f"{padded_vocab} vocab rows: wrong tokenizer?")


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Ids >= vocab_size are vocab padding (no token): make them impossible to choose."""
    if vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    return logits


def choose_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next ids [B] from logits [B, V] (already masked): argmax at temperature 0, else a sample from
    softmax(logits / T) restricted to the top-k ids and to the smallest set holding top_p of the mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop an id when the ids ranked above it already hold top_p of the mass (the first id
        # always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _context_limit(cfg: ModelConfig) -> Optional[int]:
    # Learned absolute positions stop at seq_length; rotary and ALiBi extend past it (as HF's do).
    return cfg.seq_length if cfg.position_embedding == "learned" else None


@torch.no_grad()
def generate_ids(model: GPTNeoX, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, vocab_size: Optional[int] = None,
                 eod_id: Optional[int] = None) -> List[int]:
    """New token ids after `prompt_ids` (ending with `eod_id` if it was produced).

    `vocab_size` (default model.vocab_size) is the number of real token ids; the rest of the padded
    vocab is masked.
    """
    cfg = model.cfg
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    vocab_size = vocab_size or cfg.vocab_size
    limit = _context_limit(cfg)
    if limit is not None:
        if len(prompt_ids) >= limit:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {limit} "
                              "(learned position embeddings): shorten the prompt")
        max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    device = model_device(model)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)  # torch.multinomial draws on the probabilities' device
        # No seed: a fresh one from the OS, leaving the global RNG alone.
        generator.manual_seed(int(seed)) if seed is not None else generator.seed()
    model.eval()
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = None
    out: List[int] = []
    for _ in range(max_new_tokens):
        # First step: the whole prompt; then only the newest token, its past in the cache.
        logits, cache = model(tokens, kv_cache=cache, use_cache=True)
        nxt = choose_next(mask_padded_vocab(logits[:, -1].float(), vocab_size), temperature=temperature,
                          top_k=top_k, top_p=top_p, generator=generator)
        out.append(int(nxt))
        if eod_id is not None and out[-1] == eod_id:
            break
        tokens = nxt.view(1, 1)
    return out


def generate_text(loaded: LoadedModel, tokenizer, prompt: str, **kwargs) -> str:
    """The prompt's continuation as text (stopping at, and leaving out, the end-of-document token).
    The prompt starts as a training document does: with the tokenizer's BOS where its template has one
    (Llama families; HF's `tokenizer(prompt)` puts it there too)."""
    eod = tokenizer.eod_id
    ids = generate_ids(loaded.model, tokenizer.bos_ids + tokenizer.encode(prompt), vocab_size=tokenizer.vocab_size,
                       eod_id=eod, **kwargs)
    if ids and ids[-1] == eod:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def generate_chat(loaded: LoadedModel, tokenizer_file: str, messages: list, **kwargs) -> str:
    """The assistant's answer to `messages`, rendered with the tokenizer's chat template (data/chat.py);
    generation stops at the template's end-of-turn token (left out of the answer)."""
    from megatron_neox.data.chat import ChatEncoder

    enc = ChatEncoder(tokenizer_file)
    check_tokenizer_fits(enc, loaded.padded_vocab)
    ids = generate_ids(loaded.model, enc.prompt_ids(messages), vocab_size=enc.vocab_size, eod_id=enc.end_of_turn_id,
                       **kwargs)
    if ids and ids[-1] == enc.end_of_turn_id:
        ids = ids[:-1]
    return enc.hf.decode(ids, skip_special_tokens=False)


@torch.no_grad()
def greedy_continues_with(model: GPTNeoX, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                          vocab_size: Optional[int] = None, batch_size: int = 32) -> List[bool]:
    """For each (prompt, target): would greedy generation after the prompt start with the target ids?

    Greedy decoding produces target[i] exactly when it is the argmax given prompt + target[:i], so
    one teacher-forced forward pass over prompt + target answers it for every position at once
    (instead of len(target) decoding steps). Sequences are right-padded into batches: under the
    causal mask, padding after a sequence cannot change its logits.
    """
    vocab_size = vocab_size or model.cfg.vocab_size
    model.eval()
    results: List[bool] = []
    pairs = list(zip(prompts, targets))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [list(p) + list(t) for p, t in chunk]
        width = max(len(s) for s in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s)
        tokens = tokens.to(model_device(model))
        pred = mask_padded_vocab(model(tokens).float(), vocab_size).argmax(dim=-1).cpu()
        for i, (p, t) in enumerate(chunk):
            # The logits at position j predict token j + 1: the target's tokens are predicted from
            # positions len(p) - 1 .. len(p) + len(t) - 2.
            got = pred[i, len(p) - 1:len(p) - 1 + len(t)].tolist()
            results.append(len(t) > 0 and got == list(t))
    return results
