"""Bad input and how it is shown: the exception types, and `run_guarded`, which turns any of them into
one `error: ...` line on stderr and exit status 2 (no traceback)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (file, record, field, option); the message says which and why."""


class DataError(UserError):
    """A missing file or malformed record; the message starts with FILE:LINE."""


def run_guarded(fn: Callable[[], object]) -> None:
    """Run fn; bad input ends with one 'error: ...' line on stderr and exit status 2, Ctrl-C with 130."""
    from models import CheckpointError, ConfigError  # here, so the data workers import no torch

    try:
        fn()
    except (UserError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
