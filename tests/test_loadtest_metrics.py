"""Load-tester arithmetic against hand-computed timings (vLLM `bench serve` definitions), arrival
times, prompts and flag parsing; no server involved.

Run: python -m pytest tests/test_loadtest_metrics.py -v
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from elas_serve.clients.cli import main
from elas_serve.clients.client import check_target, metrics_delta
from elas_serve.clients.compare import parse_servers
from elas_serve.clients.dataset import PromptsFile, RandomDataset
from elas_serve.clients.loadgen import arrival_offsets
from elas_serve.clients.metrics import RequestResult, calculate_metrics, parse_slos, result_fields


def ok(start, ttft, itl, output_len, prompt_len=10):
    """A successful request whose last chunk came at ttft + sum(itl)."""
    return RequestResult(prompt_len=prompt_len, output_len=output_len, success=True, start_time=start,
                         ttft=ttft, itl=list(itl), latency=ttft + sum(itl))


@pytest.fixture
def results():
    return [
        ok(0.0, 0.100, [0.020, 0.030, 0.050], 4),  # E2EL 0.2, TPOT (0.2 - 0.1) / 3
        ok(0.1, 0.200, [0.040], 2),  # E2EL 0.24, TPOT 0.04
        ok(0.5, 0.300, [], 1),  # one token: no TPOT, no ITL
        RequestResult(prompt_len=10, error="HTTP 503: queue full"),
        RequestResult(prompt_len=10, error="HTTP 503: queue full"),
    ]


def test_counts_and_throughputs(results):
    m = calculate_metrics(results, 2.0, [99])
    assert (m.completed, m.failed) == (3, 2)
    assert m.errors == {"HTTP 503: queue full": 2}
    assert (m.total_input, m.total_output) == (30, 7)  # failed requests count nowhere
    assert m.request_throughput == pytest.approx(3 / 2.0)
    assert m.output_throughput == pytest.approx(7 / 2.0)
    assert m.total_token_throughput == pytest.approx(37 / 2.0)
    assert m.max_concurrent_requests == 2  # [0, .2) and [.1, .34) overlap; [.5, .8) alone
    assert m.max_output_tokens_per_s == 7  # every chunk within the first second


def test_ttft_e2el_statistics_as_numpy(results):
    m = calculate_metrics(results, 2.0, [50, 99])
    ttft, e2el = m.stats["ttft"], m.stats["e2el"]
    assert ttft.mean == pytest.approx(200.0) and ttft.median == pytest.approx(200.0)
    assert ttft.std == pytest.approx(math.sqrt((100**2 + 0 + 100**2) / 3))  # population std, as np.std
    assert ttft.percentiles[99] == pytest.approx(200.0 + 0.98 * 100.0)  # linear interpolation
    assert e2el.mean == pytest.approx((200.0 + 240.0 + 300.0) / 3)
    assert e2el.percentiles[50] == pytest.approx(240.0)


def test_tpot_excludes_the_first_token_and_one_token_requests(results):
    tpot = calculate_metrics(results, 2.0, [50]).stats["tpot"]
    assert tpot.mean == pytest.approx(((200 - 100) / 3 + 40.0) / 2)  # request 3 (1 token) left out
    assert tpot.percentiles[50] == pytest.approx(((200 - 100) / 3 + 40.0) / 2)
    slow_start = [ok(0.0, 5.0, [0.01] * 9, 10)]  # a huge TTFT does not leak into TPOT
    assert calculate_metrics(slow_start, 6.0, [99]).stats["tpot"].mean == pytest.approx(10.0)


def test_itl_is_per_chunk_and_pooled(results):
    itl = calculate_metrics(results, 2.0, [90]).stats["itl"]
    gaps = [20.0, 30.0, 50.0, 40.0]  # all requests' gaps together
    assert itl.mean == pytest.approx(np.mean(gaps)) and itl.median == pytest.approx(35.0)
    assert itl.percentiles[90] == pytest.approx(np.percentile(gaps, 90)) == pytest.approx(47.0)
    bundled = [ok(0.0, 0.1, [0.3], 4)]  # 4 tokens in 2 chunks: one ITL of 300 ms, TPOT 100 ms
    m = calculate_metrics(bundled, 1.0, [99])
    assert m.stats["itl"].mean == pytest.approx(300.0) and m.stats["tpot"].mean == pytest.approx(100.0)


def test_goodput_distserve(results):
    assert calculate_metrics(results, 2.0, [99]).request_goodput is None
    # ttft <= 250 and tpot <= 35: only request 1 (request 2's TPOT is 40, request 3's TTFT 300)
    assert calculate_metrics(results, 2.0, [99], {"ttft": 250, "tpot": 35}).request_goodput == pytest.approx(0.5)
    # a 1-token request has TPOT 0 for goodput (vLLM), so only request 2 misses tpot <= 35
    assert calculate_metrics(results, 2.0, [99], {"tpot": 35}).request_goodput == pytest.approx(1.0)
    assert calculate_metrics(results, 2.0, [99], {"e2el": 250}).request_goodput == pytest.approx(1.0)


def test_no_success_gives_zeros_not_errors():
    m = calculate_metrics([RequestResult(error="x")], 1.0, [99])
    assert m.completed == 0 and m.stats["ttft"].mean == 0.0 and m.max_concurrent_requests == 0


def test_result_keys_are_vllms(results):
    fields = result_fields(calculate_metrics(results, 2.0, [99, 99.9]), ["ttft", "tpot", "itl", "e2el"], [99, 99.9])
    for key in ("completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
                "max_concurrent_requests", "mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p99_itl_ms",
                "p99.9_e2el_ms", "duration"):
        assert key in fields, key
    json.dumps(fields)


def test_parse_slos():
    assert parse_slos(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slos(["ttft:500,e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["itl:5"], ["ttft=5"], ["ttft:-1"], ["ttft:x"]):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slos(bad)


def test_arrivals_are_gamma_with_the_asked_rate_and_burstiness():
    assert not arrival_offsets(5, math.inf, 1.0, 0).any()  # rate inf: all at t=0
    for burstiness in (1.0, 0.25, 4.0):
        gaps = np.diff(arrival_offsets(40_000, 8.0, burstiness, 0), prepend=0.0)
        assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
        assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.08)  # CV^2 = 1/shape
    assert np.array_equal(arrival_offsets(10, 2.0, 1.0, 3), arrival_offsets(10, 2.0, 1.0, 3))


def test_random_prompts_lengths_ids_and_determinism():
    data = RandomDataset(vocab_size=50, special_ids=[0, 7], input_len=20, output_len=10, range_ratio=0.5, seed=1)
    samples = [data[i] for i in range(200)]
    assert all(10 <= s.prompt_len == len(s.prompt) <= 30 and 5 <= s.output_len <= 15 for s in samples)
    assert not {0, 7} & {t for s in samples for t in s.prompt}
    assert {s.prompt_len for s in samples} == set(range(10, 31))
    assert data[5] == RandomDataset(50, [0, 7], 20, 10, 0.5, seed=1)[5] != data[6]
    fixed = RandomDataset(50, [], 16, 4, 0.0, seed=0)[0]
    assert (fixed.prompt_len, fixed.output_len) == (16, 4)


def test_prompts_file(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "Hello"}\n\n{"prompt": [1, 2, 3], "output_tokens": 3}\n')
    f = PromptsFile(jsonl, output_len=8)
    assert [(s.prompt, s.prompt_len, s.output_len) for s in (f[0], f[1], f[2])] == \
        [("Hello", -1, 8), ([1, 2, 3], 3, 3), ("Hello", -1, 8)]  # cycled
    txt = tmp_path / "p.txt"
    txt.write_text("one\ntwo\n")
    assert PromptsFile(txt, 4)[1].prompt == "two"
    jsonl.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        PromptsFile(jsonl, 8)


def test_loopback_only_unless_allowed():
    assert check_target("http://127.0.0.1:8000/", False) == "http://127.0.0.1:8000"
    assert check_target("http://localhost:1", False) and check_target("http://[::1]:8000", False)
    with pytest.raises(ValueError, match="--allow-remote"):
        check_target("http://10.0.0.1:8000", False)
    assert check_target("https://example.org", True) == "https://example.org"
    with pytest.raises(ValueError, match="--base-url"):
        check_target("127.0.0.1:8000", True)


def test_metrics_delta():
    before = {'a_total{m="x"}': 5.0, "h_sum": 1.0, "h_count": 2.0, "h_bucket{le=\"1\"}": 2.0, "g": 3.0}
    after = {'a_total{m="x"}': 9.0, "h_sum": 1.5, "h_count": 3.0, "h_bucket{le=\"1\"}": 3.0, "g": 1.0,
             "a_created": 7.0}
    assert metrics_delta(before, after) == {'a_total{m="x"}': 4.0, "h_sum": 0.5, "h_count": 1.0, "g": 1.0}
    assert metrics_delta(None, after) is None


def test_compare_server_specs():
    specs = parse_servers("dense,dense,fast=fused", ["other=http://127.0.0.1:9"])
    assert [(s.label, s.backend, s.url) for s in specs] == [
        ("dense", "dense", None), ("dense-2", "dense", None), ("fast", "fused", None),
        ("other", None, "http://127.0.0.1:9")]
    assert parse_servers("base=dense", ["base=http://127.0.0.1:9"])[0].url == "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="unknown FFN backend"):
        parse_servers("sparse", [])


@pytest.mark.parametrize("argv, message", [
    (["run", "--request-rate", "0"], "--request-rate must be positive"),
    (["run", "--max-concurrency", "0"], "--max-concurrency must be at least 1"),
    (["run", "--percentile-metrics", "ttft,foo"], "--percentile-metrics"),
    (["run", "--goodput", "ttft"], "bad SLO"),
    (["run", "--dataset-name", "custom"], "needs --dataset-path"),
    (["run", "--base-url", "http://192.0.2.1:8000"], "--allow-remote"),
    (["compare", "--backends", "dense,turbo", "--concurrencies", "1"], "unknown FFN backend"),
    (["compare", "--concurrencies", "1.5"], "whole numbers"),
])
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_client_does_not_import_torch():
    code = "import sys, elas_serve.clients.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
