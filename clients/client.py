"""The HTTP side of the load tester: where it may point, what it asks a server before a run, one
streaming completion timed the way vLLM's `bench serve` times it, and /metrics scrapes.

Invariants: a request never raises (a refused connection, a non-200 status, an in-band SSE
error or a stream cut before `[DONE]` all become a failed `RequestResult` with a one-line error);
timestamps come from `time.perf_counter()` taken as each SSE line arrives. Whatever prevents a run
from starting (unreachable server, missing endpoint) raises `LoadTestError` with one line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .metrics import RequestResult


class LoadTestError(Exception):
    """A run could not start or go on (not a usage error): one line for the user."""


def check_target(base_url: str, allow_remote: bool) -> str:
    """The base URL without a trailing slash; refuses non-loopback hosts unless allowed."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base-url must look like http://127.0.0.1:8000, got {base_url!r}")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ValueError(f"{host} is not a loopback address; load-testing another machine needs --allow-remote")
    return base_url.rstrip("/")


def make_client(request_timeout: float) -> httpx.AsyncClient:
    """NOTE: no connection-pool limit (a pool wait would be timed as server latency) and no proxies
    from the environment (a proxy would be timed too)."""
    headers = {}
    if key := os.environ.get("OPENAI_API_KEY"):  # as vLLM's bench client
        headers["Authorization"] = f"Bearer {key}"
    return httpx.AsyncClient(timeout=httpx.Timeout(request_timeout, connect=10.0), headers=headers,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                             trust_env=False)


def http_error(status: int, body: bytes) -> str:
    """'HTTP 503: The request queue is full ...' from an OpenAI-style error body, or its start."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()[:200] or httpx.codes.get_reason_phrase(status)
    return f"HTTP {status}: {message}"


def describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@dataclass
class ServerInfo:
    model: str
    max_model_len: int | None
    vocab_size: int | None
    special_ids: list[int]


async def get_json(client: httpx.AsyncClient, url: str) -> dict | None:
    """The JSON body of GET url; None on 404; LoadTestError when unreachable or another error."""
    try:
        r = await client.get(url)
    except httpx.HTTPError as e:
        raise LoadTestError(f"cannot reach {url}: {describe(e)}") from None
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise LoadTestError(f"GET {url}: {http_error(r.status_code, r.content)}")
    try:
        return r.json()
    except ValueError:
        raise LoadTestError(f"GET {url}: the answer is not JSON") from None


async def server_info(client: httpx.AsyncClient, base_url: str, model: str | None) -> ServerInfo:
    models = await get_json(client, f"{base_url}/v1/models")
    if not models or not models.get("data"):
        raise LoadTestError(f"{base_url}/v1/models lists no model: is this an OpenAI-compatible server?")
    cards = {m.get("id"): m for m in models["data"]}
    if model is None:
        model = models["data"][0].get("id")
    elif model not in cards:
        raise LoadTestError(f"the server serves {', '.join(map(str, cards))}, not {model!r}")
    tok = await get_json(client, f"{base_url}/tokenizer_info") or {}
    return ServerInfo(model, cards[model].get("max_model_len"), tok.get("vocab_size"),
                      list(tok.get("eos_token_ids") or []))


def chunk_text(choice: dict, chat: bool) -> str | None:
    """The text of one streamed choice; None for a chat chunk that only announces the role.

    NOTE: OpenAI (and this server) send `{"role": "assistant", "content": ""}` before any token;
    vLLM's server sends it with the first token. Timing it as the first token would make TTFT
    the time to the HTTP headers, so it is skipped (a token's chunk never carries the role)."""
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    if "role" in delta and not delta.get("content") and choice.get("finish_reason") is None:
        return None
    return delta.get("content") or ""


async def stream_completion(client: httpx.AsyncClient, url: str, payload: dict, result: RequestResult,
                            chat: bool = False, headers: dict[str, str] | None = None) -> RequestResult:
    """POST a streaming (chat) completion and fill `result` with its timings (vLLM's definitions)."""
    start = last = time.perf_counter()
    result.start_time = start
    chunks, texts, done = 0, [], False
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = http_error(resp.status_code, await resp.aread())
                return result
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # event separators, and ':' comments (keep-alives)
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error in the stream: {chunk['error'].get('message', chunk['error'])}"
                    return result
                if (choices := chunk.get("choices")) and (text := chunk_text(choices[0], chat)) is not None:
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                    texts.append(text)
                elif usage := chunk.get("usage"):
                    result.output_len = int(usage.get("completion_tokens") or 0)
                    result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
    except httpx.HTTPError as e:
        result.error = describe(e)
        return result
    except (ValueError, AttributeError):
        result.error = "the server sent an SSE event that is not a JSON object"
        return result
    if chunks == 0:
        result.error = "no chunk with choices arrived" if done else "the stream ended before any chunk"
    elif not done:
        result.error = "the stream ended without data: [DONE]"
    else:
        result.success = True
        result.latency = last - start
        result.output_len = result.output_len or chunks  # NOTE: no usage chunk: one token per chunk
        result.generated_text = "".join(texts)
    return result


async def scrape_metrics(client: httpx.AsyncClient, base_url: str) -> dict[str, float] | None:
    """Samples of GET /metrics as {'name{label="v",...}': value}; None when there is none."""
    try:
        r = await client.get(f"{base_url}/metrics")
        if r.status_code != 200:
            return None
        families = list(text_string_to_metric_families(r.text))
    except (httpx.HTTPError, ValueError):
        return None
    samples = {}
    for family in families:
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def metrics_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Counter and histogram sum/count changes over a run; gauges as found at its end."""
    if before is None or after is None:
        return None
    out = {}
    for key, value in after.items():
        name = key.split("{", 1)[0]
        if name.endswith(("_created", "_bucket")):
            continue
        out[key] = value - before.get(key, 0.0) if name.endswith(("_total", "_sum", "_count")) else value
    return out
