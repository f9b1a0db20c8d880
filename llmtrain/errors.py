"""The one error type for mistakes a user can cause (recipe, data, checkpoint, launch).

The CLI prints it as a short message, without a traceback, and exits with code 2.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the field/file/flag and what to do."""

    exit_code = 2
