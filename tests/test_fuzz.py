"""Property-based fuzzing of the real server from its own /openapi.json (schemathesis): no input,
valid or not, gets a 5xx; every response matches the documented status codes, content types and
schemas; invalid input is refused; the engine is alive afterwards.

A tiny checkpoint with a short context keeps each generated request cheap. Run:
python -m pytest tests/test_fuzz.py -v   (FUZZ_EXAMPLES=N sets cases per operation, default 40)
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from authors_ckpt import Variant, write_checkpoint
from server_utils import ServerThread

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))  # per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
CASES: list[str] = []  # operation of every case run
BIASED: list[dict] = []  # the non-empty logit_bias objects sent


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp("fuzz_ckpt")
    write_checkpoint(path, Variant("fuzz", vocab=320, layers=1, extra_config={"eos_token_id": 0,
                                                                              "max_position_embeddings": 64}))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    with ServerThread(path, max_queued_requests=64, max_num_seqs=16, max_choices_per_request=8) as s:
        yield s
        # NOTE: after every case ran against it: the engine is alive and nothing leaked
        assert s.wait_idle(10) and httpx.get(f"{s.url}/health").status_code == 200


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_input_gets_a_5xx_and_every_response_is_documented(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            ran.append(operation.label)
            if isinstance(case.body, dict) and isinstance(case.body.get("logit_bias"), dict) and case.body["logit_bias"]:
                BIASED.append(case.body["logit_bias"])
            case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)

        try:
            run()
        except Unsatisfiable:  # NOTE: an operation without parameters has no invalid input
            assert mode == GenerationMode.NEGATIVE and not operation.body and not operation.query
    CASES.extend(ran)
    print(f"{mode.value}: {len(ran)} cases over {len(set(ran))} operations")
    assert len(set(ran)) >= (8 if mode == GenerationMode.POSITIVE else 4)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
          derandomize=True)
@given(bias=st.dictionaries(st.integers(-3, 700).map(str), st.floats(-1e6, 1e6, allow_nan=False), max_size=6),
       max_tokens=st.integers(0, 4))
def test_numeric_logit_bias_keys(fuzz_server, bias, max_tokens):
    """What schemathesis may or may not draw: token-id keys in and out of the vocabulary (320)."""
    BIASED.append(bias)
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json={"prompt": "It is", "max_tokens": max_tokens,
                                                              "logit_bias": bias})
    in_vocab = all(0 <= int(k) < 320 for k in bias)
    assert r.status_code == (200 if in_vocab else 400), r.text
    if not in_vocab:
        assert r.json()["error"]["param"] == "logit_bias"


def test_the_engine_survived_every_case(fuzz_server):
    assert len(CASES) >= 400, f"only {len(CASES)} cases ran"
    numeric = [k for bias in BIASED for k in bias if str(k).isdigit()]
    assert len(numeric) >= 10, f"only {len(numeric)} numeric logit_bias keys were sent"
    print(f"{len(CASES)} cases, {len(BIASED)} with logit_bias ({len(numeric)} numeric keys)")
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json={"prompt": "It is", "max_tokens": 2})
    assert r.status_code == 200 and httpx.get(f"{fuzz_server.url}/health").status_code == 200
