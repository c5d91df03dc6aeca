"""A fuzz pass over the server's OpenAPI schema (schemathesis): the schema's examples and bodies
generated from every route's schema (valid and invalid ones) are sent to a real server process on the
embedded model, and every response must be free of server errors and match what /openapi.json
documents (status code, content type, body schema, headers). The number of examples is bounded and
the generation derandomised, so the pass is repeatable and fast."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from server_process import Server, running_server

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import checks  # noqa: E402

# schema-valid bodies the server rightly refuses (temperature -1, n 0) would fail
# positive_data_acceptance; every other response check applies
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    args = ["--max-model-len", "128", "--served-model-name", "smollm2"]
    with running_server(args, tmp_path_factory.mktemp("server") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(server: Server):
    loaded = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    # examples and fuzzing only, bounded by max_examples: the coverage phase's boundary cases number
    # in the hundreds per route and would outlast the time a test may take
    loaded.config.phases.coverage.enabled = False
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


def _fit_lengths(body) -> None:
    """Short generations: the fuzzer's integers are mostly large (each such request one more
    context_length_exceeded 400, never a generated reply), and a chat request without a limit would
    run to the end of the context."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 8:
            body[key] = value % 9
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 8


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_conform(case) -> None:
    _fit_lengths(case.body)
    case.call_and_validate(checks=CHECKS, timeout=30)
