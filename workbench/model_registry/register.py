"""Registering checkpoints: a checkpoint logged as a pyfunc model and created as a new version, aliases,
and the registry's "not found".

    version = register_checkpoint(path, GENERAL_MODEL, tags={...}, description="...")
    set_alias(GENERAL_MODEL, BASE_ALIAS, version)

The pyfunc model's artifacts are the checkpoint's safetensors weights and JSON sidecar (see
`workbench/pyfunc_model.py`); it carries a signature (mono float32 audio at 44.1 kHz in, the same out)
and a short input example, so MLflow's UI and serving tools can say what it takes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from workbench.audio.io import MODEL_SAMPLE_RATE
from workbench.errors import WorkbenchError
from workbench.model_registry.names import (
    MODEL_ARTIFACT,
    TAG_KIND,
    TAG_LINEAGE_PREFIX,
    TAG_SIZE,
    model_description,
)
from workbench.tracking import client, configure, quiet_loggers, start_run
from workbench.workspace import PACKAGE_ROOT, Workspace, find_workspace

PYFUNC_CODE = PACKAGE_ROOT / "pyfunc_model.py"
EXAMPLE_FRAMES = 512  # the logged input example: a few hundred samples, enough to show the shape


def is_not_found(error) -> bool:
    """True for MLflow's "no such registered model / version / run / artifact" (RESOURCE_DOES_NOT_EXIST)."""
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return getattr(error, "error_code", None) == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _pip_requirements() -> list[str]:
    import workbench

    return [f"workbench=={workbench.__version__}", "torch==2.11.*", "torchaudio==2.11.*", "numpy", "soundfile",
            "safetensors", "scipy"]


def model_signature():
    """What the pyfunc model takes and gives: one channel of float32 audio at 44.1 kHz, any length."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    audio = Schema([TensorSpec(np.dtype(np.float32), (-1,))])
    return ModelSignature(inputs=audio, outputs=audio)


def input_example() -> np.ndarray:
    """A short quiet tone (EXAMPLE_FRAMES samples at 44.1 kHz) as the logged input example."""
    time = np.arange(EXAMPLE_FRAMES, dtype=np.float32) / MODEL_SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * 440.0 * time)).astype(np.float32)


class _PyfuncFlavor:
    """mlflow.pyfunc as the flavor of `Model.log`, which then skips its serving check of the input example.

    That check loads the logged model in the registering process and runs it on the example: it more
    than doubled a registration's time (benchmarks/registration.py) and its failure is only a log line.
    `Model.log` reads `validate_serving_input` from the keywords it hands the flavor's save_model, which
    mlflow.pyfunc's refuses; so it is taken off here. tests/test_tracking.py loads and runs a registered
    model from the registry instead.
    """

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs):
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(**kwargs)


def register_checkpoint(checkpoint_path: str | Path, name: str, *, tags: dict[str, Any] | None = None,
                        description: str | None = None, artifacts: dict[str, str | Path] | None = None,
                        experiment: str = "imports", workspace: Workspace | None = None) -> int:
    """Log a checkpoint (X.safetensors + X.json) as a pyfunc model and register it as a new version of `name`.

    Logs into the active run if there is one, else into a new run of `experiment` (e.g. an imported
    published checkpoint). `artifacts` adds files to the logged model (a report, ...). Returns the version.
    """
    from workbench.model.checkpoint import config_path_for, weights_path_for

    weights = weights_path_for(Path(checkpoint_path)).resolve()
    sidecar = config_path_for(weights)
    for path in (weights, sidecar):
        if not path.is_file():
            raise WorkbenchError(f"{path}: no such checkpoint file (a checkpoint is X.safetensors with X.json beside it)")
    workspace = workspace or find_workspace()
    mlflow = configure(workspace)
    model_artifacts = {"weights": str(weights), "config": str(sidecar), **{k: str(v) for k, v in (artifacts or {}).items()}}
    with contextlib.ExitStack() as stack:
        if mlflow.active_run() is None:
            stack.enter_context(start_run(experiment, run_name=f"register {weights.name}", workspace=workspace))
        # What mlflow.pyfunc.log_model does, less its serving check (see _PyfuncFlavor). Its INFO line
        # "Validating input example against model signature" would land between our progress bars.
        stack.enter_context(quiet_loggers("mlflow.pyfunc"))
        info = mlflow.models.Model.log(None, _PyfuncFlavor, name=MODEL_ARTIFACT, flavor_name="pyfunc",
                                       python_model=str(PYFUNC_CODE), artifacts=model_artifacts,
                                       signature=model_signature(), input_example=input_example(),
                                       pip_requirements=_pip_requirements(), validate_serving_input=False)
    # Registered through the client, not log_model(registered_model_name=...): the fluent path prints
    # "Successfully registered model ..." lines to stderr between our progress bars. The version and its
    # tags are created in one transaction, so a process killed here leaves either no version or one whose
    # tags say where it came from (a rerun recognises it, never registers twice).
    registry = mlflow.MlflowClient()
    _ensure_registered_model(registry, name)
    version = int(registry.create_model_version(name, source=info.model_uri, run_id=info.run_id, model_id=info.model_id,
                                                description=description or None,
                                                tags={key: str(value) for key, value in (tags or {}).items()}).version)
    if not registry.get_registered_model(name).description:
        registry.update_registered_model(name, description=model_description(name))
    return version


def _ensure_registered_model(registry, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        registry.create_registered_model(name)
    except MlflowException as error:  # another worker registered it first
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def register_checkpoint_file(workspace: Workspace, checkpoint: Path, *, name: str, alias: str | None = None,
                             description: str | None = None) -> int:
    """Register a checkpoint made elsewhere (e.g. `workbench checkpoint import`): its sidecar's facts become version tags."""
    from workbench.model.checkpoint import load_checkpoint

    _, info = load_checkpoint(Path(checkpoint))  # refuses a damaged or mismatched file before it is registered
    lineage = info.get("lineage") or {}
    tags = {TAG_KIND: str(lineage.get("kind", "imported")), TAG_SIZE: str(info.get("size", "")),
            **{f"{TAG_LINEAGE_PREFIX}{k}": str(v)[:5000] for k, v in lineage.items() if not isinstance(v, (dict, list))}}
    description = description or (f"{info.get('size', '?')}-size checkpoint registered from {Path(checkpoint).name}"
                                  + (f" ({lineage['source']})" if "source" in lineage else "") + ".")
    version = register_checkpoint(checkpoint, name, tags=tags, description=description, workspace=workspace)
    if alias:
        set_alias(name, alias, version, workspace)
    return version


def set_alias(name: str, alias: str, version: int, workspace: Workspace | None = None) -> None:
    client(workspace).set_registered_model_alias(name, alias, str(version))


def get_alias_version(name: str, alias: str, workspace: Workspace | None = None) -> int | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    registry = client(workspace)
    # The model's alias map, not get_model_version_by_alias: MLflow reports a missing alias as
    # INVALID_PARAMETER_VALUE, which would also cover a malformed request.
    try:
        aliases = registry.get_registered_model(name).aliases or {}
    except MlflowException as error:
        if not is_not_found(error):
            raise
        return None
    return int(aliases[alias]) if alias in aliases else None


def latest_version(name: str, workspace: Workspace | None = None) -> int | None:
    """The highest version number of registered model `name`, or None when it has none."""
    registry = client(workspace)
    versions = registry.search_model_versions(f"name = '{name}'", max_results=1000)
    return max((int(v.version) for v in versions), default=None)
