"""The error types every entry point of ith-jax shares, one per exit status.

- `UserError` (exit 2): bad input (a file, a row, a config key, a path).  The message is one line that names
  the file, row, field or key and what was expected.  Subclasses (`ManifestError`, `CacheError`) only say
  which contract was broken; entry points treat them alike.
- `TrainingDiverged` (exit 3): the loss or the parameters became NaN/Inf; nothing non-finite was saved.
- `OSError` (exit 1) stays Python's own: `run_main` prints it as one line with the path.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input: a one-line message naming the file, row, field and what was expected.  Exit status 2."""

    exit_code = 2


class TrainingDiverged(Exception):
    """The loss or the parameters stopped being finite.  Exit status 3."""

    exit_code = 3


def describe_os_error(error: OSError) -> str:
    """``'<path>: <reason>'`` for an OSError (``'<reason>'`` when it names no path)."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [p for p in (error.filename, getattr(error, "filename2", None)) if p is not None]
    return f"{' -> '.join(str(p) for p in paths)}: {reason}" if paths else reason


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs an entry point's ``main`` and turns the shared error types into one line on stderr + exit status."""
    try:
        return int(main(argv) or 0)
    except (UserError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
