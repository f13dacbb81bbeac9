"""Token counts for the load tester: a local tokenizer.json, or the server's own tokenizer.

vLLM's `bench serve` loads `--tokenizer` (default: the model id) from the Hugging Face hub. The
load tester never downloads anything: `--tokenizer PATH` is a local `tokenizer.json` (or a folder
holding one); without it, or with a name that is not a local path, prompts are counted by the
server under test (`POST /tokenize`, `POST /detokenize`), which is the tokenizer that serves the
model. Only datasets of text need one (ShareGPT lengths, chat prompts made from random ids).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from .client import LoadTestError, describe, http_error

MAX_IN_FLIGHT = 16  # tokenize calls at once against the server


class LocalTokenizer:
    """A `tokenizer.json` on disk (the server's Tokenizer class: HF `tokenizers`, no torch)."""

    source = "local"

    def __init__(self, path: Path):
        from elas_serve.models.config import CheckpointError
        from elas_serve.tokenizer import Tokenizer

        try:
            self.tok = Tokenizer.from_path(path)
        except CheckpointError as e:
            raise ValueError(f"--tokenizer: {e}") from None

    async def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tok.encode(t) for t in texts]

    async def decode(self, ids: list[list[int]]) -> list[str]:
        return [self.tok.decode(i) for i in ids]


class ServerTokenizer:
    """The served model's tokenizer, through `POST /tokenize` and `POST /detokenize`."""

    source = "server /tokenize"

    def __init__(self, client: httpx.AsyncClient, base_url: str, model: str):
        self.client, self.base_url, self.model = client, base_url, model
        self.sem = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def _post(self, path: str, body: dict) -> dict:
        url = f"{self.base_url}{path}"
        async with self.sem:
            try:
                r = await self.client.post(url, json={"model": self.model, **body})
            except httpx.HTTPError as e:
                raise LoadTestError(f"cannot reach {url}: {describe(e)}") from None
        if r.status_code == 404:
            raise LoadTestError(f"the server has no {path}: give a local tokenizer with --tokenizer PATH")
        if r.status_code != 200:
            raise LoadTestError(f"POST {url}: {http_error(r.status_code, r.content)}")
        return r.json()

    async def encode(self, texts: list[str]) -> list[list[int]]:
        answers = await asyncio.gather(*(self._post("/tokenize", {"prompt": t}) for t in texts))
        return [list(a["tokens"]) for a in answers]

    async def decode(self, ids: list[list[int]]) -> list[str]:
        answers = await asyncio.gather(*(self._post("/detokenize", {"tokens": i}) for i in ids))
        return [str(a["prompt"]) for a in answers]


def make_tokenizer(name: str | None, client: httpx.AsyncClient, base_url: str,
                   model: str) -> tuple[LocalTokenizer | ServerTokenizer, str | None]:
    """The tokenizer for `--tokenizer NAME`, and a note to print when NAME is not used as given."""
    if name is not None and Path(name).exists():
        return LocalTokenizer(Path(name)), None
    note = None
    if name is not None:
        note = (f"--tokenizer {name} is not a local path: counting tokens with the server's /tokenize "
                "(elas-loadtest never downloads from a hub)")
    return ServerTokenizer(client, base_url, model), note
