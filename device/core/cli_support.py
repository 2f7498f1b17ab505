"""What both command-line programs share: error handling, JSON output, version, logging.

Bad input must end in a one-line ``error: ...`` and a distinct exit code, never a
traceback; :func:`run_app` is the single place that turns exceptions into exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import typer
from rich.console import Console

from edgefleet.device.core.errors import EdgefleetError

__all__ = [
    "console",
    "edgefleet_version",
    "err_console",
    "print_json",
    "root_app",
    "run_app",
    "version_callback",
]

console = Console()
err_console = Console(stderr=True)


def edgefleet_version() -> str:
    """Installed version of the ``edgefleet`` distribution."""
    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0+unknown"


def version_callback(value: bool) -> None:
    """Typer callback for ``--version``."""
    if value:
        typer.echo(f"edgefleet {edgefleet_version()}")
        raise typer.Exit()


def _plain_help_texts() -> None:
    """Help texts are plain text: Typer parses them as Rich markup, which swallowed every
    bracketed word ("Fleet home folder [default: ...]" printed as "Fleet home folder .",
    "an [ingest] table" as "an  table"). Rich still draws the panels."""
    import inspect

    from rich.text import Text
    from typer import rich_utils

    original = rich_utils._make_rich_text
    if getattr(original, "plain", False):
        return

    def plain(*, text: str, style: str = "", markup_mode: Any) -> Any:
        if markup_mode == rich_utils.MARKUP_MODE_RICH:
            return rich_utils.highlighter(Text(inspect.cleandoc(text), style=style))
        return original(text=text, style=style, markup_mode=markup_mode)

    plain.plain = True  # type: ignore[attr-defined]
    setattr(rich_utils, "_make_rich_text", plain)  # noqa: B010


def root_app(name: str, help: str, about: str) -> typer.Typer:
    """A top-level CLI (``edgefleet``, ``edgefleet-agent``): ``-h``, ``--version``, no
    pretty tracebacks (errors are one line), help when called without arguments, help
    texts shown as written (no Rich markup)."""
    _plain_help_texts()
    app = typer.Typer(name=name, help=help, no_args_is_help=True,
                      pretty_exceptions_enable=False,
                      context_settings={"help_option_names": ["-h", "--help"]})

    def _root(version: bool = typer.Option(False, "--version", callback=version_callback,
                                           is_eager=True,
                                           help="Print the version and exit.")) -> None:
        pass

    _root.__doc__ = about
    app.callback()(_root)
    return app


def print_json(obj: Any) -> None:
    """One JSON object on stdout, for scripts (no colour, no wrapping)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def _quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=os.environ.get("EDGEFLEET_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # onnxruntime.quantization logs advice through the root logger at WARNING.
    logging.getLogger().setLevel(os.environ.get("EDGEFLEET_LOG", "ERROR").upper())


def run_app(app: typer.Typer) -> None:
    """Run a Typer app; :class:`EdgefleetError` becomes ``error: ...`` and its exit code.

    SIGINT always means "stop": a shell starts background jobs (``cmd &`` in a script)
    with SIGINT ignored, and Python then never raises KeyboardInterrupt, so ``kill -INT``
    from a supervisor (the demo stopping its simulators, a test) would be lost.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _quiet_libraries()
    try:
        app()
    except EdgefleetError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
