"""What every program under ``pipelines/`` shares on its command line.

* :class:`UsageError`: a user's mistake, reported as one line on stderr with exit code 2
  (never a traceback); the message names the argument and the fix.
* :class:`OneLineParser`: argparse, but a bad argument is one line too (argparse's own
  usage block is what ``--help`` is for).
* :class:`DefaultsFormatter`: ``--help`` shows each default once (help texts that already
  say their default are left alone; ``None`` defaults are not printed).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["UsageError", "OneLineParser", "DefaultsFormatter", "report_usage_error"]


class UsageError(ValueError):
    """Bad input from the user: ``str(e)`` is the whole, one-line message.

    The one user-error type of every program: the more specific kinds (a training
    config, a model, a data set, a scenarios file) subclass it, so each command catches this
    one class and prints one line."""


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text.lower() or d is None or d is False or d is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse calls this for every bad argument
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report_usage_error(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    return 2
