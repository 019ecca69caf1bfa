"""schemathesis against the live server's OpenAPI schema: generated requests, valid and invalid, never get a 5xx,
every answer is one the schema declares (status code, content type, body), and invalid requests are refused.

Bounded: a fixed derandomized seed and 40 examples per operation and mode (seconds on the tiny model)."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.serve.conftest import running

from tunelab.serve.app import ServeLimits

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]' (schemathesis)")
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode  # noqa: E402

CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 40


def served_model(case, use_real: bool):
    """Half the generated bodies name a real adapter, so generation itself is exercised, not only 404s (a model
    that is not a string stays: it may be what makes a negative case invalid)."""
    if use_real and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "task00"
    return case


def checker(cases, url: str, statuses: list[int], checks: list):
    """A hypothesis test sending ``cases`` to ``url`` and running ``checks`` on each answer, recording status codes."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case):
        response = case.call_and_validate(base_url=url, checks=checks, timeout=60)
        statuses.append(response.status_code)

    return check


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_declared_answers_and_never_a_server_error(adapter_root, mode):
    limits = ServeLimits(max_prompt_tokens=128, max_tokens=8, max_body_bytes=50_000)
    with running(adapter_root, limits) as live:
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                                   "GET /v1/models", "GET /health"}
        checks = list(CONFORMANCE)
        if mode == GenerationMode.NEGATIVE:  # GET routes take no input to make invalid
            operations = [op for op in operations if op.method.upper() == "POST"]
            checks.append(negative_data_rejection)  # a request the schema forbids is refused (4xx)
        statuses: dict[str, list[int]] = {}
        for operation in operations:
            cases = st.tuples(operation.as_strategy(mode), st.booleans()).map(lambda pair: served_model(*pair))

            checker(cases, live.url, statuses.setdefault(operation.label, []), checks)()
        # whether random cases name a real adapter is luck; check the success path deterministically
        model = httpx.get(f"{live.url}/v1/models", timeout=60).json()["data"][0]["id"]
        ok = httpx.post(f"{live.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                        timeout=60)
        assert ok.status_code == 200, ok.text
    posts = [code for label, codes in statuses.items() if label.startswith("POST") for code in codes]
    assert len(posts) >= EXAMPLES  # the cases did reach the server
    assert all(code < 500 for codes in statuses.values() for code in codes)
