"""A tokenizer in a child process, for the /tokenize requests too large for the server's own.

Why a process: turning a million token ids into Python ints (`Encoding.ids`) and then into JSON
holds the GIL for well over 100 ms however the work is split across threads, and the event loop
waits that long. The child (`python -m elas_serve.server.tokenizer_worker FILE`, which imports only
`tokenizers`) does both and sends back the response body as bytes, which the server forwards.

Protocol on the child's stdin/stdout: frames of a 4-byte big-endian length and a payload; a request
is a JSON line `{"add_special_tokens", "token_strs", "max_model_len"}` followed by the text in
UTF-8, a reply is the /tokenize response body (JSON). The child is started on first use, serves one request at a time, and is
started again if it died.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import threading
from pathlib import Path

HEADER = struct.Struct(">I")


class TokenizerWorker:
    def __init__(self, tokenizer_file: str | Path):
        self.tokenizer_file = str(tokenizer_file)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    async def tokenize(self, text: str, add_special_tokens: bool, token_strs: bool, max_model_len: int) -> bytes:
        """The /tokenize response body for `text`. NOTE: the pipe I/O runs on a worker thread: the
        reads and writes of megabytes release the GIL there, while on the event loop they would
        hold it (measured: 0.1-0.2 s lags)."""
        # NOTE: options as a small JSON line, then the text as raw UTF-8: no JSON escaping of megabytes
        options = json.dumps({"add_special_tokens": add_special_tokens, "token_strs": token_strs,
                              "max_model_len": max_model_len}).encode()
        return await asyncio.to_thread(self._roundtrip, options + b"\n" + text.encode("utf-8"))

    def _roundtrip(self, request: bytes) -> bytes:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen([sys.executable, "-m", "elas_serve.server.tokenizer_worker",
                                               self.tokenizer_file], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            proc = self._proc
            try:
                proc.stdin.write(HEADER.pack(len(request)) + request)
                proc.stdin.flush()
                header = proc.stdout.read(HEADER.size)
                if len(header) < HEADER.size:
                    raise EOFError("the worker closed its output")
                (size,) = HEADER.unpack(header)
                reply = proc.stdout.read(size)
                if len(reply) < size:
                    raise EOFError("the worker's reply was cut short")
                return reply
            except (OSError, EOFError) as e:
                proc.kill()
                raise RuntimeError(f"the tokenizer worker failed: {e!r}") from None

    async def aclose(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)


def _serve(tokenizer_file: str) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while header := stdin.read(HEADER.size):
        options, text = stdin.read(HEADER.unpack(header)[0]).split(b"\n", 1)
        req = json.loads(options)
        ids = tok.encode(text.decode("utf-8"), add_special_tokens=req["add_special_tokens"]).ids
        body = {"count": len(ids), "max_model_len": req["max_model_len"], "tokens": ids}
        if req["token_strs"]:
            body["token_strs"] = [tok.id_to_token(i) for i in ids]
        reply = json.dumps(body, ensure_ascii=False).encode("utf-8")
        stdout.write(HEADER.pack(len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
