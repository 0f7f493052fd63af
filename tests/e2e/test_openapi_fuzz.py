"""schemathesis against /openapi.json (in process, the embedded default): no 5xx, responses match the schema.

Needs the dev dependency schemathesis; without it the module is skipped (see the README's dev extra).
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402 - after the importorskip above

from tests.conftest import reset_service_caches  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import os

    import migrations
    from api.main import create_app

    saved = {k: v for k, v in os.environ.items() if k.startswith("FEATHERWEIGHT_")}
    for key in saved:
        del os.environ[key]
    os.environ["FEATHERWEIGHT_HOME"] = str(tmp_path_factory.mktemp("fw-fuzz"))
    reset_service_caches()
    migrations.upgrade()
    try:
        yield create_app()
    finally:
        del os.environ["FEATHERWEIGHT_HOME"]
        os.environ.update(saved)
        reset_service_caches()


def test_no_server_errors_and_responses_match_the_schema(app):
    from hypothesis import given
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tested, failures = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case) -> None:
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

        tested.append(operation.label)
        try:
            fuzz()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {str(exc)[:2000]}")
    assert len(tested) >= 15
    assert failures == []
