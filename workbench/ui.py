"""`workbench ui`'s server: the MLflow UI (and REST API) for a workspace's store, in the foreground until stopped.

The command line comes from `model_registry.ui_command`; this module runs it as a child process and
passes a SIGTERM sent to us on to it, so a service manager (or a test) that stops `workbench ui` stops
the server too. Ctrl-C reaches both through the terminal's process group.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable

from workbench.model_registry import ui_command
from workbench.workspace import Workspace

# Exit statuses of a server that stopped because it was asked to (SIGTERM, Ctrl-C), not because it failed.
STOPPED_ON_REQUEST = frozenset({0, -signal.SIGTERM, -signal.SIGINT, 130})


def serve_ui(workspace: Workspace, host: str = "127.0.0.1", port: int = 5000,
             on_start: Callable[[str], None] | None = None) -> int:
    """Serve the workspace's store until the server exits or is stopped; returns the server's exit status.

    `on_start(url)` is called once the command line is checked, before the server starts.
    """
    command = ui_command(workspace, host=host, port=port)
    if on_start:
        on_start(f"http://{host}:{port}")
    server = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        code = server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code
