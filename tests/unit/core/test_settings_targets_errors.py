"""core.settings defaults and validation, core.targets, core.errors rendering."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.errors import FeatherweightError, InvalidModel, NotFound, PayloadTooLarge, RecipeError, Unavailable
from core.settings import Settings, get_settings
from core.targets import QUEUES, Target, native_target, queue_for


def test_embedded_defaults_live_under_home(fw_home):
    settings = get_settings()
    assert settings.home == fw_home
    assert settings.resolved_database_url == f"sqlite:///{fw_home / 'featherweight.db'}"
    assert settings.resolved_broker_url == "filesystem://"
    assert settings.broker_is_filesystem
    assert settings.resolved_artifacts_dir == fw_home / "artifacts"
    assert settings.storage == "local"
    assert get_settings() is settings


def test_full_stack_settings_from_environment(fw_home, monkeypatch):
    monkeypatch.setenv("FEATHERWEIGHT_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/fw")
    monkeypatch.setenv("FEATHERWEIGHT_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("FEATHERWEIGHT_STORAGE", "s3")
    monkeypatch.setenv("FEATHERWEIGHT_S3_BUCKET", "models")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    assert not settings.broker_is_filesystem
    assert settings.storage == "s3" and settings.s3_bucket == "models"
    assert settings.redis_visibility_timeout > settings.task_hard_time_limit


def test_soft_limit_must_be_below_hard_limit():
    with pytest.raises(ValidationError):
        Settings(task_soft_time_limit=10, task_hard_time_limit=10)


def test_production_refuses_default_s3_credentials():
    with pytest.raises(ValidationError, match="default S3 credentials"):
        Settings(env="production", storage="s3", s3_access_key_id="minioadmin", s3_secret_access_key="minioadmin")
    Settings(env="development", storage="s3", s3_access_key_id="minioadmin", s3_secret_access_key="minioadmin")


def test_targets_map_to_queues():
    assert QUEUES == ("cpu-x86", "cpu-arm", "gpu")
    assert queue_for(Target.GPU) == "gpu" and queue_for("cpu-arm") == "cpu-arm"
    with pytest.raises(ValueError):
        queue_for("tpu")
    assert native_target("x86_64") is Target.CPU_X86
    assert native_target("aarch64") is Target.CPU_ARM
    assert native_target("arm64") is Target.CPU_ARM


@pytest.mark.parametrize(("cls", "status"), [(RecipeError, 422), (InvalidModel, 422), (NotFound, 404),
                                             (PayloadTooLarge, 413), (Unavailable, 503)])
def test_errors_render_as_problems(cls, status):
    error = cls("what went wrong", [{"loc": ["steps", 0, "op"], "msg": "unknown op"}])
    problem = error.to_problem()
    assert isinstance(error, FeatherweightError)
    assert problem == {"type": cls.type, "title": cls.title, "status": status, "detail": "what went wrong",
                       "errors": [{"loc": ["steps", 0, "op"], "msg": "unknown op"}]}
    assert problem["type"].startswith("https://featherweight.dev/problems/")
