"""The one exception type for bad user input: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (file, record, field, option); the message says which and why."""
