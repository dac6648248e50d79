"""A missing server fails the integration tests under CI and skips them elsewhere."""
import pytest

from tests.support.servers import unavailable


def test_missing_server_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="unavailable under CI"):
        unavailable("no PostgreSQL")


def test_missing_server_skips_on_a_laptop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        unavailable("no PostgreSQL")
