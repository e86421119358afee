"""User errors: a wrong config, data set or checkpoint. The command-line entry points print their
message on one line and exit with their code, without a traceback; anything else is a bug and keeps
its traceback.

    exit 2   the command or config is wrong (unknown key, method, recipe or arch; a value out of range)
    exit 1   the run could not go on: missing or corrupt data, a foreign or unreadable checkpoint, a
             failed write (disk full), too many non-finite losses or bad images
"""
from __future__ import annotations

import sys


class UserError(Exception):
    exit_code = 1


def exit_on_user_error(prog: str, fn, *args, **kwargs):
    """fn(*args, **kwargs); a UserError ends the process with `prog: message` and its exit code."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
