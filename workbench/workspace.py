"""Where an archive's workbench keeps its things.

A workspace is a folder holding `registry/devices/` (tracked: the archive's replay machines) and, by
default, everything the workbench produces beside it (ignored by git): the noise library, the clean
corpus list, the MLflow store and the Optuna studies. Commands find it like git finds a repository:
`WORKBENCH_HOME` if set, else the nearest folder upwards from the current directory that has
`registry/devices/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from workbench.devices import research_devices, write_device
from workbench.errors import WorkbenchError

PACKAGE_ROOT = Path(__file__).resolve().parent
# The recipes that ship with the workbench; a workspace may add or override its own in `recipes/`.
BUNDLED_RECIPES = PACKAGE_ROOT.parent / "recipes"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def devices_dir(self) -> Path:
        return self.registry / "devices"

    @property
    def noise_library(self) -> Path:
        return self.registry / "noise"

    @property
    def corpus_dir(self) -> Path:
        return self.registry / "corpus"

    @property
    def mixtures_dir(self) -> Path:
        """Validation and test mixtures, fixed by seed so every model is scored on the same audio."""
        return self.registry / "mixtures"

    @property
    def runs_dir(self) -> Path:
        """Training checkpoints and resumable state of runs in progress."""
        return self.registry / "runs"

    @property
    def reports_dir(self) -> Path:
        return self.registry / "reports"

    @property
    def mlflow_db(self) -> Path:
        return self.registry / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.registry / "artifacts"

    @property
    def optuna_db(self) -> Path:
        return self.registry / "optuna.db"

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    def tracking_uri(self) -> str:
        """`MLFLOW_TRACKING_URI` wins; otherwise the workspace's own SQLite store."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    def optuna_storage(self) -> str:
        return f"sqlite:///{self.optuna_db}"


def is_workspace(path: Path) -> bool:
    return (path / "registry" / "devices").is_dir()


def find_workspace(start: Path | None = None) -> Workspace:
    """The workspace from `WORKBENCH_HOME`, else the nearest one at or above `start` (default: cwd)."""
    home = os.environ.get("WORKBENCH_HOME")
    if home:
        root = Path(home).expanduser().resolve()
        if not is_workspace(root):
            raise WorkbenchError(f"WORKBENCH_HOME={home}: not a workspace (no registry/devices/); run `workbench init {home}`")
        return Workspace(root)
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if is_workspace(candidate):
            return Workspace(candidate)
    raise WorkbenchError(
        f"{here}: not inside a workspace (no registry/devices/ here or above); "
        "run `workbench init DIR` or set WORKBENCH_HOME"
    )


# The ignore rules every workspace's registry gets: the repository's own, so there is one list.
REGISTRY_GITIGNORE = PACKAGE_ROOT.parent / "registry" / ".gitignore"


def init_workspace(root: Path, with_research_devices: bool = True) -> Workspace:
    """Create a fresh workspace at `root`, optionally pre-filled with the research data set's machines."""
    root = Path(root).expanduser().resolve()
    if is_workspace(root):
        raise WorkbenchError(f"{root}: already a workspace")
    workspace = Workspace(root)
    workspace.devices_dir.mkdir(parents=True)
    (workspace.registry / ".gitignore").write_text(REGISTRY_GITIGNORE.read_text())
    if with_research_devices:
        for device in research_devices():
            write_device(workspace, device)
    return workspace
