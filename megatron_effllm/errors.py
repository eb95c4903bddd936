"""User-facing errors: one clear line that names the problem and the fix, never a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, arguments).

    The message is shown as one line; it must say what is wrong and how to fix it.
    """


def cli_entry(main):
    """Decorate a CLI ``main`` so that a UserError prints one line and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            # Printed, not logged: this one unprefixed line on stderr is the command line's
            # contract (scripts and tests read it); a log record would carry the rank prefix.
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
