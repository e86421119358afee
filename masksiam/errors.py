"""User errors: a wrong command line, config, data set or checkpoint. Every command-line entry point
prints their message on one line and exits with their code, without a traceback; anything else is a
bug and keeps its traceback.

    exit 2   the command or config is wrong (unknown flag, key, method, recipe or arch; a value out of range)
    exit 1   the run could not go on: missing or corrupt data, a foreign or unreadable checkpoint, a
             failed write (disk full), a folder that cannot be created, too many non-finite losses or
             bad images

An entry point is `exit_on_user_error(prog, main)` under `if __name__ == "__main__"`, or a `main`
decorated with `@command(prog)` (then an in-process caller sees the same: the line on stderr and a
SystemExit); its parser is `ArgumentParser` below, so that a bad flag ends the same way.
"""
from __future__ import annotations

import argparse
import functools
import sys


class UserError(Exception):
    exit_code = 1


class UsageError(UserError, ValueError):
    """The command line is wrong: an unknown flag, a missing argument, a value out of its range."""
    exit_code = 2


class UserExit(SystemExit):
    """How a command ends on a user error: SystemExit(exit code) after its line was printed. str() is
    that line, so an in-process caller (a test, bench.py running train.main) can read what the user saw."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line naming the flag (and where --help is), exit 2,
    instead of the usage block argparse prints. Sub-command parsers inherit it."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _os_error_line(err: OSError) -> str:
    """'cannot use runs/x: Not a directory' for a file-system error on a path the user gave."""
    where = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
    return f"cannot use {where}: {err.strerror or err}"


def exit_on_user_error(prog: str, fn, *args, **kwargs):
    """fn(*args, **kwargs); a UserError ends the process with `prog: error: message` and its exit code.

    An OSError that names a file (an out_dir under a regular file, a read-only folder, a full disk)
    is the user's environment, not a bug: it ends the same way with exit 1. One without a file name
    keeps its traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        line, code = f"{prog}: error: {err}", err.exit_code
    except OSError as err:
        if err.filename is None:
            raise
        line, code = f"{prog}: error: {_os_error_line(err)}", 1
    print(line, file=sys.stderr, flush=True)
    raise UserExit(code, line) from None


def command(prog: str):
    """Decorator for an entry point's main(argv): a user error ends it as exit_on_user_error does."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            return exit_on_user_error(prog, main, *args, **kwargs)
        return run
    return wrap
