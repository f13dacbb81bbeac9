"""Turns sampled tokens into text deltas and decides when a request stops.

Stop rules, checked after each new token (vLLM's order): EOS (unless `ignore_eos`) and
`stop_token_ids` once `min_tokens` are out; stop strings (the string and what follows are cut from
the text); then `max_tokens` and `max_model_len` ("length"). While a request runs, the longest tail
of its text that could still grow into a stop string is held back, so a stop string never leaks
into a streamed delta.
"""

from __future__ import annotations

from dataclasses import dataclass

from elas_serve.tokenizer import IncrementalDetokenizer, Tokenizer

from .request import Request, RequestOutput, RequestStatus, TokenLogprob


@dataclass(slots=True)
class _TextState:
    detok: IncrementalDetokenizer
    released: int = 0  # characters of detok.text already sent
    stop_at: int | None = None  # text is cut here (a stop string started)


def _held_back(text: str, stops: list[str]) -> int:
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


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.states: dict[str, _TextState] = {}

    def add(self, req: Request) -> None:
        self.states[req.request_id] = _TextState(IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens))

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def text(self, request_id: str) -> str:
        st = self.states[request_id]
        return st.detok.text[:st.stop_at]

    def process(self, req: Request, token: int | None, logprob: TokenLogprob | None,
                prompt_done: bool) -> tuple[RequestOutput | None, RequestStatus | None]:
        """Account one step of `req`; returns its output (if any) and its finish status (if any)."""
        st = self.states[req.request_id]
        status = None
        if token is not None:
            req.append_token(token)
            if logprob is not None:
                req.logprobs.append(logprob)
            status = self._check_stop(req, st, token)
        elif req.num_computed_tokens == req.num_tokens and req.num_output_tokens >= req.max_tokens:
            status = RequestStatus.FINISHED_LENGTH  # max_tokens == 0: only the prompt was wanted
        if token is None and status is None and not prompt_done:
            return None, None
        if status is not None and st.stop_at is None:
            st.detok.flush()
        end = len(st.detok.text) if st.stop_at is None else st.stop_at
        if status is None and req.params.stop:
            end -= _held_back(st.detok.text[:end], req.params.stop)
        new_text = st.detok.text[st.released:end] if end > st.released else ""
        st.released = max(st.released, end)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=[] if token is None else [token],
            new_text=new_text,
            new_logprobs=None if logprob is None else [logprob],
            prompt_logprobs=list(req.prompt_logprobs) if prompt_done and req.wants_prompt_logprobs else None,
            finished=status is not None,
            finish_reason=None if status is None else status.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=req.num_output_tokens,
            num_cached_tokens=req.num_cached_tokens,
            times=req.times,
        ), status

    def aborted(self, req: Request, error: str | None = None) -> RequestOutput:
        """The last output of a request stopped from outside (aborted, or failed with `error`):
        whatever text was held back."""
        st = self.states[req.request_id]
        st.detok.flush()
        end = len(st.detok.text) if st.stop_at is None else st.stop_at
        new_text, st.released = st.detok.text[st.released:end], end
        return RequestOutput(req.request_id, [], new_text, finished=True,
                             finish_reason="abort" if error is None else "error", error=error,
                             num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
                             num_cached_tokens=req.num_cached_tokens, times=req.times)

    def _check_stop(self, req: Request, st: _TextState, token: int) -> RequestStatus | None:
        p = req.params
        prev_len = len(st.detok.text)
        st.detok.push([token])
        if req.num_output_tokens >= p.min_tokens:
            if token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if p.stop:
                text = st.detok.text
                start = max(0, prev_len - p.max_stop_len + 1)
                hits = [(i, s) for s in p.stop if (i := text.find(s, start)) >= 0]
                if hits:
                    st.stop_at, req.stop_reason = min(hits)
                    return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
