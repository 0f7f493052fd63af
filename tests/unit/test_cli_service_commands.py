"""featherweight.cli: the service commands (serve, worker, migrate) and the worker's Celery argv."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from featherweight import cli
from worker.celery_app import worker_argv


def test_parser_knows_the_service_commands_and_queue_names():
    parser = cli.build_parser()
    args = parser.parse_args(["worker", "--queue", "cpu-x86", "--queue", "gpu"])
    assert args.queue == ["cpu-x86", "gpu"] and args.handler is cli._worker
    args = parser.parse_args(["serve", "--port", "8001"])
    assert args.port == 8001 and args.host == "127.0.0.1" and args.queues is None
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--queue", "tpu"])
    with pytest.raises(SystemExit):
        parser.parse_args(["worker"])


def test_migrate_creates_the_schema_and_folders(fw_home):
    assert cli.main(["migrate"]) == 0
    engine = sa.create_engine(f"sqlite:///{fw_home / 'featherweight.db'}")
    try:
        assert {"jobs", "models", "artifacts", "job_events", "workers"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert (fw_home / "artifacts").is_dir() and (fw_home / "broker" / "messages").is_dir()


def test_serve_worker_takes_the_native_cpu_queue(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert cli.default_serve_queues() == ["cpu-arm"]
    from worker.pipeline import host

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(host, "probe_cuda_isolated", lambda: None)
    assert cli.default_serve_queues() == ["cpu-x86", "gpu"]
    # listed but unable to run a model (no driver, no device): no gpu queue
    monkeypatch.setattr(host, "probe_cuda_isolated", lambda: "CUDA failure 100: no CUDA-capable device is detected")
    assert cli.default_serve_queues() == ["cpu-x86"]


def test_worker_argv_is_json_prefork_one_queue(fw_home, monkeypatch):
    from core.settings import get_settings

    argv = worker_argv(["gpu"], get_settings(), hostname="w@h")
    assert argv[:1] == ["worker"]
    assert "--queues=gpu" in argv and "--pool=prefork" in argv and "--concurrency=1" in argv
    assert "--without-mingle" in argv  # filesystem broker: no broadcast-based startup sync
    monkeypatch.setenv("FEATHERWEIGHT_BROKER_URL", "redis://127.0.0.1:6379/0")
    get_settings.cache_clear()
    assert "--without-mingle" not in worker_argv(["cpu-x86"], get_settings(), hostname="w@h")


def test_worker_celery_config(fw_home):
    from worker.celery_app import create_app

    app = create_app()
    conf = app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert [q.name for q in conf.task_queues] == ["cpu-x86", "cpu-arm", "gpu"]
    assert "featherweight.run_job" in app.tasks


def test_a_worker_only_serves_queues_this_machine_can_run(monkeypatch, capsys):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert cli.queue_problem("cpu-x86", machine="x86_64") is None
    assert cli.queue_problem("cpu-arm", machine="aarch64") is None
    assert "needs a cpu-arm machine" in cli.queue_problem("cpu-arm", machine="x86_64")
    assert "CUDAExecutionProvider" in cli.queue_problem("gpu")
    from worker.pipeline import host

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(host, "probe_cuda_isolated", lambda: None)
    assert cli.queue_problem("gpu") is None
    # a listed provider is not proof: the startup probe must run a model on CUDA
    monkeypatch.setattr(host, "probe_cuda_isolated", lambda: "CUDAExecutionProvider cannot run a model here: libcudart.so.12 missing")
    assert "cannot run models on CUDA here: CUDAExecutionProvider cannot run a model here" in cli.queue_problem("gpu")
    assert cli.main(["worker", "--queue", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featherweight worker: queue 'gpu'") and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert cli.main(["worker", "--queue", "gpu"]) == 2
    assert "featherweight worker: queue 'gpu'" in capsys.readouterr().err


def test_this_cuda_less_host_refuses_a_gpu_worker_for_real(capsys):
    """No mocks: on a machine where CUDA cannot run (this CI host), the real startup probe refuses."""
    from worker.pipeline import host

    if host.probe_cuda_isolated() is None:
        pytest.skip("CUDA runs here: the refusal cannot be shown")
    assert cli.main(["worker", "--queue", "gpu"]) == 2
    assert "featherweight worker: queue 'gpu'" in capsys.readouterr().err
