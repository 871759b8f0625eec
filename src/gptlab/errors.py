"""The one exception type for mistakes a user can fix (bad path, bad value, bad file).

Entry points catch it and print its message as a single line, then exit non-zero; any other
exception is a bug and keeps its traceback. Messages say what went wrong, where, and how to
fix it.
"""


class UserError(Exception):
    """A problem with the user's input, config or files, not with gptlab."""
