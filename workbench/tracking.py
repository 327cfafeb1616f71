"""MLflow experiment tracking: the store, runs, recipes as params, metrics, system facts, lineage as dataset inputs.

The store is `workspace.tracking_uri()`: the workspace's own SQLite file (`registry/mlflow.db`, artifacts
in `registry/artifacts/`) unless `MLFLOW_TRACKING_URI` points elsewhere (a tracking server for many
machines). `import mlflow` costs over a second, so it happens inside these functions, never at import.

A training run logs the whole resolved recipe as params, the training metrics per step, system facts as
tags, and its data as MLflow dataset inputs (noise-library selection and clean corpus, each with its
digest, so the lineage says exactly what trained a model). Registering the trained model, and finding
one, is `workbench.model_registry`'s job.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workbench.audio.io import MODEL_SAMPLE_RATE
from workbench.errors import WorkbenchError, database_locked
from workbench.workspace import Workspace, find_workspace

# Run tags every workbench run may carry: what kind of run it is, and the Optuna study and trial it belongs to.
TAG_RUN_KIND = "workbench.kind"
TAG_OPTUNA_STUDY = "optuna.study"
TAG_OPTUNA_TRIAL = "optuna.trial"
_configured: dict[str, str] = {}


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def configure(workspace: Workspace | None = None):
    """Point MLflow at the workspace's store (creating it once, safely) and return the `mlflow` module.

    Several processes creating a fresh SQLite store at the same moment crash in its migrations, so the
    first creation happens under an exclusive file lock; later calls find the tables there.
    """
    import mlflow

    # MLflow writes "View run ... at: URL" to stdout whenever a run on a server ends: that would break
    # `--json` output, and the library never prints.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    workspace = workspace or find_workspace()
    uri = workspace.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if _configured.get(str(workspace.root)) != uri:
        if uri.startswith("sqlite:///"):
            database = Path(uri[len("sqlite:///"):])
            database.parent.mkdir(parents=True, exist_ok=True)
            with open(database.with_name(database.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    _touch_store(mlflow, uri)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        _configured[str(workspace.root)] = uri
    return mlflow


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Only warnings and errors from these loggers while the block runs: MLflow and alembic log INFO
    lines to stderr, between our progress bars, and the library never prints."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _touch_store(mlflow, uri: str) -> None:
    # Creating the tables logs a few INFO lines per migration.
    with quiet_loggers("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        _check_store(mlflow, uri)


def _check_store(mlflow, uri: str) -> None:
    try:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except Exception as error:  # a broken or unreachable store: name it in one line
        if database_locked(error):
            raise WorkbenchError(f"MLflow store {uri}: locked by another process past the wait; let it finish "
                                 "and run this again") from None
        raise WorkbenchError(f"MLflow store {uri}: unusable ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None


def client(workspace: Workspace | None = None):
    mlflow = configure(workspace)
    return mlflow.MlflowClient()


def experiment_id(name: str, workspace: Workspace | None = None) -> str:
    """The id of experiment `name`, created with its artifacts in the workspace (unless a server stores them)."""
    workspace = workspace or find_workspace()
    mlflow = configure(workspace)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None if _is_server(workspace.tracking_uri()) else (workspace.mlflow_artifacts / name).as_uri()
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as error:  # another process created it meanwhile
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def start_run(experiment: str, *, run_name: str | None = None, run_id: str | None = None, nested: bool = False,
              tags: dict[str, str] | None = None, workspace: Workspace | None = None) -> Iterator[Any]:
    """An active MLflow run in `experiment` (or run `run_id` reopened, to resume it); ends it on exit.

    The run ends FINISHED, or FAILED/KILLED when the block raises (Ctrl-C: KILLED); step metrics still
    held by `log_metrics` are written first.
    """
    workspace = workspace or find_workspace()
    mlflow = configure(workspace)
    kwargs = {"run_id": run_id} if run_id else {"experiment_id": experiment_id(experiment, workspace), "run_name": run_name}
    run = mlflow.start_run(nested=nested, tags=tags, **kwargs)
    status, server_gone = "FINISHED", False
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as error:
        status, server_gone = "FAILED", unreachable_server(error) is not None
        raise
    finally:
        if server_gone:  # the held metrics cannot be written; ending the run is tried once, quietly
            _pending_metrics.metrics.clear()
            with contextlib.suppress(Exception):
                mlflow.end_run(status)
        else:
            try:
                _pending_metrics.write()
            finally:
                mlflow.end_run(status)


def unreachable_server(error: BaseException) -> str | None:
    """The tracking server's URI when `error`, or an error that led to it, is a failed connection to that
    server (MLflow wraps those in an MlflowException); else None."""
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    import requests

    uri = mlflow.get_tracking_uri()
    seen: BaseException | None = error
    for _ in range(20):  # the chain of causes is short; a cycle must not loop forever
        if seen is None:
            return None
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return uri if _is_server(uri) else None
        seen = seen.__cause__ or seen.__context__
    return None


def log_recipe(recipe: dict) -> None:
    """The whole resolved recipe as run params; on a resumed run, values that changed become tags."""
    import mlflow

    from workbench.recipes import recipe_params

    params = recipe_params(recipe)
    run = mlflow.active_run()
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    new = {k: v[:6000] for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)
    changed = {f"recipe.changed.{k}": v[:5000] for k, v in params.items() if k in existing and existing[k] != v[:6000]}
    if changed:
        mlflow.set_tags(changed)


class _PendingMetrics:
    """Step metrics held in memory and written to the active run in one batch, at most every few seconds.

    Training logs a few metrics every step; one store write per step would make a fast GPU wait on
    SQLite. MLflow's own asynchronous logging avoids the wait but reports a failed write only as a log
    line from a worker thread, and on a fast GPU whole runs' curves were lost that way. Here every
    write happens in the caller's thread and a failure raises; `start_run` writes what is left when the
    run ends.
    """

    WRITE_EVERY_S = 2.0
    MAX_HELD = 900  # MLflow takes at most 1000 metrics per batch

    def __init__(self):
        self.run_id: str | None = None
        self.metrics: list = []
        self.written_at = 0.0

    def add(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if run_id != self.run_id:
            self.write()
            self.run_id, self.written_at = run_id, time.monotonic()
        stamp = int(time.time() * 1000)
        self.metrics += [Metric(name, float(value), stamp, step) for name, value in metrics.items()]
        if len(self.metrics) >= self.MAX_HELD or time.monotonic() - self.written_at >= self.WRITE_EVERY_S:
            self.write()

    def write(self) -> None:
        import mlflow

        held, self.metrics, self.written_at = self.metrics, [], time.monotonic()
        if held:
            mlflow.MlflowClient().log_batch(self.run_id, metrics=held)


_pending_metrics = _PendingMetrics()


def log_metrics(metrics: dict[str, float], step: int) -> None:
    """Metrics of one step of the active run: held, and written in batches (see `_PendingMetrics`)."""
    import mlflow

    run = mlflow.active_run()
    assert run is not None, "log_metrics needs an active run (tracking.start_run)"
    _pending_metrics.add(run.info.run_id, metrics, step)


def system_info(device: str = "cpu", world_size: int = 1) -> dict[str, str]:
    import torch

    import workbench

    info = {"workbench": workbench.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": str(os.cpu_count()), "device": str(device),
            "world_size": str(world_size), "torch_threads": str(torch.get_num_threads())}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = str(torch.cuda.device_count())
    return info


def log_system_info(device: str = "cpu", world_size: int = 1, info: dict[str, str] | None = None) -> None:
    """The `system.*` tags: this machine's (`system_info`), or `info` recorded where a run trained."""
    import mlflow

    mlflow.set_tags({f"system.{k}": v for k, v in (info or system_info(device, world_size)).items()})


def log_dataset(name: str, digest: str, source: str | Path, context: str, tags: dict[str, Any] | None = None) -> None:
    """One MLflow dataset input: a metadata-only dataset (the audio stays where it is) with its digest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so
        warnings.simplefilter("ignore", UserWarning)
        resolved = resolve_dataset_source(str(source))
    dataset = MetaDataset(resolved, name=name, digest=digest[:32])
    mlflow.log_input(dataset, context=context, tags={k: str(v)[:5000] for k, v in (tags or {}).items()})


def log_lineage(workspace: Workspace, noise_snippets: dict[str, list], clean_files: dict[str, list],
                extra: dict[str, Any] | None = None) -> dict:
    """Log the noise-library selection and the clean corpus (per context: "training", "validation", ...)
    as dataset inputs, and the full lists as `lineage.json`; returns that lineage document.

    `noise_snippets` and `clean_files` map a context to the noise-library snippets / corpus files used in it.
    """
    import mlflow

    from workbench.corpus import corpus_lineage
    from workbench.noise.library import NoiseLibrary

    library = NoiseLibrary(workspace)
    lineage: dict[str, Any] = {"noise": {}, "corpus": {}, **(extra or {})}
    for context, snippets in noise_snippets.items():
        digest = library.digest(snippets)
        summary = {"digest": digest, "snippets": len(snippets),
                   "minutes": round(sum(s.frames for s in snippets) / MODEL_SAMPLE_RATE / 60, 3),
                   "devices": sorted({s.device for s in snippets}),
                   "speeds": sorted({float(s.speed_ips) for s in snippets}),
                   "splits": sorted({s.split for s in snippets})}
        lineage["noise"][context] = {**summary, "sha256": sorted(s.sha256 for s in snippets)}
        log_dataset(f"noise-library-{context}", digest, workspace.noise_library, context,
                    {k: v for k, v in summary.items() if k != "digest"})
    for context, files in clean_files.items():
        summary = corpus_lineage(files)
        lineage["corpus"][context] = {**summary, "sha256": sorted(f.sha256 for f in files)}
        log_dataset(f"clean-corpus-{context}", summary["digest"], workspace.corpus_dir, context,
                    {k: v for k, v in summary.items() if k not in ("digest", "roots")})
    mlflow.log_dict(lineage, "lineage.json")
    return lineage
