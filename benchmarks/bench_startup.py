"""A fresh install's first start: `elas-serve serve` of the demo model with an empty inductor cache.

Times, from launching the process: `/health` answering 200, a first greedy completion (served
eagerly while the decoder compiles in the background), the `decoder compiled` log line, and the same
completion afterwards (the compiled code); checks that both completions are the same text. Writes
docs/benchmarks/startup_cpu.{json,md}.

Run: python benchmarks/bench_startup.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, serve, write_results  # noqa: E402

QUERY = {"model": "elas-demo", "prompt": "Elizabeth walked", "max_tokens": 24, "temperature": 0}


def complete(url: str) -> tuple[str, float]:
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json=QUERY, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["text"], time.monotonic() - t0


def run(compile_timeout: float = 600.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "ELAS_SERVE_ENFORCE_EAGER": "0"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # NOTE: the server process inherits them
        log = Path(tmp) / "serve.log"
        try:
            t0 = time.monotonic()
            with serve([], log) as server:
                health_s = time.monotonic() - t0
                first_text, first_s = complete(server.url)
                while "decoder compiled" not in log.read_text():
                    if time.monotonic() - t0 > compile_timeout:
                        raise SystemExit("the decoder did not compile in time")
                    time.sleep(0.5)
                compiled_s = time.monotonic() - t0
                later_text, later_s = complete(server.url)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return {"health_s": health_s, "first_completion_s": first_s, "compiled_after_s": compiled_s,
            "compiled_completion_s": later_s, "same_text": first_text == later_text, "text": first_text}


def markdown(data: dict) -> str:
    env = data["environment"]
    return "\n".join([
        f"# First start on {env['device']}", "",
        f"torch {env['torch']}, commit {env['commit']}, {env['date']}. `python benchmarks/bench_startup.py`: "
        "`elas-serve serve` of the demo model with an empty inductor cache; seconds from launching the process.", "",
        "| /health 200 | first completion (eager, compiling) | `decoder compiled` logged | completion after | "
        "same text |", "|---:|---:|---:|---:|---|",
        f"| {data['health_s']:.1f} | {data['first_completion_s']:.2f} | {data['compiled_after_s']:.1f} | "
        f"{data['compiled_completion_s']:.2f} | {data['same_text']} |", ""])


def main() -> int:
    data = run()
    data["environment"] = environment(torch.device("cpu"))
    md = markdown(data)
    print(md)
    write_results("startup_cpu", data, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
