"""The prompts a load test sends: random token ids, a ShareGPT file, or a prompts file.

Random prompts are lists of token ids sent as the completion `prompt` (the API takes token ids),
so the input length is exact without a tokenizer in the client; ids are drawn uniformly from the
vocabulary minus the special (EOS) ids. Lengths follow vLLM's random dataset: uniform integers in
[len * (1 - range_ratio), len * (1 + range_ratio)], after a prefix of `prefix_len` ids that every
request shares (`--random-prefix-len`, what prefix caching can reuse). Sampling is lazy and
depends only on the seed and the request index, so the same seed gives the same requests against
every server.

A ShareGPT file is vLLM's format: a JSON list of `{"conversations": [{"value": ...}, ...]}`; the
first turn is the prompt, the second the reference completion. As in vLLM, the entries are
shuffled with Python's `random.Random(seed)`, the completion's token count is the output length
unless `--sharegpt-output-len` is given, and pairs with a prompt or output under 4 tokens, a
prompt over 1024 or a total over 2048 are skipped (here also those over the server's
max_model_len). Counting needs a tokenizer (tokens.py).

A prompts file is JSONL with a `"prompt"` (string or token ids, vLLM's custom dataset) and an
optional `"output_tokens"` per line, or plain text with one prompt per line.
ShareGPT samples and prompt lines are cycled when more requests than samples are asked for.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT_LEN, SHAREGPT_MAX_TOTAL_LEN = 4, 1024, 2048  # vLLM's pruning


@dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int  # exact for token ids; -1 (unknown until the server's usage) for text
    output_len: int


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of vLLM's random lengths (never below 1)."""
    return max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio)))


class Tokenizer(Protocol):
    async def encode(self, texts: list[str]) -> list[list[int]]: ...


class RandomDataset:
    def __init__(self, vocab_size: int, special_ids: list[int], input_len: int, output_len: int,
                 range_ratio: float, seed: int, prefix_len: int = 0):
        if vocab_size <= len(set(special_ids)):
            raise ValueError(f"no ordinary token ids in a vocabulary of {vocab_size}")
        self.allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, dtype=np.int64))
        self.input_range = length_range(input_len, range_ratio)
        self.output_range = length_range(output_len, range_ratio)
        self.seed = seed
        # NOTE: a seed sequence of another length than [seed, index]: the prefix never equals a prompt.
        self.prefix = np.random.default_rng([seed, 0, 1]).choice(self.allowed, size=prefix_len).tolist()

    def __getitem__(self, index: int) -> SampleRequest:
        rng = np.random.default_rng([self.seed, index])
        n_in = int(rng.integers(self.input_range[0], self.input_range[1] + 1))
        n_out = int(rng.integers(self.output_range[0], self.output_range[1] + 1))
        ids = self.prefix + rng.choice(self.allowed, size=n_in).tolist()
        return SampleRequest(ids, len(ids), n_out)

    @property
    def max_total_len(self) -> int:
        return len(self.prefix) + self.input_range[1] + self.output_range[1]


def read_sharegpt(path: Path) -> list[tuple[str, str]]:
    """(prompt, completion) of every entry with two or more turns, in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read ShareGPT file {path}: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{\"conversations\": [...]}} entries")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            prompt, completion = turns[0].get("value"), turns[1].get("value")
            if isinstance(prompt, str) and isinstance(completion, str):
                pairs.append((prompt, completion))
    if not pairs:
        raise ValueError(f"{path}: no entry has two conversation turns with a \"value\"")
    return pairs


async def sample_sharegpt(pairs: list[tuple[str, str]], tokenizer: Tokenizer, num_requests: int, seed: int,
                          output_len: int | None, max_model_len: int | None,
                          shuffle: bool = True) -> list[SampleRequest]:
    """vLLM's ShareGPT sampling (see the module docstring); cycled up to num_requests."""
    order = list(pairs)
    if shuffle:
        random.Random(seed).shuffle(order)  # NOTE: vLLM's random.seed(seed); random.shuffle(data)
    samples: list[SampleRequest] = []
    for i in range(0, len(order), 64):  # tokenized in chunks, stopping once there are enough
        chunk = order[i:i + 64]
        ids = await tokenizer.encode([text for pair in chunk for text in pair])
        for j, (prompt, _) in enumerate(chunk):
            prompt_len = len(ids[2 * j])
            n_out = len(ids[2 * j + 1]) if output_len is None else output_len
            too_short = prompt_len < SHAREGPT_MIN_LEN or (output_len is None and n_out < SHAREGPT_MIN_LEN)
            too_long = prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + n_out > SHAREGPT_MAX_TOTAL_LEN or (
                max_model_len is not None and prompt_len + n_out > max_model_len)
            if not (too_short or too_long):
                samples.append(SampleRequest(prompt, prompt_len, n_out))
        if len(samples) >= num_requests:
            break
    if not samples:
        raise ValueError(f"no ShareGPT pair fits: prompts of {SHAREGPT_MIN_LEN}..{SHAREGPT_MAX_PROMPT_LEN} "
                         f"tokens and a total of at most {min(SHAREGPT_MAX_TOTAL_LEN, max_model_len or 1 << 30)}")
    return [samples[k % len(samples)] for k in range(num_requests)]


class PromptsFile:
    def __init__(self, path: Path, output_len: int):
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompts file {path}: {e}") from None
        if not lines:
            raise ValueError(f"prompts file {path} has no prompts")
        self.samples = [self._parse(path, i, line, output_len) for i, line in enumerate(lines)]

    @staticmethod
    def _parse(path: Path, i: int, line: str, output_len: int) -> SampleRequest:
        if path.suffix != ".jsonl":
            return SampleRequest(line, -1, output_len)
        try:
            row = json.loads(line)
            prompt = row["prompt"]
            n_out = int(row.get("output_tokens", output_len))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object with a \"prompt\"") from None
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            raise ValueError(f"{path}:{i + 1}: \"prompt\" must be a string or a list of token ids")
        if n_out < 1:
            raise ValueError(f"{path}:{i + 1}: output_tokens must be at least 1")
        return SampleRequest(prompt, len(prompt) if isinstance(prompt, list) else -1, n_out)

    def __getitem__(self, index: int) -> SampleRequest:
        return self.samples[index % len(self.samples)]
