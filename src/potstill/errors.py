"""The one exception type for user mistakes.

Anything raised as `UserError` is printed by the CLI as a single line on stderr (no traceback) and
the process exits with status 2. Messages name the file, line, field or option and what was expected.
"""


class UserError(Exception):
    """A mistake in the user's input (file, option, config value): reported in one line."""


class Stopped(Exception):
    """A long job stopped on request (SIGTERM / SIGINT) after saving what a rerun of the same command resumes from.

    The CLI prints the message as one line and exits with `status` (128 + the signal number, as a shell reports a
    process killed by it).
    """

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
