"""The one exception type users see.

A `WorkbenchError` carries a single line that names the file (or device, or URI) and what is wrong with
it. The CLI prints it as `error: <line>` and exits non-zero; everything else is a bug and keeps its
traceback.
"""


class WorkbenchError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        assert "\n" not in message, "a WorkbenchError is one line"
        super().__init__(message)
