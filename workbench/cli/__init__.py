"""The `workbench` command line: thin commands that parse, call one library function and render.

Each area's commands live in their own module and attach themselves to the one Typer app. Errors the
user can fix arrive as `WorkbenchError` and are printed as one line; the exit status is then 2.
"""

from __future__ import annotations

import sys

from workbench.cli._app import app
from workbench.cli import workspace as _workspace  # noqa: F401  (registers init, devices)
from workbench.cli import noise as _noise  # noqa: F401  (capture-noise, noise)
from workbench.cli import synth as _synth  # noqa: F401  (synth)
from workbench.cli import checkpoint as _checkpoint  # noqa: F401  (checkpoint import|info|register)
from workbench.cli import denoise as _denoise  # noqa: F401  (denoise)
from workbench.cli import evaluate as _evaluate  # noqa: F401  (evaluate)
from workbench.cli import train as _train  # noqa: F401  (corpus, pretrain)
from workbench.cli import finetune as _finetune  # noqa: F401  (finetune)
from workbench.cli import models as _models  # noqa: F401  (models, ui)
from workbench.cli import demo as _demo  # noqa: F401  (demo)
from workbench.cli._render import err_console
from workbench.errors import WorkbenchError, database_locked
from workbench.model.allocator import tune_allocator

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 a WorkbenchError, 1 anything else Click reports)."""
    tune_allocator()  # before the first large tensor: see workbench.model.allocator
    try:
        app(args=argv, prog_name="workbench", standalone_mode=True)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except WorkbenchError as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as error:
        # Broad on purpose: a server that went away or a locked SQLite store reaches us wrapped in whatever
        # the layer above raised (MlflowException, Optuna's StorageInternalError, SQLAlchemy's
        # OperationalError, ...); those two are recognised by their cause chain, anything else re-raises.
        from workbench.tracking import unreachable_server

        uri = unreachable_server(error)
        if uri is not None:
            # A tracking server that went away (or never answered) is the user's to fix: one line, exit 2.
            err_console.print(f"[bold red]error:[/] MLflow tracking server {uri} is unreachable "
                              f"({_reason(error)}); start it again and rerun the command (a study resumes where it "
                              "stopped)", highlight=False, soft_wrap=True)
        elif database_locked(error):
            err_console.print("[bold red]error:[/] a SQLite store of this workspace (registry/mlflow.db or registry/"
                              "optuna.db) stayed locked by another process past the wait; let that process finish and "
                              "run this again (many writers at once: use a tracking server and PostgreSQL)",
                              highlight=False, soft_wrap=True)
        else:
            raise
        return 2
    return 0


def _reason(error: BaseException) -> str:
    """The innermost cause of a failed connection, in a few words."""
    for _ in range(20):  # a short chain; never loop on a cycle
        if not (error.__cause__ or error.__context__):
            break
        error = error.__cause__ or error.__context__
    text = str(error)
    for known in ("Connection refused", "timed out", "Name or service not known", "Connection reset"):
        if known in text:
            return known.lower()
    return type(error).__name__


def entry_point() -> None:
    sys.exit(main())
