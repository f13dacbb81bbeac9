"""OutputProcessor: the core's token deltas -> text deltas, stop strings, `n` completions per prompt.

One `ParentRequest` per submitted prompt holds its `n` `ChildRequest`s (engine requests
`{id}-{i}`; with `best_of > n`, `best_of` of them, and only the n of highest cumulative log-prob
come out, once all have finished). For each core output the child's tokens are detokenized incrementally and checked
against the stop strings (once `min_tokens` are out): a stop string and what follows are cut, the
child finishes with "stop", and its id is returned to be aborted in the core. While a child runs,
the longest tail of its text that could still grow into a stop string is held back, so a stop
string never leaks into a streamed delta. A child that failed fails its whole parent.

Latency statistics (TTFT, ITL, end-to-end, queue, prefill, decode) are timed here, when outputs
reach the front end: what a client sees. All methods run on one thread (the event loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from elas_serve.engine.messages import EngineCoreOutput, EngineCoreOutputs
from elas_serve.outputs import CompletionOutput, RequestOutput
from elas_serve.sampling_params import SamplingParams
from elas_serve.tokenizer import IncrementalDetokenizer, Tokenizer

from .processor import PreparedPrompt
from .protocol import FinishedRequestStats, IterationStats


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string.

    NOTE: only positions holding a stop string's first character are tried, each with one
    C-level `startswith`, so a long stop string costs O(len(stop)) per token in practice."""
    best = 0
    for stop in stops:
        tail = text[len(text) - min(len(stop) - 1, len(text)):]
        i = tail.find(stop[0])
        while 0 <= i < len(tail) - best:
            if stop.startswith(tail[i:]):
                best = len(tail) - i
                break
            i = tail.find(stop[0], i + 1)
    return best


@dataclass(slots=True)
class ChildRequest:
    request_id: str
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    arrival: float
    released: int = 0  # characters of detok.text already sent
    stop_at: int | None = None  # text is cut here (a stop string started)
    num_output_tokens: int = 0
    finish_reason: str | None = None
    first_token: float | None = None
    last_token: float | None = None
    cumulative_logprob: float = 0.0
    whole: CompletionOutput | None = None  # with best_of: the completion so far (nothing streams)


@dataclass(slots=True)
class ParentRequest:
    request_id: str
    prompt: PreparedPrompt
    children: list[ChildRequest]
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # a child failed: so did the request

    @property
    def finished(self) -> bool:
        return self.error is not None or all(c.finish_reason is not None for c in self.children)


@dataclass(slots=True)
class ProcessedOutputs:
    outputs: list[tuple[ParentRequest, RequestOutput]] = field(default_factory=list)
    failed: list[ParentRequest] = field(default_factory=list)  # each with its `error`
    to_abort: list[str] = field(default_factory=list)  # engine request ids the core should stop
    stats: IterationStats | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self.children: dict[str, tuple[ParentRequest, ChildRequest]] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self.children)

    def add(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams, arrival: float) -> ParentRequest:
        children = [ChildRequest(f"{request_id}-{i}", i, params, IncrementalDetokenizer(
            self.tokenizer, prompt.prompt_token_ids, params.skip_special_tokens), arrival,
            whole=CompletionOutput(i) if params.num_samples > params.n else None) for i in range(params.num_samples)]
        parent = ParentRequest(request_id, prompt, children)
        self.parents[request_id] = parent
        for c in children:
            self.children[c.request_id] = (parent, c)
        return parent

    def abort(self, request_id: str) -> tuple[list[str], list[FinishedRequestStats]]:
        """Forget a parent (its reader left); the ids of its children still running in the core."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return [], []
        running = [c for c in parent.children if c.request_id in self.children]
        for c in running:
            del self.children[c.request_id]
        now = time.monotonic()
        return [c.request_id for c in running], [self._finished_stats(parent, c, "abort", now, None) for c in running]

    def process(self, batch: EngineCoreOutputs) -> ProcessedOutputs:
        now = time.monotonic()
        result = ProcessedOutputs(stats=IterationStats(batch.stats))
        deltas: dict[str, tuple[ParentRequest, list[CompletionOutput]]] = {}
        for out in batch.outputs:
            entry = self.children.get(out.request_id)
            if entry is None:  # finished here already (a stop string), or its parent was aborted
                continue
            parent, child = entry
            if out.finish_reason == "error":
                self._fail(parent, out.error or "the engine failed on this request", now, result)
                continue
            if out.prompt_logprobs is not None:
                parent.prompt_logprobs = out.prompt_logprobs
            parent.num_cached_tokens = out.num_cached_tokens
            delta = self._advance(parent, child, out, now, result)
            if child.whole is not None:
                child.whole.add(delta)
                if not parent.finished:
                    continue
                delta = None  # the best n of all, below
            entry = deltas.setdefault(parent.request_id, (parent, []))
            if delta is not None:
                entry[1].append(delta)
        for parent, completions in deltas.values():
            if parent.error is not None:
                continue
            if parent.children[0].whole is not None:
                completions = self._best(parent)
            result.outputs.append((parent, RequestOutput(
                parent.request_id, parent.prompt.prompt, parent.prompt.prompt_token_ids, completions,
                parent.prompt_logprobs, parent.finished, parent.num_cached_tokens)))
            if parent.finished:
                self.parents.pop(parent.request_id, None)
        return result

    def _advance(self, parent: ParentRequest, child: ChildRequest, out: EngineCoreOutput, now: float,
                 result: ProcessedOutputs) -> CompletionOutput:
        p = child.params
        finish, stop_reason = out.finish_reason, out.stop_reason
        if out.new_token_ids:
            if child.first_token is None:
                child.first_token = now
                result.stats.ttfts.append(now - child.arrival)
            else:
                result.stats.itls.append(now - child.last_token)
            child.last_token = now
            child.num_output_tokens += len(out.new_token_ids)
            child.cumulative_logprob += sum(lp.logprob for lp in out.new_logprobs or ())
            prev_len = len(child.detok.text)
            child.detok.push(out.new_token_ids)
            if p.stop and child.num_output_tokens >= p.min_tokens:
                text = child.detok.text
                start = max(0, prev_len - p.max_stop_len + 1)
                hits = [(i, s) for s in p.stop if (i := text.find(s, start)) >= 0]
                if hits:
                    at, stop_reason = min(hits)
                    child.stop_at = at + len(stop_reason) if p.include_stop_str_in_output else at
                    if finish is None:
                        result.to_abort.append(child.request_id)
                    finish = "stop"
        if finish is not None and child.stop_at is None:
            child.detok.flush()
        end = len(child.detok.text) if child.stop_at is None else child.stop_at
        if finish is None and p.stop:
            end -= held_back(child.detok.text[:end], p.stop)
        text = child.detok.text[child.released:end] if end > child.released else ""
        child.released = max(child.released, end)
        if finish is not None:
            child.finish_reason = finish
            del self.children[child.request_id]
            result.stats.finished.append(self._finished_stats(parent, child, finish, now, out.first_scheduled))
        logprobs = out.new_logprobs if p.logprobs is not None or child.whole is not None else None
        return CompletionOutput(child.index, text, list(out.new_token_ids), logprobs, finish, stop_reason)

    def _best(self, parent: ParentRequest) -> list[CompletionOutput]:
        """best_of: the n completions of highest cumulative log-prob, renumbered 0..n-1."""
        p = parent.children[0].params
        best = sorted(parent.children, key=lambda c: c.cumulative_logprob, reverse=True)[:p.n]
        out = []
        for index, c in enumerate(best):
            whole = c.whole
            out.append(CompletionOutput(index, whole.text, whole.token_ids, whole.logprobs if p.logprobs is not None
                                        else None, whole.finish_reason, whole.stop_reason))
        return out

    def _fail(self, parent: ParentRequest, error: str, now: float, result: ProcessedOutputs) -> None:
        parent.error = error
        self.parents.pop(parent.request_id, None)
        for c in parent.children:
            if self.children.pop(c.request_id, None) is not None:
                result.to_abort.append(c.request_id)
                result.stats.finished.append(self._finished_stats(parent, c, "error", now, None))
        result.failed.append(parent)

    def _finished_stats(self, parent: ParentRequest, c: ChildRequest, reason: str, now: float,
                        first_scheduled: float | None) -> FinishedRequestStats:
        return FinishedRequestStats(
            reason, now - c.arrival, None if first_scheduled is None else first_scheduled - c.arrival,
            None if first_scheduled is None or c.first_token is None else c.first_token - first_scheduled,
            None if c.first_token is None else c.last_token - c.first_token,
            len(parent.prompt.prompt_token_ids), c.num_output_tokens)
