"""Shared fixtures: an isolated FEATHERWEIGHT_HOME, a migrated database, an API client, tiny ONNX models,
and the integration services (Postgres, Redis, a moto S3 server).

Integration fixtures read FEATHERWEIGHT_TEST_POSTGRES_URL and FEATHERWEIGHT_TEST_REDIS_URL. Without
them they use the local Postgres and Redis (LOCAL_SERVICES, as .ci/run starts them) when those answer;
otherwise the tests skip with one summary line saying how to run them, except under CI=true, where a
missing service is a failure, not a skip.
"""
from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

FEATHERWEIGHT_ENV = (
    "FEATHERWEIGHT_DATABASE_URL", "FEATHERWEIGHT_BROKER_URL", "FEATHERWEIGHT_STORAGE", "FEATHERWEIGHT_ARTIFACTS_DIR",
    "FEATHERWEIGHT_S3_ENDPOINT_URL", "FEATHERWEIGHT_S3_BUCKET", "FEATHERWEIGHT_S3_ACCESS_KEY_ID",
    "FEATHERWEIGHT_S3_SECRET_ACCESS_KEY", "FEATHERWEIGHT_S3_REGION", "FEATHERWEIGHT_ENV",
)


def reset_service_caches() -> None:
    """Forget every cached settings-derived object (settings, engine, store, Celery producer)."""
    from core import db, queue, settings, storage

    settings.get_settings.cache_clear()
    db.reset_engine()
    storage.get_store.cache_clear()
    if queue.get_producer.cache_info().currsize:
        queue.get_producer().close()
    queue.get_producer.cache_clear()


@pytest.fixture
def fw_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty FEATHERWEIGHT_HOME on the embedded default (SQLite, local artifacts, filesystem broker)."""
    home = tmp_path / "fw-home"
    for name in FEATHERWEIGHT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FEATHERWEIGHT_HOME", str(home))
    reset_service_caches()
    yield home
    reset_service_caches()


@pytest.fixture
def migrated(fw_home: Path) -> Path:
    import migrations

    migrations.upgrade()
    return fw_home


@pytest.fixture
def api_client(migrated: Path):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_tcp_port() -> int:
    """A loopback TCP port nothing listens on (at the time of asking)."""
    return free_port()


# --- tiny ONNX models built with onnx.helper --------------------------------------------------------

def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.1) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def build_mlp(inputs: int = 128, hidden: tuple[int, int] = (256, 128), classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """x[1, inputs] -> MatMul/Add/Relu x2 -> MatMul/Add -> logits[1, classes]."""
    rng = np.random.default_rng(seed)
    sizes = [inputs, *hidden, classes]
    nodes, inits, prev = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        inits += [_init(rng, f"fc{i}.weight", (fan_in, fan_out)), _init(rng, f"fc{i}.bias", (fan_out,))]
        nodes += [helper.make_node("MatMul", [prev, f"fc{i}.weight"], [f"mm{i}"], name=f"fc{i}.matmul"),
                  helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [f"fc{i}"], name=f"fc{i}.add")]
        prev = f"fc{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
    nodes.append(helper.make_node("Identity", [prev], ["logits"], name="out"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_cnn(seed: int = 1) -> onnx.ModelProto:
    """image[1, 3, 16, 16] -> Conv/Relu x2 -> GlobalAveragePool -> Flatten -> Gemm -> logits[1, 10]."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "conv1.weight", (16, 3, 3, 3)), _init(rng, "conv1.bias", (16,)),
        _init(rng, "conv2.weight", (32, 16, 3, 3)), _init(rng, "conv2.bias", (32,)),
        _init(rng, "fc.weight", (10, 32)), _init(rng, "fc.bias", (10,)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_dynamic_batch(seed: int = 2) -> onnx.ModelProto:
    """features[batch, 32] -> MatMul/Relu -> MatMul -> scores[batch, 8], with a symbolic batch axis."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w1", (32, 64)), _init(rng, "w2", (64, 8))]
    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["scores"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def weights_in_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every initializer moved into a Constant node, as paddle2onnx exports weights."""
    constants = [helper.make_node("Constant", [], [t.name], name=f"{t.name}.constant", value=t)
                 for t in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def onnx_models() -> SimpleNamespace:
    """Builders of the tiny models the service tests upload: mlp, cnn, dynamic_batch (each -> ModelProto);
    ``constants(model)`` moves a model's weights into Constant nodes."""
    return SimpleNamespace(mlp=build_mlp, cnn=build_cnn, dynamic_batch=build_dynamic_batch,
                           constants=weights_in_constants)


def require_torch():
    """``import torch`` for the tests of distill method kd: a skip without it, a failure under CI=true
    (where `make install` must have installed it; a skip there would hide the kd tests)."""
    if os.environ.get("CI", "").lower() == "true":
        try:
            import torch
        except ImportError as exc:
            pytest.fail(f"torch is required under CI=true (make install installs it): {exc}")
        return torch
    return pytest.importorskip("torch")


# --- integration services ---------------------------------------------------------------------------

# Where `make test` looks for the services when the variables are unset: the local Postgres and Redis
# that .ci/run starts (and uses with these same URLs).
LOCAL_SERVICES = {
    "FEATHERWEIGHT_TEST_POSTGRES_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    "FEATHERWEIGHT_TEST_REDIS_URL": "redis://127.0.0.1:6379/15",
}
SKIPPED_INTEGRATION = ("integration tests skipped: no Postgres / Redis answers on 127.0.0.1; start them and run "
                       "`make test` again, or run .ci/run, or set FEATHERWEIGHT_TEST_POSTGRES_URL and "
                       "FEATHERWEIGHT_TEST_REDIS_URL")


@functools.cache
def service_answers(url: str) -> bool:
    """Whether the Postgres or Redis at ``url`` accepts a connection (asked once per session)."""
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            return True
    except sa.exc.SQLAlchemyError:
        return False
    finally:
        engine.dispose()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Every skip for want of the integration services at one location, so that pytest's -ra
    summary prints them as one line (with their count) rather than one line per test."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and SKIPPED_INTEGRATION in str(report.longrepr[2]):
        report.longrepr = (str(Path(__file__)), service_url.__code__.co_firstlineno, report.longrepr[2])


def service_url(variable: str) -> str:
    """The variable's URL; unset, the local service's when it answers; else skip (fail under CI=true)."""
    url = os.environ.get(variable)
    if url:
        return url
    local = LOCAL_SERVICES[variable]
    if service_answers(local):
        return local
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{variable} is not set and nothing answers at {local} (CI=true: failing instead of skipping)")
    # One reason for every such test: pytest's -ra summary shows it as a single line.
    pytest.skip(SKIPPED_INTEGRATION)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database for this test, dropped afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    base = make_url(service_url("FEATHERWEIGHT_TEST_POSTGRES_URL"))
    name = f"fw_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield base.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def redis_url() -> str:
    """The test Redis database, flushed before the test."""
    import redis

    url = service_url("FEATHERWEIGHT_TEST_REDIS_URL")
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port, for the whole session; yields its URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_settings(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for the S3 backend on a fresh bucket of the moto server (set in os.environ too)."""
    values = {
        "FEATHERWEIGHT_STORAGE": "s3",
        "FEATHERWEIGHT_S3_ENDPOINT_URL": moto_server,
        "FEATHERWEIGHT_S3_BUCKET": f"fw-test-{uuid.uuid4().hex[:12]}",
        "FEATHERWEIGHT_S3_ACCESS_KEY_ID": "testing",
        "FEATHERWEIGHT_S3_SECRET_ACCESS_KEY": "testing",
        "FEATHERWEIGHT_S3_REGION": "us-east-1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def full_stack(fw_home: Path, postgres_url: str, redis_url: str, s3_settings: dict[str, str],
               monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings for Postgres + Redis + the S3 server (fresh database, flushed Redis db, fresh bucket),
    migrated and with the bucket created; returns the FEATHERWEIGHT_* environment for subprocesses."""
    env = {"FEATHERWEIGHT_HOME": str(fw_home), "FEATHERWEIGHT_DATABASE_URL": postgres_url,
           "FEATHERWEIGHT_BROKER_URL": redis_url, **s3_settings}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_service_caches()
    from featherweight.cli import prepare_service

    prepare_service()
    yield env
    reset_service_caches()
