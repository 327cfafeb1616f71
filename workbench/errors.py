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


def database_locked(error: BaseException) -> bool:
    """True when `error` (or what caused it) is SQLite's "database is locked": another process held a
    store (MLflow's or Optuna's) longer than the wait. Not a bug: the CLI says so in one line."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if "database is locked" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
