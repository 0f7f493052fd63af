"""The CLI commands that talk to a Featherweight server: submit, status, wait, download (docs/cli.md).

Owns argument parsing for those four commands, progress display on stderr, ``--json`` output on
stdout and turning every failure into one ``featherweight: error: ...`` line. All HTTP goes through
``featherweight.client``; nothing here imports the service.

``featherweight.cli`` registers them with ``remote_cmds.add_subcommands(commands)``; each parser
sets ``handler`` to a function ``(args) -> exit status``.

Exit status: 0 done; 1 the job failed or was cancelled, timed out, or the server erred (5xx);
2 bad input (a missing file, a bad recipe, an unknown job, a refused request) or the server is
unreachable. Progress bars redraw in place only when stderr is a terminal; otherwise a line is
printed at each quarter of a transfer and each state, stage or tenth of job progress, so logs of
scripts and CI stay short.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

ENV_SERVER = "FEATHERWEIGHT_SERVER"
ENV_API_KEY = "FEATHERWEIGHT_API_KEY"
DEFAULT_SERVER = "http://127.0.0.1:8000"
TARGETS = ("cpu-x86", "cpu-arm", "gpu")
ARTIFACTS = ("model", "report.json", "report.html", "sensitivity.json", "candidate-1", "candidate-2", "candidate-3",
             "model.onnx.data", "model.ort", "model.required_operators_and_types.config", "model.pt",
             "model.state_dict.pt", "model.tflite")
# core.exports.FORMATS, restated: this module talks HTTP only and does not import the service
# (tests/unit/test_remote_cmds.py checks the two agree).
EXPORT_FORMATS = ("onnx", "ort", "tflite", "pytorch")
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class CommandError(Exception):
    """A fault found before or instead of talking to the server; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------- progress


def _mib(count: float) -> str:
    return f"{count / (1 << 20):.1f} MiB"


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, a few plain lines elsewhere."""

    BAR_WIDTH = 30
    REDRAW_SECONDS = 0.1

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self._last_draw = 0.0
        self._last_key: Any = None
        self._open_line = False

    def _bar(self, fraction: float) -> str:
        filled = int(round(self.BAR_WIDTH * min(max(fraction, 0.0), 1.0)))
        return "[" + "#" * filled + "-" * (self.BAR_WIDTH - filled) + "]"

    def _draw(self, text: str, *, final: bool) -> None:
        now = time.monotonic()
        if not final and now - self._last_draw < self.REDRAW_SECONDS:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        self.stream.flush()
        self._open_line = not final

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def transfer(self, label: str) -> Callable[[int, int | None], None]:
        """A (done, total) callback for an upload or download called ``label``."""
        self._last_key = None

        def update(done: int, total: int | None) -> None:
            if not self.enabled:
                return
            final = total is not None and done >= total
            if total:
                fraction = done / total
                text = f"{label} {self._bar(fraction)} {fraction:4.0%} {_mib(done)} / {_mib(total)}"
            else:
                fraction, text = 0.0, f"{label} {_mib(done)}"
            if self.tty:
                self._draw(text, final=final)
                return
            quarter = int(fraction * 4) if total else done >> 26  # quarters, or every 64 MiB unsized
            if quarter != self._last_key:
                self._last_key = quarter
                self._line(text)

        return update

    def job(self, job: Any) -> None:
        """An ``on_progress`` callback for ``Client.wait``."""
        if not self.enabled:
            return
        stage = f" {job.stage}" if job.stage and job.stage != job.state else ""
        text = f"job {job.id} {job.state}{stage}"
        if self.tty:
            self._draw(f"{self._bar(job.progress)} {job.progress:4.0%} {text}", final=job.done)
            return
        key = (job.state, job.stage, int(job.progress * 10))
        if key != self._last_key:
            self._last_key = key
            self._line(f"{text} {job.progress:.0%}")

    def close(self) -> None:
        """End a bar left mid-line (an error interrupted it) so the error starts on its own line."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


# ---------------------------------------------------------------------------------- arguments


def _common_arguments() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL",
                        help=f"the Featherweight server (default: ${ENV_SERVER}, else {DEFAULT_SERVER})")
    common.add_argument("--api-key", metavar="KEY", help=f"API key (default: ${ENV_API_KEY})")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    # SUPPRESS: given after the command or not at all, it leaves `featherweight -v submit` alone.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also log each HTTP request (method, URL, status) on stderr")
    return common


def add_subcommands(subparsers: Any) -> None:
    """Register submit, status, wait and download on the ``featherweight`` subparsers."""
    common = _common_arguments()

    submit = subparsers.add_parser("submit", parents=[common], help="upload a model and submit a job to a server",
                                   description="Upload MODEL.onnx (and data sets), submit a job, optionally wait.")
    submit.add_argument("model", metavar="MODEL.onnx", help="the ONNX model (or a .zip with external data)")
    submit.add_argument("--recipe", required=True, metavar="RECIPE.yaml", help="recipe, YAML or JSON (docs/recipes.md)")
    submit.add_argument("--calibration", metavar="CAL.npz", help="calibration data, .npz (docs/datasets.md)")
    submit.add_argument("--eval", dest="evaluation", metavar="EVAL.npz", help="evaluation data for the report")
    submit.add_argument("--target", default="cpu-x86", choices=TARGETS, help="where the model will run")
    submit.add_argument("--webhook-url", metavar="URL", help="POSTed to when the job ends")
    submit.add_argument("--export", type=parse_export_formats, metavar="FORMATS",
                        help="deploy formats, comma-separated: onnx, ort, tflite, pytorch (overrides the recipe's export)")
    submit.add_argument("--allow-target-mismatch", action="store_true",
                        help="run even where the target's hardware cannot (a gpu job without CUDA); the report says so")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    submit.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long")
    submit.add_argument("-o", "--output", metavar="OUT.onnx", help="wait, then download the compressed model here")
    submit.set_defaults(handler=run_submit)

    status = subparsers.add_parser("status", parents=[common], help="show a job's state, progress and report")
    status.add_argument("job_id", metavar="JOB_ID")
    status.set_defaults(handler=run_status)

    wait = subparsers.add_parser("wait", parents=[common], help="wait for a job to finish, showing progress")
    wait.add_argument("job_id", metavar="JOB_ID")
    wait.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    wait.set_defaults(handler=run_wait)

    download = subparsers.add_parser("download", parents=[common], help="download a job's artifact")
    download.add_argument("job_id", metavar="JOB_ID")
    download.add_argument("-o", "--output", required=True, metavar="OUT", help="file (or directory) to write")
    download.add_argument("--artifact", default="model", choices=ARTIFACTS, help="which artifact (default: model)")
    download.set_defaults(handler=run_download)


def parse_export_formats(text: str) -> list[str]:
    """``--export ort,tflite`` -> ["ort", "tflite"]; argparse reports a bad name (exit 2). Used by
    ``submit`` and by ``featherweight compress``."""
    formats = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [fmt for fmt in formats if fmt not in EXPORT_FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format {unknown[0]!r}; expected a comma-separated list of "
                                         f"{', '.join(EXPORT_FORMATS)}" if unknown else "give at least one format")
    return formats


# ---------------------------------------------------------------------------------- commands


def _client(args: argparse.Namespace):
    from featherweight.client import Client

    server = (args.server or os.environ.get(ENV_SERVER) or DEFAULT_SERVER).strip()
    if not server.startswith(("http://", "https://")):
        raise CommandError(f"--server {server!r}: not an http:// or https:// URL")
    api_key = args.api_key or os.environ.get(ENV_API_KEY) or None
    return Client(server, api_key=api_key)


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(enabled=not args.quiet)


def _existing_file(path: str, what: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"{path}: no such {what} file")
    return file


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _headline(report: dict[str, Any] | None) -> str:
    if not report:
        return ""
    parts = []
    emulated = bool((report.get("measured_on") or {}).get("emulated"))
    for key, label in (("size_ratio", "size"), ("transport_size_ratio", "transport"), ("latency_ratio", "latency")):
        value = report.get(key)
        if key == "latency_ratio" and emulated:
            parts.append("latency emulated (no figure)")    # qemu's timings say nothing about the target
        elif isinstance(value, (int, float)):
            parts.append(f"{label} {value:.2f}x")
    fidelity = report.get("fidelity") or {}
    if isinstance(fidelity.get("cosine"), (int, float)):
        parts.append(f"cosine {fidelity['cosine']:.4f}")
    accuracy = report.get("accuracy") or {}
    if isinstance(accuracy.get("original"), (int, float)) and isinstance(accuracy.get("compressed"), (int, float)):
        parts.append(f"accuracy {accuracy['original']:.2%} -> {accuracy['compressed']:.2%}")
    return ", ".join(parts)


def _job_error(job: Any) -> str:
    error = job.error or {}
    return str(error.get("detail") or error.get("title") or error.get("message") or "no reason given")


def _describe(job: Any) -> list[str]:
    stage = f" ({job.stage})" if job.stage and job.stage != job.state else ""
    lines = [f"job {job.id}: {job.state} {job.progress:.0%}{stage}"]
    if job.state in ("failed", "cancelled") and job.error:
        lines.append(f"  error: {_job_error(job)}")
    headline = _headline(job.report)
    if headline:
        lines.append(f"  report: {headline}")
    if job.report and job.report.get("target_match") is False and job.report.get("target_notice"):
        lines.append(f"  notice: {job.report['target_notice']}")
    for artifact in job.artifacts:
        size = f"{artifact.bytes:,} bytes" if isinstance(artifact.bytes, int) else "size unknown"
        lines.append(f"  artifact {artifact.name}: {size}, sha256 {artifact.sha256}")
    return lines


def _finish(args: argparse.Namespace, job: Any) -> int:
    """Print a finished job and give the exit status its state implies."""
    if args.json:
        _print_json(job.raw)
    else:
        print("\n".join(_describe(job)))
    if not job.succeeded:
        raise CommandError(f"job {job.id} {job.state}: {_job_error(job)}", EXIT_FAILED)
    return 0


def _wait(client: Any, job_id: str, timeout: float | None, progress: Progress) -> Any:
    return client.wait(job_id, timeout=timeout, on_progress=progress.job)


def _checked_recipe(path: Path, export: list[str] | None = None) -> Any:
    """The recipe read from ``path`` (with ``export`` in place of its own, when given), validated
    here when core.recipe is installed alongside.

    Checking before the upload saves sending a large model only to have the recipe refused, and
    lets the error name the file (docs/cli.md). The server validates again in any case.
    """
    from featherweight.client import RecipeFileError, load_recipe, with_export

    recipe = load_recipe(path)
    try:
        recipe = with_export(recipe, export)
    except RecipeFileError as exc:
        raise CommandError(f"{path}: {exc}") from None
    try:
        from core.errors import RecipeError
        from core.recipe import parse_recipe
    except ImportError:  # a client-only install: the server's 422 names the field instead
        return recipe
    try:
        parse_recipe(recipe)
    except RecipeError as exc:
        raise CommandError(f"{path}: {exc.detail}") from None
    return recipe


def _name_recipe_file(exc: Exception, path: str) -> None:
    """Prefix a server's recipe complaint with the recipe file's name."""
    errors = getattr(exc, "errors", None) or []
    if any(list(e.get("loc", []))[:2] == ["body", "recipe"] for e in errors if isinstance(e, dict)):
        raise CommandError(f"{path}: {exc}") from None


def submit(args: argparse.Namespace, progress: Progress) -> int:
    from featherweight.client import InvalidRequest

    model = _existing_file(args.model, "model")
    recipe = _checked_recipe(_existing_file(args.recipe, "recipe"), getattr(args, "export", None))
    calibration = _existing_file(args.calibration, "calibration data") if args.calibration else None
    evaluation = _existing_file(args.evaluation, "evaluation data") if args.evaluation else None
    with _client(args) as client:
        uploaded = client.upload_model(model, progress=progress.transfer(f"upload {model.name}"))
        calibration_id = eval_id = None
        if calibration is not None:
            calibration_id = client.upload_dataset(calibration, progress=progress.transfer(f"upload {calibration.name}")).id
        if evaluation is not None:
            eval_id = client.upload_dataset(evaluation, progress=progress.transfer(f"upload {evaluation.name}")).id
        try:
            job = client.submit(uploaded.id, recipe, target=args.target, calibration_dataset_id=calibration_id,
                                eval_dataset_id=eval_id, webhook_url=args.webhook_url,
                                allow_target_mismatch=args.allow_target_mismatch)
        except InvalidRequest as exc:
            _name_recipe_file(exc, args.recipe)
            raise
        if not (args.wait or args.output):
            if args.json:
                _print_json(job.raw)
            else:
                print(job.id)
                print(f"submitted job {job.id} ({job.state}); follow it with: featherweight wait {job.id}",
                      file=sys.stderr)
            return 0
        if not args.json:
            print(f"submitted job {job.id}", file=sys.stderr)
        job = _wait(client, job.id, args.timeout, progress)
        status = _finish(args, job)
        if args.output:
            result = client.download(job.id, "model", args.output, progress=progress.transfer("download model"))
            if not args.json:
                print(f"wrote {result.path} ({result.bytes:,} bytes)", file=sys.stderr)
        return status


def status(args: argparse.Namespace, progress: Progress) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
    if args.json:
        _print_json(job.raw)
    else:
        print("\n".join(_describe(job)))
    return 0


def wait(args: argparse.Namespace, progress: Progress) -> int:
    with _client(args) as client:
        return _finish(args, _wait(client, args.job_id, args.timeout, progress))


def download(args: argparse.Namespace, progress: Progress) -> int:
    with _client(args) as client:
        result = client.download(args.job_id, args.artifact, args.output,
                                 progress=progress.transfer(f"download {args.artifact}"))
    if args.json:
        _print_json({"path": str(result.path), "bytes": result.bytes, "sha256": result.sha256,
                     "verified": result.verified})
    else:
        check = "sha256 verified" if result.verified else "no sha256 from the server to check"
        print(f"wrote {result.path} ({result.bytes:,} bytes, {check})", file=sys.stderr)
    return 0


def _guarded(command: Callable[[argparse.Namespace, Progress], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; turn every expected failure into one error line and an exit status."""

    def run(args: argparse.Namespace) -> int:
        from featherweight.client import (
            ChecksumMismatch, FeatherweightAPIError, FeatherweightClientError, RecipeFileError, ServerUnavailable,
            WaitTimeout,
        )

        progress = _progress(args)
        try:
            return command(args, progress)
        except CommandError as exc:
            message, code = str(exc), exc.status
        except ServerUnavailable as exc:
            message, code = str(exc), EXIT_BAD_INPUT
            if exc.status is None:
                message += f" (is the server running? set --server or ${ENV_SERVER})"
        except FeatherweightAPIError as exc:
            # 4xx: the request was refused, i.e. bad input; 5xx: the server's own failure.
            message = str(exc)
            code = EXIT_BAD_INPUT if exc.status is not None and exc.status < 500 else EXIT_FAILED
        except (WaitTimeout, ChecksumMismatch) as exc:
            message, code = str(exc), EXIT_FAILED
        except (RecipeFileError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            message, code = str(exc), EXIT_BAD_INPUT
        except FeatherweightClientError as exc:
            message, code = str(exc), EXIT_FAILED
        except KeyboardInterrupt:
            progress.close()
            print("featherweight: interrupted", file=sys.stderr)
            return 130
        progress.close()
        print("featherweight: error: " + " ".join(message.split()), file=sys.stderr)
        return code

    run.__name__ = f"run_{command.__name__}"
    run.__doc__ = command.__doc__
    return run


run_submit = _guarded(submit)
run_status = _guarded(status)
run_wait = _guarded(wait)
run_download = _guarded(download)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the remote commands (tests, and ``python -m featherweight.remote_cmds``)."""
    parser = argparse.ArgumentParser(prog="featherweight")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
