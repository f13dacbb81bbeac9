"""The engine's front end, in the server's process: input processing (tokenize, validate),
output processing (detokenize, stop strings, `n` completions), and `AsyncLLM`, the `EngineClient`
the HTTP server talks to. The engine core itself runs in its own process (`elas_serve.engine`)."""

from .async_llm import AsyncLLM
from .processor import PreparedPrompt
from .protocol import (
    EngineClient,
    EngineDeadError,
    FinishedRequestStats,
    IterationStats,
    RequestFailedError,
    RequestStream,
    StatLogger,
)

__all__ = ["AsyncLLM", "EngineClient", "EngineDeadError", "FinishedRequestStats", "IterationStats",
           "PreparedPrompt", "RequestFailedError", "RequestStream", "StatLogger"]
