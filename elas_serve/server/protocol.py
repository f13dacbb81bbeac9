"""What every endpoint's bodies share (OpenAI's fields plus vLLM's extensions), and the error shape;
each endpoint module defines its own request and response models from these.

Types are strict: JSON booleans are not integers, numbers are not strings, floats are finite, and
every string must be valid Unicode (a lone surrogate such as "\\ud800" is refused). Numeric ranges
come from `sampling_params.RANGES`: they appear in the OpenAPI schema and are checked where the
fields become `SamplingParams`, so each error names its field. Checks that need the model (token
ids inside the vocabulary, prompt length) are the engine's. Unknown fields are accepted and ignored
(as vLLM and OpenAI do). Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP
status as `code`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

from elas_serve.sampling_params import MAX_STOP_CHARS, RANGES, InvalidRequestError, SamplingParams

MAX_N = 128
MAX_STOP_STRINGS = 16  # NOTE: above OpenAI's 4: lm-eval sends every `until` string plus EOS

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the string is not valid Unicode (it holds a lone surrogate)") from None
    return s


Str = Annotated[str, Strict(), AfterValidator(_valid_unicode)]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # NOTE: strict floats take JSON integers, not booleans
Bool = Annotated[bool, Strict()]
# NOTE: the vocabulary bound (and so the sign) is checked by the engine, with a message saying so
TokenId = Annotated[int, Strict(), Field(json_schema_extra={"minimum": 0})]
StopString = Annotated[str, Strict(), AfterValidator(_valid_unicode),
                       Field(json_schema_extra={"minLength": 1, "maxLength": MAX_STOP_CHARS})]


def ranged(name: str, kind: Any, **extra: Any) -> Any:
    """`kind` with `RANGES[name]` in its schema (checked by `SamplingParams`, with its message)."""
    return Annotated[kind, Field(json_schema_extra={**RANGES[name].schema(), **extra})]


class Base(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(Base):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False


class SamplingFields(Base):
    """Fields shared by completions and chat completions."""

    model: Str | None = None
    n: ranged("n", Int, maximum=MAX_N) = 1
    temperature: ranged("temperature", Float) | None = None
    top_p: ranged("top_p", Float) | None = None
    top_k: ranged("top_k", Int) | None = None
    min_p: ranged("min_p", Float) | None = None
    presence_penalty: ranged("presence_penalty", Float) | None = None
    frequency_penalty: ranged("frequency_penalty", Float) | None = None
    repetition_penalty: ranged("repetition_penalty", Float) | None = None
    logit_bias: dict[Str, Float] | None = Field(
        None, description="token id (a decimal string) -> bias, clamped to [-100, 100]",
        json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}})
    seed: ranged("seed", Int) | None = None
    stop: StopString | Annotated[list[StopString], Field(json_schema_extra={"maxItems": MAX_STOP_STRINGS})] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: Bool = False
    min_tokens: ranged("min_tokens", Int) = 0
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: Str | None = None
    skip_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    truncate_prompt_tokens: Annotated[int, Strict(), Field(json_schema_extra={"minimum": -1})] | None = None
    prompt_logprobs: ranged("prompt_logprobs", Int) | None = None
    best_of: ranged("n", Int) | None = None

    def check_supported(self) -> None:
        """A field this server does not implement is a 400 naming it, never silently dropped."""
        for name, value in (self.model_extra or {}).items():
            harmless = UNSUPPORTED.get(name)
            if harmless is not None and not harmless(value):
                raise InvalidRequestError(f"{name} is not supported by this server (docs/api.md lists what is)", name)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        self.check_supported()
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise InvalidRequestError("best_of > n cannot stream (the best are known at the end)", "best_of")
        if self.n > MAX_N:
            raise InvalidRequestError(f"n must be at most {MAX_N}, got {self.n}", "n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}", "stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options can only be set when stream is true", "stream_options")
        wanted = [v for v in (prompt_logprobs, self.prompt_logprobs) if v is not None]
        bias = None
        if self.logit_bias:
            bad = next((k for k in self.logit_bias if not (k.isascii() and k.isdigit())), None)
            if bad is not None:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {bad!r}", "logit_bias")
            bias = {int(k): v for k, v in self.logit_bias.items()}
        given = {k: v for k, v in {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty}.items() if v is not None}
        return SamplingParams(n=self.n, max_tokens=max_tokens, logit_bias=bias, seed=self.seed, stop=stop,
                              stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                              min_tokens=self.min_tokens, logprobs=logprobs,
                              prompt_logprobs=max(wanted) if wanted else None,
                              skip_special_tokens=self.skip_special_tokens,
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              truncate_prompt_tokens=self.truncate_prompt_tokens, best_of=self.best_of, **given)


def _absent(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


# Fields of OpenAI's or vLLM's API that this server does not implement, with the values that ask
# for nothing (those pass); any other value is a 400 naming the field.
UNSUPPORTED: dict[str, Any] = {
    **{name: _absent for name in (
        "tools", "functions", "function_call", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "guided_whitespace_pattern", "structured_outputs", "logits_processors",
        "allowed_token_ids", "bad_words", "audio", "prediction", "web_search_options", "continue_final_message",
        "documents", "lora_request", "mm_processor_kwargs", "priority")},
    "tool_choice": lambda v: _absent(v) or v == "none",
    "parallel_tool_calls": lambda v: True,  # NOTE: means nothing without tools
    "response_format": lambda v: _absent(v) or (isinstance(v, dict) and v.get("type") == "text"),
    "modalities": lambda v: _absent(v) or v == ["text"],
    "logprobs_mode": lambda v: _absent(v) or v == "raw_logprobs",
}


class ContentPart(Base):
    type: Str
    text: Str | None = None


class ChatMessage(Base):
    role: Str
    content: Str | list[ContentPart] | None = None
    name: Str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError("only text content parts are supported", "messages")
            parts.append(part.text)
        return "".join(parts)


# ---------------------------------------------------------------------------------- responses
# NOTE: handlers build plain dicts (cheaper than models for long streams); these models document
# them in /openapi.json, and the fuzz test checks every response against them.

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "elas-serve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(BaseModel):
    version: str
