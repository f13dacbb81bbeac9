"""Request bodies of the HTTP API (OpenAI's fields plus vLLM's extensions) and the error shape.

Unknown fields are accepted and ignored (as vLLM and OpenAI do). Types are checked by pydantic;
ranges are checked where the fields become `SamplingParams`, so each error names its field.
Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status as `code`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from elas_serve.errors import InvalidRequestError
from elas_serve.sampling_params import SamplingParams

MAX_PROMPTS = 1024  # prompts in one completion request
MAX_N = 128
MAX_STOP_STRINGS = 16  # NOTE: above OpenAI's 4: lm-eval sends every `until` string plus EOS

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


class Base(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(Base):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    skip_special_tokens: bool = True

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        if self.n > MAX_N:
            raise InvalidRequestError(f"n must be at most {MAX_N}, got {self.n}", "n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}", "stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options can only be set when stream is true", "stream_options")
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise InvalidRequestError("logit_bias keys must be token ids", "logit_bias") from None
        given = {k: v for k, v in {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty}.items() if v is not None}
        return SamplingParams(n=self.n, max_tokens=max_tokens, logit_bias=bias, seed=self.seed, stop=stop,
                              stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                              min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              skip_special_tokens=self.skip_special_tokens, **given)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    return_tokens_as_token_ids: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", "suffix")
        return prompts  # type: ignore[return-value]

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ChatMessage(Base):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs to be true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, None)


class TokenizeRequest(Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Base):
    model: str | None = None
    tokens: list[int]


class ModelCard(Base):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "elas-serve"
    root: str
    max_model_len: int
