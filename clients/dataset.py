"""The prompts a load test sends: random token ids of fixed or ranged lengths, or a prompts file.

Random prompts are lists of token ids sent as the completion `prompt` (the API takes token ids),
so the input length is exact without a tokenizer in the client; ids are drawn uniformly from the
vocabulary minus the special (EOS) ids. Lengths follow vLLM's random dataset: uniform integers in
[len * (1 - range_ratio), len * (1 + range_ratio)]. Sampling is lazy and depends only on the seed
and the request index, so the same seed gives the same requests against every server.

A prompts file is JSONL with a `"prompt"` (string or token ids, vLLM's custom dataset) and an
optional `"output_tokens"` per line, or plain text with one prompt per line; it is cycled when
more requests than lines are asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int  # exact for token ids; -1 (unknown until the server's usage) for text
    output_len: int


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of vLLM's random lengths (never below 1)."""
    return max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio)))


class RandomDataset:
    def __init__(self, vocab_size: int, special_ids: list[int], input_len: int, output_len: int,
                 range_ratio: float, seed: int):
        if vocab_size <= len(set(special_ids)):
            raise ValueError(f"no ordinary token ids in a vocabulary of {vocab_size}")
        self.allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, dtype=np.int64))
        self.input_range = length_range(input_len, range_ratio)
        self.output_range = length_range(output_len, range_ratio)
        self.seed = seed

    def __getitem__(self, index: int) -> SampleRequest:
        rng = np.random.default_rng([self.seed, index])
        n_in = int(rng.integers(self.input_range[0], self.input_range[1] + 1))
        n_out = int(rng.integers(self.output_range[0], self.output_range[1] + 1))
        ids = rng.choice(self.allowed, size=n_in).tolist()
        return SampleRequest(ids, n_in, n_out)

    @property
    def max_total_len(self) -> int:
        return self.input_range[1] + self.output_range[1]


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
