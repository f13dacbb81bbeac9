"""`elas-serve serve` as a real process: graceful drain on SIGTERM/SIGINT, exit codes.

Run: python -m pytest tests/test_server_process.py -v
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from authors_ckpt import Variant, write_checkpoint
from server_utils import start


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("proc_ckpt")
    write_checkpoint(path, Variant("proc", vocab=320, extra_config={"eos_token_id": 0}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


def stream_in_background(url: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    result: dict = {"chunks": [], "first": threading.Event()}

    def run() -> None:
        body = {"model": "m", "prompt": "It is", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    result["chunks"].append(json.loads(line[6:]))
                    result["first"].set()
                elif line == "data: [DONE]":
                    result["done"] = True

    t = threading.Thread(target=run)
    t.start()
    return t, result


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_requests_then_exits_0(ckpt, sig):
    proc, url = start(ckpt)
    try:
        t, result = stream_in_background(url, max_tokens=1500)
        assert result["first"].wait(30)
        proc.send_signal(sig)
        time.sleep(0.05)
        refused = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        t.join(60)
        assert proc.wait(60) == 0
        assert result.get("done")
        finish = [c["choices"][0]["finish_reason"] for c in result["chunks"] if c["choices"]]
        assert finish[-1] == "length" and result["chunks"][-1]["usage"]["completion_tokens"] == 1500
    finally:
        proc.kill()


def test_drain_timeout_aborts_what_is_left(ckpt):
    proc, url = start(ckpt, "--shutdown-timeout", "0.2")
    try:
        t, result = stream_in_background(url, max_tokens=1900)
        assert result["first"].wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
        finish = [c["choices"][0]["finish_reason"] for c in result["chunks"] if c["choices"]]
        assert finish[-1] == "abort" and result.get("done")
    finally:
        proc.kill()


def test_serve_exits_2_on_a_broken_checkpoint(tmp_path):
    write_checkpoint(tmp_path, Variant("broken"))
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "activation_sparse_method": "mvue"}))
    proc = subprocess.run([sys.executable, "-m", "elas_serve.cli", "serve", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "activation_sparse_method='mvue' is not supported" in proc.stderr and "Traceback" not in proc.stderr


def test_fused_backend_on_cpu_serves_what_dense_serves(ckpt):
    """`--ffn-backend fused` on the CPU turns on the Triton interpreter before the kernels load."""
    body = {"model": "m", "prompt": "It is a truth", "max_tokens": 4, "temperature": 0}
    texts = {}
    for backend in ("dense", "fused"):
        proc, url = start(ckpt, "--ffn-backend", backend)
        try:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            texts[backend] = r.json()["choices"][0]["text"]
            assert f'backend="{backend}"' in httpx.get(f"{url}/metrics").text
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    assert texts["fused"] == texts["dense"]


def test_a_dead_engine_core_is_noticed_at_once(ckpt):
    """The core process is killed mid-stream: the stream ends with an error event, a waiting
    non-streamed request gets a 503, /health says why, the log too; SIGTERM still exits 0."""
    proc, url = start(ckpt)
    try:
        children = subprocess.check_output(["pgrep", "-a", "-P", str(proc.pid)], text=True).splitlines()
        core = int(next(c for c in children if "spawn_main" in c).split()[0])  # not the resource tracker
        t, result = stream_in_background(url, max_tokens=1900)
        waiting: dict = {}
        body = {"model": "m", "prompt": "It is", "max_tokens": 1900, "ignore_eos": True}
        w = threading.Thread(target=lambda: waiting.update(r=httpx.post(f"{url}/v1/completions", json=body,
                                                                        timeout=60)))
        w.start()
        assert result["first"].wait(30)
        os.kill(core, signal.SIGKILL)
        t.join(10)
        w.join(10)
        assert not t.is_alive() and not w.is_alive(), "a request hung after the core died"
        assert result.get("done") and result["chunks"][-1]["error"]["code"] in (500, 503)
        assert waiting["r"].status_code == 503
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "engine core process exited" in health.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "engine core process exited unexpectedly (exit code -9)" in proc.stdout.read()
    finally:
        proc.kill()
