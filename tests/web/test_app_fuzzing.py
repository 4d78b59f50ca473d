"""Schemathesis against the app's own /openapi.json, on a live loopback server with keys and limits
on: no request, however odd, gets a 5xx, and every answer (status, content type, body, headers) is
one the schema documents.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tutorial_api import create_app, start_server

pytestmark = pytest.mark.slow
KEY = "fuzzing-key"
APP = create_app(
    "tiny-qwen2",
    api_keys=[f"fuzzer:{KEY}"],
    max_new_tokens=8,
    max_history_turns=4,
    max_concurrent_per_key=2,
    request_timeout=30,
)
SCHEMA = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def server():
    server = start_server(APP, port=0, log_level="warning")
    yield server
    server.stop()


@SCHEMA.parametrize()
@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_and_only_documented_answers(case, server):
    # Not positive_data_acceptance: a schema cannot say "fits the model's context" or "within
    # max_new_tokens", so some schema-valid requests are rightly refused with a documented 4xx.
    case.call_and_validate(
        base_url=server.url,
        headers={"Authorization": f"Bearer {KEY}"},
        excluded_checks=[positive_data_acceptance],
    )
