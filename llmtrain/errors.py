"""The one error type for mistakes a user can cause (recipe, data, checkpoint, launch), and how a
command reports it: a short message, no traceback, exit code 2.
"""

import functools
import sys


class UserError(Exception):
    """A problem the user can fix; the message names the field/file/flag and what to do."""

    exit_code = 2


def user_errors(command):
    """Wrap a command: a UserError is printed as plain text (never read as markup: paths and values
    may hold brackets) on stderr, and the command exits with code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            # undecodable bytes from the command line (surrogate escapes) shown as \udcff, not a crash
            text = str(e).encode("utf-8", "backslashreplace").decode("utf-8")
            print(f"error: {text}", file=sys.stderr, flush=True)
            raise SystemExit(UserError.exit_code) from None

    return wrapper


def problems_error(where: str, problems: list[str]) -> UserError:
    """One UserError for every problem found in `where` (a file, a flag): one line for one problem,
    a list for several."""
    if len(problems) == 1:
        return UserError(f"{where}: {problems[0]}")
    return UserError(f"{where}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
