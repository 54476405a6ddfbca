"""The `vtcompile` command: thin commands over the API, one module per group (compile: optimize, calibrate, eval,
flops; run; info: passes, models, inspect; testbed). Arguments are checked before any model is loaded; every error
a user can fix is one line on stderr and a non-zero exit code; a flag that would be ignored is an error that says
what applies. Messages go through `logging` (stderr, "[vtcompile] ..."; --verbose adds debug messages, --quiet
keeps warnings and errors only and hides progress bars), never into stdout, where answers, tables and JSON go. A
closed stdout (`| head`) ends the command quietly with 141 (128 + SIGPIPE), Ctrl-C with 130 (128 + SIGINT), as
shells report commands killed by those signals."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import VtcompileError
from . import compile as compile_commands
from . import info, run, serve, testbed

EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130
COMMANDS = (compile_commands, run, serve, testbed, info)  # each module's register(subparsers) adds its commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtcompile",
        description="Visual-token pruning for multimodal LLMs as compiled graph passes: capture a multimodal model "
                    "with torch.export, rewrite the decoder graph with pruning passes, lower it to a backend, "
                    "generate over per-layer KV caches.")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="also print debug messages (on stderr)")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="print only warnings and errors on stderr, and no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test's capture, a redirected stream), not the one at set-up."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """vtcompile's messages on stderr as "[vtcompile] ...", from `level` up; one handler per process."""
    logger = logging.getLogger("vtcompile")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[vtcompile] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so that flushing it at exit raises nothing again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _testbed_train(argv: list[str]) -> list[str] | None:
    """The arguments of `vtcompile [-v|-q] testbed train ...` (its own parser), else None."""
    rest = [a for a in argv[:3] if a not in ("-v", "--verbose", "-q", "--quiet")]
    skipped = len(argv[:3]) - len(rest)
    return argv[2 + skipped:] if rest[:2] == ["testbed", "train"] else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        train_args = _testbed_train(argv)
        if train_args is not None:
            return testbed.train(train_args)
        args = build_parser().parse_args(argv)
        setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
        try:
            return args.func(args)
        except VtcompileError as exc:
            print(f"vtcompile: error: {exc}", file=sys.stderr)
            return exc.exit_code
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
    except BrokenPipeError:  # `vtcompile ... | head`: the reader has gone, which is no error of the command
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("vtcompile: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
