"""The one ``waferlab`` command: each package registers its own subcommands here.

Heavy libraries (torch, matplotlib) are imported inside the handlers, so ``--help`` stays instant.
A :class:`~waferlab.errors.WaferlabError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from waferlab import __version__
from waferlab.errors import WaferlabError

# Modules that define ``register(subparsers)``; each adds its own subcommands.
COMMAND_MODULES = (
    "waferlab.data.commands",
    "waferlab.models.commands",
    "waferlab.engine.commands",
    "waferlab.explain.commands",
    "waferlab.deploy.commands",
    "waferlab.study.commands",
    "waferlab.demo",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """Build the full parser with every registered subcommand."""
    parser = _Parser(
        prog="waferlab",
        description="Train, compare, explain and deploy wafer-map defect-pattern classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"waferlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a package not built yet registers nothing
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:  # a command group called without its subcommand
        args.parser.print_help(sys.stderr)
        return 2
    previous = _on_sigterm_raise()
    try:
        result = handler(args)
    except WaferlabError as exc:
        sys.stderr.write(f"waferlab: error: {exc}\n")
        return 2
    except Terminated:
        sys.stderr.write("waferlab: terminated\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("waferlab: interrupted\n")
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at interpreter exit
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(result or 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler stopping the job) raised in the main thread, so that atomic outputs remove
    their temporary files as on Ctrl-C (the default handler kills the process without any cleanup)."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated()


def _on_sigterm_raise() -> Any:
    """Install the SIGTERM handler (main thread only); returns the previous one, or None if not installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
