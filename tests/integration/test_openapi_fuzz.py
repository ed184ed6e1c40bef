"""Schemathesis against the app's own /openapi.json: no 5xx, every error in the OpenAI envelope."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.engine

ENDPOINTS = r"^/v1/(completions|chat/completions|models|guidance)"


def test_api_never_fails_and_errors_use_the_envelope(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json").include(path_regex=ENDPOINTS)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 4

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            response = case.call(timeout=120)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
