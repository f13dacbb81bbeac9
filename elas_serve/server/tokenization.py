"""POST /tokenize and /detokenize (vLLM's), and GET /tokenizer_info (lm-eval's remote tokenizer).

Large inputs never hold the event loop: prompts over `INLINE_PROMPT_SIZE` are tokenized on a
worker thread (`encode_batch` releases the GIL), and those over `WORKER_PROMPT_CHARS` in the
tokenizer worker process, which also builds their JSON (see `tokenizer_worker.py` for why).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from elas_serve.frontend.processor import INLINE_PROMPT_SIZE
from elas_serve.sampling_params import InvalidRequestError

from .chat import render_chat
from .protocol import Base, Bool, ChatMessage, Str, TokenId
from .serving import OpenAIServing
from .tokenizer_worker import TokenizerWorker

JSON_SLICE = 16384  # list items serialized per call when building large bodies
WORKER_PROMPT_CHARS = 1 << 20  # prompts larger than this go to the tokenizer worker process


class TokenizeRequest(Base):
    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True
    add_generation_prompt: Bool = True
    return_token_strs: Bool = False


class DetokenizeRequest(Base):
    model: Str | None = None
    tokens: list[TokenId]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class OpenAIServingTokenization(OpenAIServing):
    worker: TokenizerWorker | None = None  # started with the app (it needs the event loop)

    async def tokenize(self, body: TokenizeRequest) -> Response:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
        size = len(body.prompt) if body.prompt is not None else sum(len(m.text()) for m in body.messages)
        if size <= INLINE_PROMPT_SIZE:
            return self._tokenize(body)
        if body.prompt is None or size <= WORKER_PROMPT_CHARS or self.worker is None:
            return await asyncio.to_thread(self._tokenize, body)
        return Response(await self.worker.tokenize(body.prompt, body.add_special_tokens, body.return_token_strs,
                                                   self.max_model_len), media_type="application/json")

    def _tokenize(self, body: TokenizeRequest) -> Response:
        """The work, which grows with the input. NOTE: the JSON is built in slices: one
        `json.dumps` of a million-token list would hold the GIL, and so the event loop, for
        half a second."""
        tok = self.tokenizer
        if body.messages is not None:
            ids = tok.encode(render_chat(tok, body.messages, body.add_generation_prompt, self.chat_template))
        else:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        parts = [f'{{"count": {len(ids)}, "max_model_len": {self.max_model_len}, "tokens": [']
        parts += [(", " if i else "") + ", ".join(map(str, ids[i:i + JSON_SLICE]))
                  for i in range(0, len(ids), JSON_SLICE)]
        if body.return_token_strs:
            strs = [tok.id_to_token(i) for i in ids]
            parts.append('], "token_strs": [')
            parts += [(", " if i else "") + json.dumps(strs[i:i + JSON_SLICE], ensure_ascii=False)[1:-1]
                      for i in range(0, len(strs), JSON_SLICE)]
        parts.append("]}")
        return Response("".join(parts).encode("utf-8"), media_type="application/json")

    async def detokenize(self, body: DetokenizeRequest) -> JSONResponse:
        self.check_model(body.model)
        vocab = self.client.model_info.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        if len(body.tokens) <= INLINE_PROMPT_SIZE:
            return JSONResponse({"prompt": self.tokenizer.decode(body.tokens)})
        return JSONResponse({"prompt": await asyncio.to_thread(self.tokenizer.decode, body.tokens)})

    def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                "eos_token_ids": tok.eos_token_ids, "model_max_length": self.max_model_len,
                "vocab_size": tok.vocab_size, "chat_template": self.chat_template or tok.chat_template}

    async def start(self) -> None:
        if Path(self.tokenizer.name).is_file():
            self.worker = TokenizerWorker(self.tokenizer.name)

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.aclose()


router = APIRouter()


def _serving(request: HTTPRequest) -> OpenAIServingTokenization:
    return request.app.state.serving_tokenization


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: HTTPRequest):
    return await _serving(request).tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: HTTPRequest):
    return await _serving(request).detokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(request: HTTPRequest):
    return _serving(request).tokenizer_info()
