"""The ``featherweight`` console script: serve, worker, migrate, compress, and the client commands.

Each command imports what it needs when it runs, so ``featherweight --help`` stays quick and
``compress`` needs no server libraries. ``compress`` is implemented in ``featherweight.compress_cmd``
(``add_arguments(parser)`` and ``main(args) -> int``); submit/status/wait/download in
``featherweight.remote_cmds`` (``add_subcommands(subparsers)``).

``serve`` is the embedded default in one command: it migrates the database, prepares storage and the
broker folders, starts ONE Celery worker subprocess and the API (uvicorn) in this process. The worker
consumes the queue of this machine's native CPU target (cpu-x86 on x86_64, cpu-arm on aarch64), plus
``gpu`` when ONNX Runtime offers the CUDA provider here; ``--queues`` overrides that. A job for a
target no worker serves reports "waiting: no live worker on queue ..." instead of hanging silently.
SIGINT/SIGTERM stop the API and the worker; if the worker dies, the API stops too.

``keys create --tenant NAME`` prints a new API key once (stored as its sha256), ``keys revoke KEY_ID``
and ``keys list`` manage them; ``webhook-secret --tenant NAME`` prints the secret that tenant's
webhooks are signed with. They talk to the configured database directly (run them where the
service's settings are).

``worker`` refuses (exit status 2) a queue this machine cannot serve truthfully: ``gpu`` where a small
model does not run on ONNX Runtime's CUDA provider (proved at startup by running one, not by listing
providers), or the other CPU architecture's queue, whose timings would be wrong.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

from core.targets import QUEUES

log = logging.getLogger("featherweight.cli")
WORKER_STOP_SECONDS = 20


def _migrate(_: argparse.Namespace) -> int:
    prepare_service()
    print("database migrated; storage and broker ready", file=sys.stderr)
    return 0


def prepare_service() -> None:
    """Upgrade the database to head and make sure storage and broker folders exist."""
    import migrations
    from core.queue import ensure_broker_dirs
    from core.settings import get_settings
    from core.storage import S3Store, get_store

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    migrations.upgrade()
    store = get_store()
    if isinstance(store, S3Store):
        store.ensure_bucket()
    store.check()
    ensure_broker_dirs(settings)


def default_serve_queues() -> list[str]:
    from core.targets import Target, native_target
    from worker.pipeline import host

    queues = [native_target().value]
    try:
        import onnxruntime

        listed = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        listed = False
    # a listed provider is not proof: add gpu only where a model actually ran on CUDA
    if listed and host.probe_cuda_isolated() is None:
        queues.append(Target.GPU.value)
    return queues


def queue_problem(queue: str, machine: str | None = None) -> str | None:
    """Why this machine must not serve ``queue`` (its timings would be another target's), or None."""
    from core.targets import Target, native_target

    target = Target(queue)
    if target is Target.GPU:
        try:
            import onnxruntime
        except ImportError:
            return "queue 'gpu' needs onnxruntime-gpu (pip install 'featherweight[gpu]')"
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ("queue 'gpu' needs ONNX Runtime's CUDAExecutionProvider, which this machine does not offer "
                    "(pip install 'featherweight[gpu]' on a machine with an NVIDIA GPU)")
        from worker.pipeline import host

        # proof, not a listing: a small model must run on CUDA (in a child process, so that this
        # process, which forks the job processes, never holds a CUDA context)
        problem = host.probe_cuda_isolated()
        return None if problem is None else f"queue 'gpu' cannot run models on CUDA here: {problem}"
    native = native_target(machine)
    if target is not native:
        return f"queue {queue!r} needs a {queue} machine; this one is {native.value}"
    return None


def _worker(args: argparse.Namespace) -> int:
    from worker.celery_app import create_app, worker_argv

    problems = [p for p in (queue_problem(q) for q in args.queue) if p]
    if problems:
        print(f"featherweight worker: {'; '.join(problems)}", file=sys.stderr)
        return 2
    app = create_app()
    app.worker_main(worker_argv(args.queue))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    prepare_service()
    queues = args.queues or default_serve_queues()
    command = [sys.executable, "-m", "featherweight.cli", "worker"]
    for queue in queues:
        command += ["--queue", queue]
    worker = subprocess.Popen(command)
    print(f"featherweight: worker pid {worker.pid} on queues {', '.join(queues)}; "
          f"API on http://{args.host}:{args.port} (Swagger UI at /docs)", file=sys.stderr, flush=True)
    server = _server_class()(uvicorn.Config("api.main:app", host=args.host, port=args.port, log_level="info"))

    def watch_worker() -> None:
        code = worker.wait()
        if not server.should_exit:
            print(f"featherweight: the worker exited with status {code}; stopping", file=sys.stderr, flush=True)
            server.should_exit = True

    threading.Thread(target=watch_worker, name="watch-worker", daemon=True).start()
    try:
        server.run()
    finally:
        server.should_exit = True
        stop_process(worker)
    return 0 if worker.returncode in (0, -signal.SIGTERM, -signal.SIGINT) else 1


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a captured SIGINT/SIGTERM is not re-raised after shutdown:
        serve still has its worker to stop, and then exits normally."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (a warm shutdown for Celery), then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _keys_create(args: argparse.Namespace) -> int:
    from core.db import session_scope
    from core.repos import TenantRepo

    with session_scope() as session:
        created = TenantRepo(session).create_key(args.tenant)
    print(f"key id:  {created.key_id}\ntenant:  {created.tenant}\napi key: {created.key}\n"
          "(the key is shown only now; it is stored hashed)", flush=True)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from core.db import session_scope
    from core.errors import NotFound
    from core.repos import TenantRepo

    try:
        with session_scope() as session:
            revoked = TenantRepo(session).revoke(args.key_id)
    except NotFound as exc:
        print(f"featherweight keys revoke: {exc.detail}", file=sys.stderr)
        return 2
    print(f"key {args.key_id} {'revoked' if revoked else 'was already revoked'}")
    return 0


def _keys_list(_: argparse.Namespace) -> int:
    from core.db import session_scope
    from core.repos import TenantRepo

    with session_scope() as session:
        rows = TenantRepo(session).keys()
        print(f"{'KEY ID':<18}{'TENANT':<24}{'CREATED':<27}REVOKED")
        for key, tenant in rows:
            revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-"
            print(f"{key.id:<18}{tenant:<24}{key.created_at.isoformat(timespec='seconds'):<27}{revoked}")
    return 0


def _webhook_secret(args: argparse.Namespace) -> int:
    from core.db import session_scope
    from core.errors import NotFound
    from core.models import DEFAULT_TENANT
    from core.repos import TenantRepo
    from core.settings import get_settings

    settings = get_settings()
    if args.tenant == DEFAULT_TENANT and settings.webhook_secret:
        print(settings.webhook_secret)
        return 0
    try:
        with session_scope() as session:
            print(TenantRepo(session).by_name(args.tenant).webhook_secret)
    except NotFound as exc:
        print(f"featherweight webhook-secret: {exc.detail}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featherweight", description="Compression as a service for ONNX models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log each HTTP request the command makes")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="API and one worker on the embedded default (or the configured stack)")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    serve.add_argument("--queues", nargs="+", choices=QUEUES, help="queues the worker consumes (default: native CPU target, plus gpu when CUDA is available)")
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="a Celery worker for one or more target queues")
    worker.add_argument("--queue", action="append", choices=QUEUES, required=True, help="repeat for several queues")
    worker.set_defaults(handler=_worker)

    migrate = commands.add_parser("migrate", help="upgrade the database to the latest schema; create the bucket")
    migrate.set_defaults(handler=_migrate)

    keys = commands.add_parser("keys", help="API keys of tenants (stored hashed; a key is printed once)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key for a tenant (the tenant too, if new)")
    create.add_argument("--tenant", required=True)
    create.set_defaults(handler=_keys_create)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)
    key_commands.add_parser("list", help="key ids, tenants, creation and revocation times").set_defaults(handler=_keys_list)

    secret = commands.add_parser("webhook-secret", help="print the secret a tenant's webhooks are signed with")
    secret.add_argument("--tenant", default="default")
    secret.set_defaults(handler=_webhook_secret)

    if importlib.util.find_spec("featherweight.compress_cmd") is not None:
        compress_cmd = importlib.import_module("featherweight.compress_cmd")
        compress = commands.add_parser("compress", help="compress a model locally, no server")
        compress_cmd.add_arguments(compress)
        compress.set_defaults(handler=compress_cmd.main)
    importlib.import_module("featherweight.dataset_cmd").add_subcommands(commands)
    if importlib.util.find_spec("featherweight.remote_cmds") is not None:
        importlib.import_module("featherweight.remote_cmds").add_subcommands(commands)
    return parser


# Libraries that log every request at INFO: their lines would land between a command's own progress
# lines, so they speak only with -v.
CHATTY_LOGGERS = ("httpx", "httpcore")


def configure_logging(verbose: bool) -> None:
    """Our own INFO lines on stderr; the HTTP libraries' request lines only when ``verbose``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(bool(getattr(args, "verbose", False)))
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
