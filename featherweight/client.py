"""The Python client other services use to talk to a Featherweight server (docs/rest.md).

Owns: uploading models and data sets (streamed, with progress and an end-to-end sha256 check),
submitting jobs, polling them with backoff that honours Retry-After, cancelling and listing them,
and downloading artifacts (streamed, checked against the server's sha256, written atomically).
Errors come back as typed exceptions mirroring the server's application/problem+json body.

It needs httpx and nothing of the service: it never imports core, api or worker, so another
service can vendor this one file. PyYAML is imported only when a recipe is given as a .yaml path.

    from featherweight.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as fw:
        model = fw.upload_model("model.onnx")
        job = fw.submit(model.id, "recipe.yaml", target="cpu-x86")
        job = fw.wait(job.id, timeout=3600, raise_on_failure=True)
        fw.download(job.id, "model", "model.int8.onnx")
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import httpx

__all__ = [
    "Client", "AsyncClient", "Job", "Artifact", "UploadedModel", "UploadedDataset", "JobPage", "Download",
    "FeatherweightClientError", "FeatherweightAPIError", "InvalidRequest", "Unauthorized", "NotFound",
    "Conflict", "ServerUnavailable", "JobFailed", "WaitTimeout", "ChecksumMismatch", "RecipeFileError",
    "load_recipe", "DEFAULT_SERVER", "TERMINAL_STATES",
]

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
# Per operation (connect, each read, each write), not per whole upload: a 2 GB upload is fine as
# long as no single chunk stalls for this long.
DEFAULT_TIMEOUT = 60.0
CHUNK_BYTES = 1 << 20
# wait() rides out a restart or a deploy; a server gone longer than this is reported.
OUTAGE_LIMIT = 300.0

ProgressCallback = Callable[[int, "int | None"], None]  # (bytes done, bytes in total or None)


# ---------------------------------------------------------------------------------- errors


class FeatherweightClientError(Exception):
    """Base of everything this client raises on purpose."""


class FeatherweightAPIError(FeatherweightClientError):
    """The server answered with an error (RFC 9457 problem+json), or could not be reached.

    ``status`` is the HTTP status (None when no answer came), ``errors`` the field-level faults as
    ``[{"loc": [...], "msg": "..."}]``, ``retry_after`` the seconds the server asked us to wait.
    """

    def __init__(self, status: int | None, type: str, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None, *, retry_after: float | None = None) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = list(errors or [])
        self.retry_after = retry_after
        super().__init__(self.message())

    def message(self) -> str:
        """One line for people: the detail, then each faulty field's path and message."""
        text = self.detail or self.title
        # Servers often put the first field's message in the detail already; do not repeat it.
        fields = [f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}"
                  for e in self.errors if isinstance(e, dict) and str(e.get("msg", "")) not in text]
        if fields:
            text += " (" + "; ".join(fields) + ")"
        return f"{text} [HTTP {self.status}]" if self.status else text


class InvalidRequest(FeatherweightAPIError):
    """400, 413 or 422: the request or an uploaded file was refused; ``errors`` names the fields."""


class Unauthorized(FeatherweightAPIError):
    """401 or 403: the API key is missing, wrong or revoked."""


class NotFound(FeatherweightAPIError):
    """404: no such model, data set, job or artifact (or it belongs to another tenant)."""


class Conflict(FeatherweightAPIError):
    """409: e.g. the job is not in a state that allows this, or an idempotent request is in flight."""


class ServerUnavailable(FeatherweightAPIError):
    """503/502/504, a refused connection or a timeout: try again later (see ``retry_after``)."""


class JobFailed(FeatherweightClientError):
    """``wait(..., raise_on_failure=True)`` saw the job end failed or cancelled."""

    def __init__(self, job: "Job") -> None:
        self.job = job
        error = job.error or {}
        reason = error.get("detail") or error.get("title") or error.get("message") or "no reason given"
        super().__init__(f"job {job.id} {job.state}: {reason}")


class WaitTimeout(FeatherweightClientError, TimeoutError):
    """``wait`` ran out of time; ``job`` is the last state seen (None if none was seen)."""

    def __init__(self, job_id: str, timeout: float, job: "Job | None") -> None:
        self.job_id, self.timeout, self.job = job_id, timeout, job
        seen = f" (last seen {job.state}, {job.progress:.0%})" if job else ""
        super().__init__(f"job {job_id} did not finish within {timeout:g} s{seen}")


class ChecksumMismatch(FeatherweightClientError):
    """The bytes received (or stored by the server) do not hash to the sha256 they should."""


class RecipeFileError(FeatherweightClientError, ValueError):
    """A recipe file that cannot be read or parsed; the message names the file."""


_ERROR_BY_STATUS: dict[int, type[FeatherweightAPIError]] = {
    400: InvalidRequest, 413: InvalidRequest, 422: InvalidRequest, 401: Unauthorized, 403: Unauthorized,
    404: NotFound, 409: Conflict, 502: ServerUnavailable, 503: ServerUnavailable, 504: ServerUnavailable,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds to wait: either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from_response(response: httpx.Response) -> FeatherweightAPIError:
    """The typed error for a non-2xx response; the body has been read."""
    status = response.status_code
    cls = _ERROR_BY_STATUS.get(status, FeatherweightAPIError)
    body: Any = None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and ("title" in body or "detail" in body or "type" in body):
        errors = body.get("errors") if isinstance(body.get("errors"), list) else []
        return cls(status, str(body.get("type") or "about:blank"), str(body.get("title") or response.reason_phrase),
                   str(body.get("detail") or body.get("title") or response.reason_phrase), errors,
                   retry_after=parse_retry_after(response.headers.get("Retry-After")))
    text = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
    return cls(status, "about:blank", response.reason_phrase or f"HTTP {status}",
               text or response.reason_phrase or f"HTTP {status}", [],
               retry_after=parse_retry_after(response.headers.get("Retry-After")))


def error_from_transport(exc: httpx.TransportError, base_url: str) -> ServerUnavailable:
    if isinstance(exc, httpx.ConnectError):
        reason = str(exc) or "connection refused"
        return ServerUnavailable(None, "about:blank", "Server unreachable",
                                 f"cannot connect to {base_url}: {reason}")
    if isinstance(exc, httpx.TimeoutException):
        return ServerUnavailable(None, "about:blank", "Timed out",
                                 f"{base_url} did not answer in time ({type(exc).__name__})")
    return ServerUnavailable(None, "about:blank", "Transport error", f"talking to {base_url}: {exc}")


def _connection_never_made(exc: FeatherweightAPIError) -> bool:
    return exc.status is None and exc.title == "Server unreachable"


# ---------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Artifact:
    name: str
    bytes: int | None
    sha256: str | None
    content_type: str | None
    url: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Artifact":
        return cls(str(data.get("name", "")), data.get("bytes"), data.get("sha256"), data.get("content_type"),
                   data.get("url"))


@dataclass(frozen=True)
class Job:
    """A job as ``GET /v1/jobs/{id}`` shows it; ``raw`` keeps every field the server sent."""

    id: str
    state: str
    progress: float
    stage: str | None
    error: dict[str, Any] | None
    report: dict[str, Any] | None
    artifacts: list[Artifact]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Job":
        artifacts = data.get("artifacts") or []
        if isinstance(artifacts, Mapping):  # tolerate {name: {...}} as well as [{name, ...}]
            artifacts = [{"name": name, **(info or {})} for name, info in artifacts.items()]
        return cls(id=str(data["id"]), state=str(data.get("state", "")), progress=float(data.get("progress") or 0.0),
                   stage=data.get("stage"), error=data.get("error"), report=data.get("report"),
                   artifacts=[Artifact.from_json(a) for a in artifacts if isinstance(a, Mapping)], raw=dict(data))

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    def artifact(self, name: str) -> Artifact | None:
        wanted = {"model.onnx": "model"}.get(name, name)
        return next((a for a in self.artifacts if a.name == wanted), None)


@dataclass(frozen=True)
class UploadedModel:
    id: str
    sha256: str | None
    bytes: int | None
    params: int | None
    opset: int | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "UploadedModel":
        return cls(str(data["id"]), data.get("sha256"), data.get("bytes"), data.get("params"), data.get("opset"),
                   list(data.get("inputs") or []), list(data.get("outputs") or []), dict(data))


@dataclass(frozen=True)
class UploadedDataset:
    id: str
    arrays: list[dict[str, Any]]  # each {name, shape, dtype}
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "UploadedDataset":
        arrays = data.get("arrays") or []
        if isinstance(arrays, Mapping):
            arrays = [{"name": name, **(info or {})} for name, info in arrays.items()]
        return cls(str(data["id"]), list(arrays), dict(data))


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class Download:
    path: Path
    bytes: int
    sha256: str
    verified: bool  # True when the server gave a sha256 and the bytes matched it


# ---------------------------------------------------------------------------------- helpers


def load_recipe(recipe: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any] | str:
    """A recipe ready to send: a dict as is; a .json/.yaml/.yml path parsed; YAML/JSON text as text.

    Parsing here gives the person a local error naming the file; the server validates the content.
    """
    if isinstance(recipe, Mapping):
        return dict(recipe)
    if isinstance(recipe, str) and ("\n" in recipe or recipe.lstrip().startswith("{")):
        return recipe  # inline text; the server accepts JSON or YAML text
    path = Path(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeFileError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeFileError(f"{path}: cannot read the recipe: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise RecipeFileError(f"{path}: not valid JSON: {exc}") from None
    else:
        try:
            import yaml
        except ImportError:  # without PyYAML the server parses the text itself
            return text
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeFileError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(parsed, dict):
        raise RecipeFileError(f"{path}: a recipe is a mapping with 'steps', not {type(parsed).__name__}")
    return parsed


def with_export(recipe: dict[str, Any] | str, export: Sequence[str] | None) -> dict[str, Any] | str:
    """``recipe`` (as ``load_recipe`` returns it) with its ``export`` list replaced by ``export``
    (deploy formats: onnx, ort, tflite, pytorch); unchanged when ``export`` is None. Recipe text is
    parsed for it (JSON, or YAML with PyYAML installed)."""
    if export is None:
        return recipe
    if isinstance(recipe, str):
        try:
            parsed = json.loads(recipe)
        except ValueError:
            try:
                import yaml
            except ImportError:
                raise RecipeFileError("export= needs the recipe as a mapping, JSON text or (with PyYAML) YAML text") from None
            try:
                parsed = yaml.safe_load(recipe)
            except yaml.YAMLError as exc:
                raise RecipeFileError(f"the recipe text is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(parsed, dict):
            raise RecipeFileError("a recipe is a mapping with 'steps'")
        recipe = parsed
    return {**recipe, "export": list(export)}


def submit_body(model_id: str, recipe: Mapping[str, Any] | str | os.PathLike[str], target: str,
                calibration_dataset_id: str | None, eval_dataset_id: str | None,
                webhook_url: str | None, export: Sequence[str] | None = None,
                allow_target_mismatch: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model_id": model_id, "recipe": with_export(load_recipe(recipe), export), "target": target}
    if allow_target_mismatch:
        body["allow_target_mismatch"] = True
    # Optional fields are sent only when set: the server forbids unknown keys, and an absent key
    # keeps this client working against servers that predate data sets or webhooks.
    for key, value in (("calibration_dataset_id", calibration_dataset_id), ("eval_dataset_id", eval_dataset_id),
                       ("webhook_url", webhook_url)):
        if value is not None:
            body[key] = value
    return body


def expected_sha256(headers: httpx.Headers) -> str | None:
    """The sha256 the server vouches for: X-Checksum-SHA256, or RFC 9530 Repr-Digest/Content-Digest."""
    direct = headers.get("X-Checksum-SHA256")
    if direct and len(direct.strip()) == 64:
        return direct.strip().lower()
    for name in ("Repr-Digest", "Content-Digest", "Digest"):
        value = headers.get(name)
        if not value:
            continue
        for part in value.split(","):
            algorithm, _, encoded = part.strip().partition("=")
            if algorithm.strip().lower() in {"sha-256", "sha256"}:
                try:
                    return base64.b64decode(encoded.strip().strip(":")).hex()
                except (binascii.Error, ValueError):
                    return None
    return None


class _ProgressReader:
    """A binary file that reports bytes read and hashes them, for httpx's streamed multipart upload.

    ``fileno`` is passed through so httpx can learn the length and send a Content-Length rather
    than a chunked body; ``seek(0)`` (httpx rewinds before sending) restarts the count and the hash.
    """

    def __init__(self, file: BinaryIO, total: int | None, progress: ProgressCallback | None) -> None:
        self._file, self._total, self._progress = file, total, progress
        self.sent = 0
        self.hasher = hashlib.sha256()

    def fileno(self) -> int:
        return self._file.fileno()

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._file.seek(offset, whence)
        if position == 0:
            self.sent, self.hasher = 0, hashlib.sha256()
        return position

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        if chunk:
            self.sent += len(chunk)
            self.hasher.update(chunk)
            if self._progress is not None:
                self._progress(self.sent, self._total)
        return chunk


def _check_upload_digest(path: Path, reader: _ProgressReader, data: Mapping[str, Any]) -> None:
    server_sha = data.get("sha256")
    if isinstance(server_sha, str) and server_sha.lower() != reader.hasher.hexdigest():
        raise ChecksumMismatch(f"{path}: the server stored sha256 {server_sha}, the file sent was "
                               f"{reader.hasher.hexdigest()}")


def _artifact_destination(dest: str | os.PathLike[str], name: str, response: httpx.Response) -> Path:
    target = Path(dest)
    if target.is_dir():
        filename = {"model": "model.onnx"}.get(name, name)
        disposition = response.headers.get("Content-Disposition", "")
        if 'filename="' in disposition:
            filename = disposition.split('filename="', 1)[1].split('"', 1)[0] or filename
        filename = Path(filename).name  # basename only: the header must not pick a directory
        if filename in ("", ".", ".."):
            filename = {"model": "model.onnx"}.get(name, name)
        target = target / filename
    return target


class _AtomicWriter:
    """Bytes to a temporary file beside ``target``, renamed over it only once they check out."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        self.temp = Path(name)
        self.file = os.fdopen(handle, "wb")
        self.hasher = hashlib.sha256()
        self.written = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hasher.update(chunk)
        self.written += len(chunk)

    def commit(self, expected: str | None, declared_length: int | None, what: str) -> Download:
        self.file.close()
        if declared_length is not None and self.written != declared_length:
            raise ChecksumMismatch(f"{what}: received {self.written} bytes, the server announced {declared_length}")
        digest = self.hasher.hexdigest()
        if expected is not None and digest != expected.lower():
            raise ChecksumMismatch(f"{what}: sha256 {digest} does not match the server's {expected}")
        # mkstemp creates 0600; give the file the mode any other new file would get here.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.temp, 0o666 & ~umask)
        os.replace(self.temp, self.target)
        return Download(self.target, self.written, digest, expected is not None)

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length")
    # A compressed transfer changes the byte count httpx hands us; only trust identity lengths.
    if value and value.isdigit() and response.headers.get("Content-Encoding", "identity") == "identity":
        return int(value)
    return None


def _timeout(seconds: float) -> httpx.Timeout:
    # A host that never answers the TCP handshake should be reported in seconds, not a minute.
    return httpx.Timeout(seconds, connect=min(seconds, 10.0))


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "featherweight-client/0.1", "Accept": "application/json, application/problem+json"}
    if api_key:
        # Bearer: httpx drops Authorization on a redirect to another origin (a signed storage URL).
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _jobs_page(data: Any) -> JobPage:
    if isinstance(data, list):
        return JobPage([Job.from_json(j) for j in data], None)
    items = next((data[k] for k in ("items", "jobs", "data") if isinstance(data.get(k), list)), [])
    cursor = next((data[k] for k in ("next_cursor", "next", "cursor") if isinstance(data.get(k), str)), None)
    return JobPage([Job.from_json(j) for j in items], cursor)


def _list_params(state: str | None, limit: int | None, cursor: str | None) -> dict[str, Any]:
    return {k: v for k, v in (("state", state), ("limit", limit), ("cursor", cursor)) if v is not None}


class _Backoff:
    """Poll delays: ``initial`` doubling up to ``maximum``, never shorter than the server's Retry-After,
    never past the deadline."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.next, self.maximum = initial, maximum

    def delay(self, retry_after: float | None, remaining: float | None) -> float:
        delay = max(self.next, retry_after or 0.0)
        self.next = min(self.next * 2, self.maximum)
        return delay if remaining is None else max(0.0, min(delay, remaining))


class _Outage:
    """How long the server has been unavailable without a break, for ``wait``'s patience."""

    def __init__(self, limit: float, clock: Callable[[], float]) -> None:
        self.limit, self.clock, self.since = limit, clock, None

    def over(self) -> None:
        self.since = None

    def too_long(self) -> bool:
        now = self.clock()
        if self.since is None:
            self.since = now
        return now - self.since >= self.limit


class _Poll:
    """One ``wait()``: backoff, patience through outages, the deadline, the ETag and progress
    de-duplication. Client.wait and AsyncClient.wait share it, so both poll by the same rules and
    differ only in how they send and sleep."""

    def __init__(self, job_id: str, timeout: float | None, on_progress: Callable[[Job], None] | None, *,
                 poll_interval: float, max_interval: float, raise_on_failure: bool, outage_limit: float,
                 clock: Callable[[], float]) -> None:
        self.job_id, self.timeout, self.on_progress = job_id, timeout, on_progress
        self.raise_on_failure, self.clock = raise_on_failure, clock
        self.deadline = None if timeout is None else clock() + timeout
        self.backoff = _Backoff(poll_interval, max_interval)
        self.outage = _Outage(outage_limit, clock)
        self.job: Job | None = None
        self.etag: str | None = None
        self.seen: tuple[Any, ...] | None = None
        self.retry_after: float | None = None

    @property
    def path(self) -> str:
        return f"/v1/jobs/{self.job_id}"

    def headers(self) -> dict[str, str] | None:
        return {"If-None-Match": self.etag} if self.etag and self.job else None

    def answered(self, response: httpx.Response) -> None:
        if response.status_code != 304:
            self.job, self.etag = Job.from_json(response.json()), response.headers.get("ETag")
        self.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        self.outage.over()

    def unavailable(self, exc: ServerUnavailable) -> None:
        """The first look must succeed; after that, ride out an outage up to its limit and the deadline."""
        if self.job is None or self.outage.too_long() or (self.deadline is not None and self.clock() >= self.deadline):
            raise exc
        self.retry_after = exc.retry_after

    def finished(self) -> Job | None:
        """The job once it is done (after reporting progress), else None."""
        job = self.job
        if job is None:
            return None
        if self.on_progress is not None and (job.state, job.progress, job.stage) != self.seen:
            self.seen = (job.state, job.progress, job.stage)
            self.on_progress(job)
        if not job.done:
            return None
        if self.raise_on_failure and not job.succeeded:
            raise JobFailed(job)
        return job

    def next_delay(self) -> float:
        remaining = None if self.deadline is None else self.deadline - self.clock()
        if remaining is not None and remaining <= 0:
            raise WaitTimeout(self.job_id, self.timeout or 0.0, self.job)
        delay = self.backoff.delay(self.retry_after, remaining)
        self.retry_after = None
        return delay


# ---------------------------------------------------------------------------------- sync client


class Client:
    """A synchronous client. Use as a context manager, or call ``close()``.

    ``http`` lets a caller pass a configured ``httpx.Client`` (proxies, certificates, a test
    transport); its base URL is then the one used, and closing this client leaves it open. ``retries`` applies to reads, and to submits
    only when the request never reached the server or the server answered 503.
    """

    def __init__(self, base_url: str = DEFAULT_SERVER, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 *, retries: int = 2, http: httpx.Client | None = None) -> None:
        self.base_url = str(http.base_url) if http is not None else base_url.rstrip("/")
        self.retries = retries
        self._owns_http = http is None  # a caller's httpx.Client is the caller's to close
        self._http = http or httpx.Client(base_url=self.base_url, timeout=_timeout(timeout))
        self._http.headers.update(_headers(api_key))
        self._sleep: Callable[[float], None] = time.sleep
        self._clock: Callable[[], float] = time.monotonic

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # -- transport

    def _send(self, method: str, path: str, *, retry_reads: bool = True, **kwargs: Any) -> httpx.Response:
        attempts = (self.retries if retry_reads else 0) + 1
        backoff = _Backoff(0.5, 5.0)
        for attempt in range(attempts):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                error = error_from_transport(exc, self.base_url)
            else:
                if response.is_success or response.status_code == 304:
                    return response
                error = error_from_response(response)
            if not isinstance(error, ServerUnavailable) or attempt == attempts - 1:
                raise error
            self._sleep(backoff.delay(error.retry_after, None))
        raise AssertionError("unreachable: the loop returns or raises")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    # -- service

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def ready(self) -> dict[str, Any]:
        return self._json("GET", "/ready")

    def upload_model(self, path: str | os.PathLike[str], progress: ProgressCallback | None = None) -> UploadedModel:
        """Stream an .onnx (or a .zip with its external data) to ``POST /v1/models``."""
        return UploadedModel.from_json(self._upload("/v1/models", Path(path), progress))

    def upload_dataset(self, path: str | os.PathLike[str], progress: ProgressCallback | None = None) -> UploadedDataset:
        """Stream an .npz (docs/datasets.md) to ``POST /v1/datasets``."""
        return UploadedDataset.from_json(self._upload("/v1/datasets", Path(path), progress))

    def _upload(self, endpoint: str, path: Path, progress: ProgressCallback | None) -> dict[str, Any]:
        try:
            file = path.open("rb")
        except OSError as exc:
            raise FileNotFoundError(f"{path}: {exc.strerror or exc}") from None
        with file:
            reader = _ProgressReader(file, os.fstat(file.fileno()).st_size, progress)
            # Not retried: a body stream is sent once; the caller decides whether to upload again.
            data = self._json("POST", endpoint, retry_reads=False,
                              files={"file": (path.name, reader, "application/octet-stream")})
        _check_upload_digest(path, reader, data)
        return data

    def submit(self, model_id: str, recipe: Mapping[str, Any] | str | os.PathLike[str], target: str = "cpu-x86",
               calibration_dataset_id: str | None = None, eval_dataset_id: str | None = None,
               webhook_url: str | None = None, idempotency_key: str | None = None,
               export: Sequence[str] | None = None, allow_target_mismatch: bool = False) -> Job:
        """``POST /v1/jobs``. ``recipe`` is a dict, a .yaml/.json path, or YAML/JSON text;
        ``export`` (onnx, ort, tflite, pytorch) replaces the recipe's deploy formats.
        ``allow_target_mismatch``: run even where the target's hardware cannot (the report says so).

        An Idempotency-Key is always sent (a fresh one unless given), so a retried submit cannot
        create a second job on a server that honours it.
        """
        body = submit_body(model_id, recipe, target, calibration_dataset_id, eval_dataset_id, webhook_url, export,
                           allow_target_mismatch)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        try:
            return Job.from_json(self._json("POST", "/v1/jobs", json=body, headers=headers, retry_reads=False))
        except ServerUnavailable as exc:
            if not (_connection_never_made(exc) or exc.status == 503) or self.retries == 0:
                raise
        # The first attempt certainly created nothing; one more try after the server's hint.
        self._sleep(0.5)
        return Job.from_json(self._json("POST", "/v1/jobs", json=body, headers=headers, retry_reads=False))

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(self, state: str | None = None, limit: int | None = None, cursor: str | None = None) -> JobPage:
        """``GET /v1/jobs``, filtered by state, one page; pass ``next_cursor`` back for the next."""
        return _jobs_page(self._json("GET", "/v1/jobs", params=_list_params(state, limit, cursor)))

    def cancel(self, job_id: str) -> Job:
        """``POST /v1/jobs/{id}:cancel``; the job as it stands afterwards."""
        response = self._send("POST", f"/v1/jobs/{job_id}:cancel", retry_reads=False)
        data = response.json() if response.content else None
        return Job.from_json(data) if isinstance(data, dict) and "id" in data else self.get_job(job_id)

    def wait(self, job_id: str, timeout: float | None = None, on_progress: Callable[[Job], None] | None = None,
             *, poll_interval: float = 0.5, max_interval: float = 5.0, raise_on_failure: bool = False,
             outage_limit: float = OUTAGE_LIMIT) -> Job:
        """Poll until the job is succeeded, failed or cancelled; returns it.

        Delays double from ``poll_interval`` up to ``max_interval``, and are never shorter than the
        server's Retry-After. The first look at the job must succeed (with the usual retries), so a
        wrong URL or job id fails at once; after that a server that is unreachable or answers 503 is
        polled again, for up to ``outage_limit`` seconds in a row. ``on_progress`` is called with the
        job each time state, progress or stage changes. Raises WaitTimeout, ServerUnavailable, or
        JobFailed when ``raise_on_failure`` and the job did not succeed.
        """
        poll = _Poll(job_id, timeout, on_progress, poll_interval=poll_interval, max_interval=max_interval,
                     raise_on_failure=raise_on_failure, outage_limit=outage_limit, clock=self._clock)
        while True:
            try:
                poll.answered(self._send("GET", poll.path, retry_reads=poll.job is None, headers=poll.headers()))
            except ServerUnavailable as exc:
                poll.unavailable(exc)
            job = poll.finished()
            if job is not None:
                return job
            self._sleep(poll.next_delay())

    def download(self, job_id: str, name: str = "model", dest: str | os.PathLike[str] = ".",
                 progress: ProgressCallback | None = None) -> Download:
        """Stream artifact ``name`` (model, report.json, report.html, an export such as model.tflite) to ``dest`` (a file or a directory).

        The file appears only complete and checked: bytes go to a temporary file beside it, are
        hashed, compared with the server's sha256 (the response header, else the job's artifact
        list), and renamed into place. Raises ChecksumMismatch and leaves nothing on a mismatch.
        """
        path = f"/v1/jobs/{job_id}/artifacts/{name}"
        try:
            with self._http.stream("GET", path, follow_redirects=True) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
                target = _artifact_destination(dest, name, response)
                total = _content_length(response)
                expected = expected_sha256(response.headers)
                writer = _AtomicWriter(target)
                try:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        writer.write(chunk)
                        if progress is not None:
                            progress(writer.written, total)
                    if expected is None:
                        listed = self.get_job(job_id).artifact(name)
                        expected = listed.sha256 if listed else None
                    return writer.commit(expected, total, f"{name} of job {job_id}")
                except BaseException:
                    writer.discard()
                    raise
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.base_url) from None


# ---------------------------------------------------------------------------------- async client


class AsyncClient:
    """The same operations as ``Client`` for asyncio code, on ``httpx.AsyncClient``."""

    def __init__(self, base_url: str = DEFAULT_SERVER, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 *, retries: int = 2, http: httpx.AsyncClient | None = None) -> None:
        self.base_url = str(http.base_url) if http is not None else base_url.rstrip("/")
        self.retries = retries
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(base_url=self.base_url, timeout=_timeout(timeout))
        self._http.headers.update(_headers(api_key))
        self._sleep: Callable[[float], Any] = asyncio.sleep
        self._clock: Callable[[], float] = time.monotonic

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, method: str, path: str, *, retry_reads: bool = True, **kwargs: Any) -> httpx.Response:
        attempts = (self.retries if retry_reads else 0) + 1
        backoff = _Backoff(0.5, 5.0)
        for attempt in range(attempts):
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                error = error_from_transport(exc, self.base_url)
            else:
                if response.is_success or response.status_code == 304:
                    return response
                error = error_from_response(response)
            if not isinstance(error, ServerUnavailable) or attempt == attempts - 1:
                raise error
            await self._sleep(backoff.delay(error.retry_after, None))
        raise AssertionError("unreachable: the loop returns or raises")

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._send(method, path, **kwargs)).json()

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/health")

    async def ready(self) -> dict[str, Any]:
        return await self._json("GET", "/ready")

    async def upload_model(self, path: str | os.PathLike[str], progress: ProgressCallback | None = None) -> UploadedModel:
        return UploadedModel.from_json(await self._upload("/v1/models", Path(path), progress))

    async def upload_dataset(self, path: str | os.PathLike[str],
                             progress: ProgressCallback | None = None) -> UploadedDataset:
        return UploadedDataset.from_json(await self._upload("/v1/datasets", Path(path), progress))

    async def _upload(self, endpoint: str, path: Path, progress: ProgressCallback | None) -> dict[str, Any]:
        try:
            file = path.open("rb")
        except OSError as exc:
            raise FileNotFoundError(f"{path}: {exc.strerror or exc}") from None
        with file:
            reader = _ProgressReader(file, os.fstat(file.fileno()).st_size, progress)
            data = await self._json("POST", endpoint, retry_reads=False,
                                    files={"file": (path.name, reader, "application/octet-stream")})
        _check_upload_digest(path, reader, data)
        return data

    async def submit(self, model_id: str, recipe: Mapping[str, Any] | str | os.PathLike[str],
                     target: str = "cpu-x86", calibration_dataset_id: str | None = None,
                     eval_dataset_id: str | None = None, webhook_url: str | None = None,
                     idempotency_key: str | None = None, export: Sequence[str] | None = None,
                     allow_target_mismatch: bool = False) -> Job:
        body = submit_body(model_id, recipe, target, calibration_dataset_id, eval_dataset_id, webhook_url, export,
                           allow_target_mismatch)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        try:
            return Job.from_json(await self._json("POST", "/v1/jobs", json=body, headers=headers, retry_reads=False))
        except ServerUnavailable as exc:
            if not (_connection_never_made(exc) or exc.status == 503) or self.retries == 0:
                raise
        await self._sleep(0.5)
        return Job.from_json(await self._json("POST", "/v1/jobs", json=body, headers=headers, retry_reads=False))

    async def get_job(self, job_id: str) -> Job:
        return Job.from_json(await self._json("GET", f"/v1/jobs/{job_id}"))

    async def list_jobs(self, state: str | None = None, limit: int | None = None,
                        cursor: str | None = None) -> JobPage:
        return _jobs_page(await self._json("GET", "/v1/jobs", params=_list_params(state, limit, cursor)))

    async def cancel(self, job_id: str) -> Job:
        response = await self._send("POST", f"/v1/jobs/{job_id}:cancel", retry_reads=False)
        data = response.json() if response.content else None
        return Job.from_json(data) if isinstance(data, dict) and "id" in data else await self.get_job(job_id)

    async def wait(self, job_id: str, timeout: float | None = None, on_progress: Callable[[Job], None] | None = None,
                   *, poll_interval: float = 0.5, max_interval: float = 5.0, raise_on_failure: bool = False,
                   outage_limit: float = OUTAGE_LIMIT) -> Job:
        """As ``Client.wait``."""
        poll = _Poll(job_id, timeout, on_progress, poll_interval=poll_interval, max_interval=max_interval,
                     raise_on_failure=raise_on_failure, outage_limit=outage_limit, clock=self._clock)
        while True:
            try:
                poll.answered(await self._send("GET", poll.path, retry_reads=poll.job is None, headers=poll.headers()))
            except ServerUnavailable as exc:
                poll.unavailable(exc)
            job = poll.finished()
            if job is not None:
                return job
            await self._sleep(poll.next_delay())

    async def download(self, job_id: str, name: str = "model", dest: str | os.PathLike[str] = ".",
                       progress: ProgressCallback | None = None) -> Download:
        """As ``Client.download``."""
        path = f"/v1/jobs/{job_id}/artifacts/{name}"
        try:
            async with self._http.stream("GET", path, follow_redirects=True) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                target = _artifact_destination(dest, name, response)
                total = _content_length(response)
                expected = expected_sha256(response.headers)
                writer = _AtomicWriter(target)
                try:
                    async for chunk in response.aiter_bytes(CHUNK_BYTES):
                        writer.write(chunk)
                        if progress is not None:
                            progress(writer.written, total)
                    if expected is None:
                        listed = (await self.get_job(job_id)).artifact(name)
                        expected = listed.sha256 if listed else None
                    return writer.commit(expected, total, f"{name} of job {job_id}")
                except BaseException:
                    writer.discard()
                    raise
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.base_url) from None


# -- data sets from the files people have (needs the ``dataset`` extra; the HTTP client above does not)


def dataset_from_images(folder: str | os.PathLike[str], output: str | os.PathLike[str], *,
                        model: str | os.PathLike[str] | None = None, **options: Any):
    """Build an .npz from a folder of images, as ``featherweight dataset images`` does (docs/datasets.md).
    ``options`` are ``featherweight.dataset_files.ImageOptions`` fields (size, layout, channels, mean,
    std, scale, resize, input_name, labels, limit). Returns a ``BuiltDataset``; pass its ``path`` to
    ``Client.upload_dataset``. Raises ``DatasetBuildError`` naming a file it cannot read."""
    from featherweight import dataset_files

    return dataset_files.build_from_images(folder, output, model=model, options=dataset_files.ImageOptions(**options))


def dataset_from_audio(folder: str | os.PathLike[str], output: str | os.PathLike[str], *,
                       model: str | os.PathLike[str] | None = None, **options: Any):
    """Build an .npz from a folder of audio files (``AudioOptions``: sample_rate, length, hop, input_name,
    labels, limit), as ``featherweight dataset audio`` does."""
    from featherweight import dataset_files

    return dataset_files.build_from_audio(folder, output, model=model, options=dataset_files.AudioOptions(**options))


def dataset_from_text(text_file: str | os.PathLike[str], tokenizer_file: str | os.PathLike[str],
                      output: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None, **options: Any):
    """Build an .npz from text lines and a tokenizers JSON file (``TextOptions``: max_length, inputs,
    limit), as ``featherweight dataset text`` does."""
    from featherweight import dataset_files

    return dataset_files.build_from_text(text_file, tokenizer_file, output, model=model,
                                         options=dataset_files.TextOptions(**options))
