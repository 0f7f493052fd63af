"""GET /health, GET /ready, /docs and /openapi.json."""
from __future__ import annotations



def test_health_answers_ok(api_client):
    response = api_client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_checks_database_broker_and_storage(api_client):
    response = api_client.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_ready_is_503_problem_when_storage_is_not_writable(api_client, fw_home):
    artifacts = fw_home / "artifacts"
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_text("a file where the artifact directory should be")
    response = api_client.get("/ready")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"].endswith("/unavailable")
    assert [e["loc"] for e in body["errors"]] == [["storage"]]
    assert response.headers["retry-after"]


def test_docs_serve_swagger_ui(api_client):
    response = api_client.get("/docs")
    assert response.status_code == 200
    assert "swagger-ui" in response.text.lower()


def test_openapi_describes_upload_as_multipart_with_a_file_field(api_client):
    spec = api_client.get("/openapi.json").json()
    body = spec["paths"]["/v1/models"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"]
    assert schema["properties"]["file"] == {"type": "string", "format": "binary", "description": "an .onnx file, or a .zip of one .onnx and its external-data files"}
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/artifacts/{name}", "/health", "/ready"} <= set(spec["paths"])


def test_unknown_route_is_a_problem(api_client):
    response = api_client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 404


def test_unexpected_exception_is_a_500_problem_without_internals(migrated):
    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app()

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal state")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "secret" not in response.text
    assert response.json()["type"].endswith("/internal-error")


def test_unreachable_database_is_503_with_retry_after(fw_home, monkeypatch, free_tcp_port):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.conftest import reset_service_caches

    monkeypatch.setenv("FEATHERWEIGHT_DATABASE_URL", f"postgresql+psycopg://nobody@127.0.0.1:{free_tcp_port}/none")
    reset_service_caches()
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        response = client.get("/v1/jobs/some-id")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["type"].endswith("/unavailable")
        ready = client.get("/ready")
        assert ready.status_code == 503 and ["database"] in [e["loc"] for e in ready.json()["errors"]]
