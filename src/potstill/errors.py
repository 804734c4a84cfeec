"""The one exception type for user mistakes.

Anything raised as `UserError` is printed by the CLI as a single line on stderr (no traceback) and
the process exits with status 2. Messages name the file, line, field or option and what was expected.
"""


class UserError(Exception):
    """A mistake in the user's input (file, option, config value): reported in one line."""
