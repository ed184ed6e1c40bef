"""Schemathesis against the app's own /openapi.json: no 5xx, every error in the OpenAI envelope."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.engine

ENDPOINTS = r"^/v1/(completions|chat/completions|models|guidance)"


@pytest.fixture(scope="session")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json").include(path_regex=ENDPOINTS)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_errors_use_the_envelope(case):
    response = case.call(timeout=120)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
