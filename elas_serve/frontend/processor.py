"""InputProcessor: prompts and sampling params -> validated `EngineCoreRequest`s.

Owns every check that needs the model (vLLM's processor): token ids inside the vocabulary
(prompts, `stop_token_ids`, `logit_bias`), non-empty prompts, the context length, and `max_tokens`
clamped to what the context leaves (as vLLM does). Text prompts are tokenized here, in batches
(`Tokenizer.encode_batch` releases the GIL); a text that cannot fit the context whatever its
tokenization is refused before it is tokenized. `prepare` takes time proportional to the prompts:
`prepare_async` runs small inputs inline and large ones on a worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from elas_serve.engine.messages import EngineCoreRequest, ModelInfo
from elas_serve.sampling_params import InvalidRequestError, SamplingParams
from elas_serve.tokenizer import Tokenizer

INLINE_PROMPT_SIZE = 4096  # characters or token ids: prompts up to this size are prepared inline


@dataclass(slots=True)
class PreparedPrompt:
    prompt: str | list[int]
    prompt_token_ids: list[int]
    max_tokens: int  # params.max_tokens clamped to what the context leaves


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, model_info: ModelInfo):
        if tokenizer.vocab_size > model_info.vocab_size:
            raise ValueError(f"{tokenizer.name}: tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model's vocab_size is {model_info.vocab_size}")
        self.tokenizer, self.model_info = tokenizer, model_info
        self.max_model_len, self.vocab_size = model_info.max_model_len, model_info.vocab_size

    async def prepare_async(self, prompts: list[str | list[int]], params: SamplingParams) -> list[PreparedPrompt]:
        if sum(len(p) for p in prompts) <= INLINE_PROMPT_SIZE:
            return self.prepare(prompts, params)
        return await asyncio.to_thread(self.prepare, prompts, params)

    def prepare(self, prompts: list[str | list[int]], params: SamplingParams) -> list[PreparedPrompt]:
        """Every prompt checked (errors name the prompt when there are several) before any is used."""
        self._check_params(params)
        ids = self._tokenize(prompts, params.truncate_prompt_tokens)
        out = []
        for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids)):
            try:
                out.append(self._check_prompt(prompt, prompt_ids, params))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e), e.param) from None
        return out

    def _check_params(self, params: SamplingParams) -> None:
        if params.max_token_id >= self.vocab_size:
            param = "logit_bias" if params.max_token_id in (params.logit_bias or ()) else "stop_token_ids"
            raise InvalidRequestError(f"{param} names token id {params.max_token_id}, outside the vocabulary "
                                      f"[0, {self.vocab_size})", param)

    def _tokenize(self, prompts: list[str | list[int]], truncate: int | None = None) -> list[list[int] | None]:
        """Token ids of the text prompts (None for token-id prompts). Unless they are to be
        truncated, texts too long for the context whatever their tokenization are refused first."""
        tok, limit = self.tokenizer, self.max_model_len
        texts = {i: p for i, p in enumerate(prompts) if isinstance(p, str) and p}
        for i, text in (texts.items() if truncate is None else ()):
            # NOTE: a token stands for at most max_token_bytes bytes; the 2x margin covers
            # normalizers that shrink the text (accent stripping) before it is split
            at_least = len(text) // (2 * tok.max_token_bytes)
            if at_least > limit:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise InvalidRequestError(
                    f"{where}This model's maximum context length is {limit} tokens. However, your prompt "
                    f"contains at least {at_least} input tokens, which leaves no room for the completion.", "prompt")
        ids = dict(zip(texts, tok.encode_batch(list(texts.values())))) if texts else {}
        return [ids.get(i) for i in range(len(prompts))]

    def _check_prompt(self, prompt: str | list[int], ids: list[int] | None, params: SamplingParams) -> PreparedPrompt:
        if ids is None:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})",
                                          "prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if (keep := params.truncate_prompt_tokens) is not None:
            ids = ids[-(self.max_model_len if keep == -1 else keep):]  # NOTE: vLLM truncates on the left
        room = self.max_model_len - len(ids)
        if room < 0 or (room == 0 and params.max_tokens != 0):
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt contains {len(ids)} input tokens, which leaves no room for the completion.", "prompt")
        return PreparedPrompt(prompt, ids, room if params.max_tokens is None else min(params.max_tokens, room))

    def make_requests(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str,
                      arrival_time: float) -> list[EngineCoreRequest]:
        """The engine requests of one prompt: one per sample (`n`, or `best_of`), ids
        `{request_id}-{i}`, sample i seeded with `seed + i`."""
        eos = [] if params.ignore_eos else self.tokenizer.eos_token_ids
        return [EngineCoreRequest(f"{request_id}-{i}", prompt.prompt_token_ids, params.child(i), prompt.max_tokens,
                                  eos, arrival_time) for i in range(params.num_samples)]
