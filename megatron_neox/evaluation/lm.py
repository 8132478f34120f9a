"""An lm-evaluation-harness `LM` over our own model and tokenizer.

lm-eval's `TemplateLM` turns text requests into token ids (context/continuation split, empty
contexts conditioned on the end-of-text token); this class scores and generates those ids with a
backend from `backends.py`. The request handling follows lm-eval's own `hf` backend
(lm_eval/models/huggingface.py, 0.4.13), so the same checkpoint gives the same numbers through
either: inputs are left-truncated to `max_length + 1` tokens, rolling log-likelihoods use lm-eval's
disjoint windows with the end-of-text token as the first context, and a generation stops at any of
the task's `until` strings or at the end-of-document token, cut at the first stop string.

Scoring is batched: requests are sorted by length (longest first, lm-eval's `Collator`) so a
batch holds similar lengths, and right-padded (padding after a sequence cannot change its logits
under the causal mask). Generation batches requests whose contexts have the same length in
tokens (no padding, so no attention mask and no shifted positions are needed).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from megatron_neox.errors import ConfigError

_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "until", "max_gen_toks"}


class NeoXLM(TemplateLM):
    """`backend`: a `MergedModel` or `EngineModel`; `tokenizer`: our `Tokenizer` (the model's own)."""

    backend = "causal"  # TemplateLM's word for a decoder-only model, not our scoring backend

    def __init__(self, model_backend, tokenizer, *, max_length: int, batch_size: int = 8, max_gen_toks: int = 256,
                 seed: int = 1234, show_progress: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: expected >= 1")
        self.model_backend = model_backend
        self.tokenizer = tokenizer
        self._max_length = max_length
        self._batch_size = batch_size
        self._max_gen_toks = max_gen_toks
        self._seed = seed
        self._show_progress = show_progress

    # ---- what TemplateLM asks for -------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: the tokenizer's BOS (Llama's `<s>`), else its
        end-of-text token, as lm-eval's HF backend chooses from the exported tokenizer_config.json."""
        bos = self.tokenizer.bos_ids
        return bos[0] if bos else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        """Ids as HF's tokenizer gives them to lm-eval's HF backend: the BOS the tokenizer's own
        template puts first (Llama families; none for GPT-2/GPT-NeoX), unless `add_special_tokens`
        is False. A text that already starts with the BOS's text gets it once, as the token (our
        encoder reads special-token text as plain text; HF's reads it as the token)."""
        bos = self.tokenizer.bos_ids
        if not bos or add_special_tokens is False:
            return self.tokenizer.encode(string)
        text = "".join(map(self.tokenizer.id_to_token, bos))
        return bos + self.tokenizer.encode(string[len(text):] if string.startswith(text) else string)

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """As lm-eval's HF backend decodes an answer: special tokens (a BOS the model wrote) left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- log-likelihoods ----------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, truncate: bool = True,
                              **kwargs) -> List[Tuple[float, bool]]:
        """[(cache key, context ids, continuation ids)] -> [(sum log p(continuation), greedy?)].
        `truncate=False` scores whole sequences, even past max_length (rotary/ALiBi extrapolate)."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results: List[Tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self._show_progress, desc="scoring")
        for chunk in collator.get_batched(n=self._batch_size):
            rows, spans = [], []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise ConfigError("lm-eval sent an empty context or continuation; expected both non-empty")
                if truncate and len(cont) > self._max_length:
                    raise ConfigError(f"a continuation of {len(cont)} tokens exceeds the model's context "
                                      f"({self._max_length})")
                # The last max_length + 1 tokens: inputs are all but the last, targets all but the first.
                seq = (ctx + cont)[-(self._max_length + 1):] if truncate else ctx + cont
                rows.append(seq)
                spans.append((len(seq) - 1 - len(cont), len(seq) - 1))
            width = max(len(s) - 1 for s in rows)
            tokens = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
            targets = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
            for i, seq in enumerate(rows):
                tokens[i, :len(seq) - 1] = torch.tensor(seq[:-1])
                targets[i, :len(seq) - 1] = torch.tensor(seq[1:])
            logprob, best = self.model_backend.score(tokens, targets)
            for i, ((key, _, cont), (a, b)) in enumerate(zip(chunk, spans)):
                answer = (float(logprob[i, a:b].double().sum()), bool(torch.equal(best[i, a:b], targets[i, a:b])))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def score_pairs(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
                    ) -> List[Tuple[float, bool]]:
        """(sum log p(continuation | context), is it the greedy continuation?) for token-id pairs,
        each scored whole (no left truncation: the context is the question)."""
        return self._loglikelihood_tokens([(None, list(c), list(t)) for c, t in zip(contexts, continuations)],
                                          disable_tqdm=True, truncate=False)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Each document's total log-likelihood, in lm-eval's disjoint windows of max_length tokens."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        args = [req.args for req in requests]
        results: List[Optional[str]] = [None] * len(args)
        eos_text = self.tokenizer.decode([self.eot_token_id])
        groups: Dict[Tuple[str, int], List[int]] = {}
        encoded = []
        for index, (context, gen_kwargs) in enumerate(args):
            if not isinstance(gen_kwargs, dict):
                raise ConfigError(f"generation arguments must be a dict, found {type(gen_kwargs).__name__}")
            kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
            unknown = set(kwargs) - _SAMPLING_KEYS
            if unknown:
                raise ConfigError(f"generation arguments {sorted(unknown)} are not supported "
                                  f"(supported: {sorted(_SAMPLING_KEYS)})")
            max_ctx = self._max_length - kwargs["max_gen_toks"]
            if max_ctx < 1:
                raise ConfigError(f"max_gen_toks={kwargs['max_gen_toks']} leaves no room for a context in the "
                                  f"model's {self._max_length} tokens")
            ids = self.tok_encode(context)[-max_ctx:]
            if not ids:
                ids = [self.prefix_token_id]
            encoded.append((ids, kwargs))
            # Same settings and the same context length: one batch without padding.
            key = (repr(sorted((k, repr(v)) for k, v in kwargs.items())), len(ids))
            groups.setdefault(key, []).append(index)
        bar = tqdm(total=len(args), disable=disable_tqdm or not self._show_progress, desc="generating")
        for _, members in sorted(groups.items(), key=lambda kv: -kv[0][1]):
            kwargs = encoded[members[0]][1]
            until = handle_stop_sequences(list(kwargs["until"]), eos=eos_text)
            for start in range(0, len(members), self._batch_size):
                batch = members[start:start + self._batch_size]
                contexts = torch.tensor([encoded[i][0] for i in batch], dtype=torch.long)

                def stop(row: int, new_ids: List[int]) -> bool:
                    if new_ids[-1] == self.eot_token_id:
                        return True
                    text = self.tokenizer.decode(new_ids)
                    return any(s and s in text for s in until)

                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                outs = self.model_backend.generate(
                    contexts, kwargs["max_gen_toks"], stop, temperature=temperature,
                    top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0), seed=self._seed)
                for i, new_ids in zip(batch, outs):
                    if self.eot_token_id in new_ids:
                        new_ids = new_ids[:new_ids.index(self.eot_token_id)]
                    text = postprocess_generated_text(self.tok_decode(new_ids), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                    bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]
