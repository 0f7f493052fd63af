"""How the integration fixtures find Postgres and Redis: the variables, else the local services when
they answer, else one skip reason that says how to run them (a failure under CI=true); and the kd
tests' torch, a skip without it but a failure under CI=true."""
from __future__ import annotations

import pytest

from tests import conftest

VARIABLE = "FEATHERWEIGHT_TEST_REDIS_URL"


@pytest.fixture
def unset(monkeypatch: pytest.MonkeyPatch, free_tcp_port: int) -> str:
    """The variable unset, CI unset, and the local default pointed at a port nothing listens on."""
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.delenv("CI", raising=False)
    closed = f"redis://127.0.0.1:{free_tcp_port}/15"
    monkeypatch.setitem(conftest.LOCAL_SERVICES, VARIABLE, closed)
    return closed


def test_the_variable_wins(monkeypatch):
    monkeypatch.setenv(VARIABLE, "redis://elsewhere:6379/3")
    assert conftest.service_url(VARIABLE) == "redis://elsewhere:6379/3"


def test_unset_uses_the_local_service_when_it_answers(unset, monkeypatch):
    monkeypatch.setattr(conftest, "service_answers", lambda url: url == unset)
    assert conftest.service_url(VARIABLE) == unset


def test_unset_and_nothing_answering_skips_saying_how_to_run_them(unset):
    assert conftest.service_answers(unset) is False
    with pytest.raises(pytest.skip.Exception) as skipped:
        conftest.service_url(VARIABLE)
    message = str(skipped.value)
    assert message == conftest.SKIPPED_INTEGRATION
    assert ".ci/run" in message and "FEATHERWEIGHT_TEST_POSTGRES_URL" in message and "make test" in message


def test_the_skips_share_one_location_so_the_summary_prints_one_line():
    from types import SimpleNamespace

    locations = set()
    for test in ("tests/integration/a.py", "tests/integration/b.py"):
        report = SimpleNamespace(skipped=True, longrepr=(test, 12, "Skipped: " + conftest.SKIPPED_INTEGRATION))
        hook = conftest.pytest_runtest_makereport(item=None, call=None)
        next(hook)
        with pytest.raises(StopIteration):
            hook.send(SimpleNamespace(get_result=lambda report=report: report))
        locations.add(report.longrepr)
    assert len(locations) == 1 and next(iter(locations))[0].endswith("conftest.py")


def test_under_ci_nothing_answering_fails(unset, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        conftest.service_url(VARIABLE)


def test_a_missing_torch_skips_the_kd_tests_but_fails_them_under_ci(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ImportError
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        conftest.require_torch()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        conftest.require_torch()
