"""The one exception type for bad input (a file, flag, model or data the user gave us).

The CLI turns it into a one-line message and exit status 2; anything else is a bug and keeps
its traceback. It is a ``ValueError`` so library callers that catch those keep working.
"""


class InputError(ValueError):
    """Bad input: the message names the file, line, layer or flag, and what would be valid."""
