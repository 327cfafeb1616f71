"""Finding a model: the one resolver from a reference (a checkpoint file, a `models:/` URI, any other
MLflow artifact URI, or a device's champion) to a local checkpoint and what is known about it.

    path, facts = resolve_checkpoint("models:/tape-denoiser-general@base")
    model, provenance = load_model("models:/tape-denoiser-revox-a77@champion")   # `denoise --model`
    model, provenance = load_device_model("revox-a77")                           # `denoise --device`
    path, base = resolve_base(workspace, None)                                   # `finetune --base`

A registered version never changes, so each is downloaded once into `registry/models-cache/NAME/VERSION/`;
a checkpoint inside another artifact URI (runs:/RUN/model, ...) is cached under `models-cache/uris/`.
Every failure is one line naming the reference.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from workbench.audio.io import sha256_file
from workbench.errors import WorkbenchError
from workbench.model_registry.names import (
    BASE_ALIAS,
    CACHE_DIR,
    GENERAL_BASE_URI,
    GENERAL_MODEL,
    champion_uri,
    is_model_uri,
    model_uri,
    parse_model_uri,
)
from workbench.model_registry.register import get_alias_version, is_not_found, latest_version
from workbench.tracking import client, configure
from workbench.workspace import Workspace, find_workspace


def resolve_model_version(uri: str, workspace: Workspace | None = None):
    """The registry's ModelVersion for `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@ALIAS`."""
    from mlflow.exceptions import MlflowException

    parsed = parse_model_uri(uri)
    if parsed is None:
        raise WorkbenchError(f"{uri}: not a registered-model URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
    name, version, alias = parsed
    registry = client(workspace)
    try:
        model = registry.get_registered_model(name)
    except MlflowException as error:
        if not is_not_found(error):
            raise
        known = [m.name for m in registry.search_registered_models(max_results=50)]
        raise WorkbenchError(f"{uri}: no registered model {name!r} (registered: {', '.join(known) or 'none'})") from None
    if alias is not None:
        if alias not in (model.aliases or {}):
            have = ", ".join(f"@{a}" for a in sorted(model.aliases or {})) or "none"
            raise WorkbenchError(f"{uri}: model {name} has no alias @{alias} (aliases: {have})")
        return registry.get_model_version_by_alias(name, alias)
    if version == "latest":
        newest = latest_version(name, workspace)
        if newest is None:
            raise WorkbenchError(f"{uri}: model {name} has no versions")
        version = str(newest)
    if not version.isdigit():
        raise WorkbenchError(f"{uri}: version {version!r} is not a number (or 'latest', or use @alias)")
    try:
        return registry.get_model_version(name, version)
    except MlflowException as error:
        if not is_not_found(error):
            raise
        newest = latest_version(name, workspace)
        raise WorkbenchError(f"{uri}: model {name} has no version {version} "
                             f"({'latest is ' + str(newest) if newest else 'it has none'})") from None


def fetch_checkpoint(uri: str, workspace: Workspace | None = None) -> tuple[Path, dict]:
    """Download a registered model's checkpoint: (local X.safetensors with X.json beside it, registry facts).

    The facts are name, version, uri (models:/NAME/VERSION), requested_uri, run_id, aliases, tags and
    description. Versions never change, so each is downloaded once into `registry/models-cache/`.
    """
    workspace = workspace or find_workspace()
    mlflow = configure(workspace)
    version = resolve_model_version(uri, workspace)
    name, number = version.name, int(version.version)
    registry = mlflow.MlflowClient()
    aliases = sorted(a for a, v in (registry.get_registered_model(name).aliases or {}).items() if int(v) == number)
    facts = {"name": name, "version": number, "uri": model_uri(name, number), "requested_uri": uri,
             "run_id": version.run_id, "aliases": aliases, "tags": dict(version.tags or {}),
             "description": version.description or ""}
    target = workspace.registry / CACHE_DIR / name / str(number)
    if not _cached_weights(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{number}.", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri(name, number), dst_path=str(staging))
            if not _cached_weights(staging):
                raise WorkbenchError(f"{facts['uri']}: the registered model holds no workbench checkpoint "
                                     "(no .safetensors with its .json in its artifacts)")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _cached_weights(target), facts


def fetch_artifact_checkpoint(uri: str, workspace: Workspace | None = None) -> tuple[Path, dict]:
    """A checkpoint inside any other MLflow artifact URI (runs:/RUN/model, a logged model's URI...)."""
    from mlflow.exceptions import MlflowException

    workspace = workspace or find_workspace()
    mlflow = configure(workspace)
    target = workspace.registry / CACHE_DIR / "uris" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    found = [p for p in target.rglob("*.safetensors") if p.with_suffix(".json").is_file()] if target.is_dir() else []
    if len(found) != 1:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download.", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging))
        except (MlflowException, OSError) as error:  # not found, no such scheme, unreadable: one line
            shutil.rmtree(staging, ignore_errors=True)
            raise WorkbenchError(f"{uri}: cannot download ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        found = [p for p in staging.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
        if len(found) != 1:
            shutil.rmtree(staging, ignore_errors=True)
            raise WorkbenchError(f"{uri}: holds {len(found)} workbench checkpoints (X.safetensors + X.json); need exactly one")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        found = [p for p in target.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
    return found[0], {"name": uri, "version": None, "uri": uri, "requested_uri": uri, "run_id": None, "aliases": []}


def _cached_weights(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [p for p in folder.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
    return found[0] if len(found) == 1 else None


def resolve_checkpoint(ref: str | Path, workspace: Workspace | None = None) -> tuple[Path, dict]:
    """The one resolver: a checkpoint file (X.safetensors, or X / X.json beside it), a registered-model
    URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or any other MLflow artifact URI holding one
    checkpoint -> (local X.safetensors, facts: name, version, uri, requested_uri, run_id, aliases, ...)."""
    text = str(ref)
    if text.startswith("models:/"):
        return fetch_checkpoint(text, workspace)
    if is_model_uri(text):
        return fetch_artifact_checkpoint(text, workspace)
    return _file_checkpoint(text)


def _file_checkpoint(text: str) -> tuple[Path, dict]:
    path = Path(text).expanduser()
    if path.suffix != ".safetensors" and path.with_suffix(".safetensors").is_file():
        path = path.with_suffix(".safetensors")  # `X` or `X.json` for `X.safetensors`
    if not path.is_file():
        raise WorkbenchError(f"{path}: no such checkpoint (give X.safetensors, with X.json beside it, "
                             "or an MLflow URI such as models:/tape-denoiser-revox-a77@champion)")
    return path.resolve(), {"name": path.stem, "version": None, "uri": None, "requested_uri": text, "run_id": None,
                            "aliases": []}


def resolve_base(workspace: Workspace, ref: str | None) -> tuple[Path, dict]:
    """`finetune --base`: the base checkpoint from `ref` (see `resolve_checkpoint`), by default the general
    model @base (else its latest version). The facts are ref, name, version, uri and run_id."""
    if ref is None:
        version = get_alias_version(GENERAL_MODEL, BASE_ALIAS, workspace)
        if version is None:
            version = latest_version(GENERAL_MODEL, workspace)
        if version is None:
            raise WorkbenchError(f"no general model is registered ({GENERAL_MODEL}): run `workbench pretrain`, "
                                 "import the published one with `workbench checkpoint import`, or pass --base FILE")
        ref = model_uri(GENERAL_MODEL, version)
    try:
        path, facts = resolve_checkpoint(ref, workspace)
    except WorkbenchError as error:
        raise WorkbenchError(f"--base {error}") from None
    return path, {"ref": ref, "name": facts["name"], "version": facts["version"], "uri": facts["uri"] or str(path),
                  "run_id": facts["run_id"]}


def load_model(ref: str | Path, accelerator="cpu", workspace: Workspace | None = None):
    """Load the model a `--model` REF names (see `resolve_checkpoint`); a registered model from `workspace`'s
    registry (default: the current one).

    Returns the model (eval mode, on `accelerator`) and its provenance: name, version, uri, run_id,
    aliases, checkpoint path and sha256, and the checkpoint's config.
    """
    path, facts = _registered_or_file(str(ref), workspace)
    return _load(path, facts, accelerator)


def load_device_model(device_id: str, accelerator="cpu", workspace: Workspace | None = None):
    """A replay machine's champion model from `workspace`'s registry (`--device ID`; default: the current one).

    A machine with no champion yet (none fine-tuned, or the gate refused every version) is restored with
    the general model @base instead, and the provenance says so in `note` (the CLI prints it; the sidecar
    keeps it), with `fallback_for_device` naming the machine."""
    from workbench.devices import get_device

    workspace = workspace or find_workspace()
    get_device(workspace, device_id)  # an unknown machine is its own, clearer error
    try:
        path, provenance = _registered_or_file(champion_uri(device_id), workspace)
    except WorkbenchError as error:
        champion_error = error
    else:
        return _load(path, provenance, accelerator)
    try:
        path, provenance = _registered_or_file(GENERAL_BASE_URI, workspace)
    except WorkbenchError:
        raise WorkbenchError(f"device {device_id} has no champion model yet ({champion_error}) and there is no general "
                             f"model {GENERAL_BASE_URI} to use instead; fine-tune one with "
                             f"`workbench finetune --device {device_id}`") from None
    note = (f"device {device_id} has no champion model yet: restored with the general model {provenance['uri']} "
            f"(@{BASE_ALIAS}), not fitted to this machine (`workbench finetune --device {device_id}` fits one)")
    return _load(path, {**provenance, "note": note, "fallback_for_device": device_id}, accelerator)


def _registered_or_file(ref: str, workspace: Workspace | None = None) -> tuple[Path, dict]:
    """`resolve_checkpoint` with MLflow's own errors (a store that refuses, a bad URI) as one line."""
    mlflow_errors: tuple[type[Exception], ...] = ()
    if is_model_uri(ref):  # only URIs need MLflow (1.4 s to import): a checkpoint file is read without it
        from mlflow.exceptions import MlflowException

        mlflow_errors = (MlflowException,)
    try:
        path, facts = resolve_checkpoint(ref, workspace)
    except mlflow_errors as error:
        reason = " ".join(str(getattr(error, "message", error)).split())
        raise WorkbenchError(f"{ref}: unknown model URI ({reason[:300]})") from None
    facts = {"name": None, "version": None, "run_id": None, "aliases": [], **facts}
    return path, {**facts, "uri": facts.get("uri") or (ref if is_model_uri(ref) else None), "requested_uri": ref}


def _load(path: Path, provenance: dict, accelerator):
    from workbench.model.checkpoint import load_checkpoint

    model, config = load_checkpoint(path, device=str(accelerator))
    return model, {**provenance, "checkpoint": str(Path(path).resolve()), "checkpoint_sha256": sha256_file(path),
                   "config": config}
