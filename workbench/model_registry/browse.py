"""Browsing the device models in the MLflow registry: `models list`, `models show DEVICE`, `ui`.

Every replay machine's model is registered as `tape-denoiser-<device>`; each version carries the tags
`workbench finetune` writes (device, speeds, base model, study, ΔSNR per input SNR, minutes of noise,
whether it was promoted and why) and its run holds the evaluation report under `report/`. The general
model `tape-denoiser-general` is listed too, as the base of them all.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.model_registry.names import (
    BASE_ALIAS,
    CHAMPION,
    DELTA_PEAQ_PREFIX,
    DELTA_SNR_PREFIX,
    MODEL_PREFIX,
    PAIRED_GAIN_PREFIX,
    REPORT_ARTIFACT_DIR,
    TAG_GATE,
    TAG_HUM_TEMPLATE,
    TAG_PROMOTED,
    TAG_REPORT,
    device_model_name,
    device_of,
)
from workbench.model_registry.register import is_not_found
from workbench.workspace import Workspace


def _date(timestamp_ms: int | None) -> str:
    if not timestamp_ms:
        return ""
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _delta_tags(tags: dict, prefix: str = DELTA_SNR_PREFIX) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(prefix) and key.endswith("db"):
            try:
                out[key.removeprefix(prefix).removesuffix("db")] = float(value)
            except ValueError:
                pass
    return dict(sorted(out.items(), key=lambda item: float(item[0])))


def _paired_tags(tags: dict) -> dict[str, str]:
    """The paired-gain tags of `workbench finetune` ("gain_vs_base_10db": "+0.490 [+0.120, +0.860] n=40")."""
    return {key: value for key, value in sorted(tags.items()) if key.startswith(PAIRED_GAIN_PREFIX)}


def _versions(registry, name: str) -> list[dict]:
    model = registry.get_registered_model(name)
    aliases_of: dict[int, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases_of.setdefault(int(version), []).append(alias)
    versions = []
    for version in registry.search_model_versions(f"name = '{name}'", max_results=1000):
        tags = dict(version.tags or {})
        number = int(version.version)
        versions.append({
            "version": number, "aliases": sorted(aliases_of.get(number, [])), "created": _date(version.creation_timestamp),
            "delta_snr_db": _delta_tags(tags), "delta_peaq": _delta_tags(tags, DELTA_PEAQ_PREFIX),
            "paired_gain_db": _paired_tags(tags),
            "promoted": tags.get(TAG_PROMOTED), "gate": tags.get(TAG_GATE, ""),
            "hum_template": tags.get(TAG_HUM_TEMPLATE, "none"),
            "run_id": version.run_id, "description": version.description or "", "tags": tags,
        })
    return sorted(versions, key=lambda v: v["version"])


def list_models(workspace: Workspace) -> list[dict]:
    """Every `tape-denoiser-*` model: versions, aliases, the champion's ΔSNR, last change."""
    registry = tracking.client(workspace)
    found = registry.search_registered_models(filter_string=f"name LIKE '{MODEL_PREFIX}%'", max_results=1000)
    models = []
    for model in sorted(found, key=lambda m: m.name):
        versions = _versions(registry, model.name)
        aliases = {alias: int(version) for alias, version in sorted((model.aliases or {}).items())}
        shown = aliases.get(CHAMPION) or aliases.get(BASE_ALIAS) or (versions[-1]["version"] if versions else None)
        shown_version = next((v for v in versions if v["version"] == shown), None)
        models.append({
            "name": model.name,
            "device": device_of(model.name),
            "versions": len(versions),
            "latest": versions[-1]["version"] if versions else None,
            "aliases": aliases,
            "shown_version": shown,
            "delta_snr_db": shown_version["delta_snr_db"] if shown_version else {},
            "updated": _date(model.last_updated_timestamp),
        })
    return models


def _report_summary(report: dict) -> dict:
    """The pooled metrics table, the paired gains and the decision from a report.json."""
    from workbench.evaluate.report import pooled_paired

    rows = [r for r in report.get("evaluation", {}).get("summary", [])
            if r["set"] == "all" or len(report["evaluation"].get("fragment_sets", [])) == 1]
    table = [{"input_snr_db": r["input_snr_db"], "method": r["method"],
              "delta_snr_db": r["delta_snr"]["mean"], "delta_snr_ci": [r["delta_snr"]["ci_low"], r["delta_snr"]["ci_high"]],
              "delta_si_sdr_db": r["delta_si_sdr"]["mean"], "fragments": r["delta_snr"]["n"],
              **({"delta_peaq": r["delta_peaq"]["mean"], "delta_peaq_ci": [r["delta_peaq"]["ci_low"], r["delta_peaq"]["ci_high"]]}
                 if "delta_peaq" in r else {})} for r in rows]
    study = report.get("study") or {}
    return {"title": report.get("title"), "decision": report.get("decision", {}), "table": table,
            "paired": pooled_paired(report),
            "study": {"name": study.get("name"), "counts": study.get("counts"), "best": study.get("best")} if study else None}


def _load_report(registry, version: dict, workspace: Workspace) -> tuple[dict | None, str | None, str | None]:
    """(report.json data, local report.html path or None, MLflow artifact URI) of a version."""
    local = version["tags"].get(TAG_REPORT)
    artifact_uri = f"runs:/{version['run_id']}/{REPORT_ARTIFACT_DIR}/report.html" if version["run_id"] else None
    if local and Path(local).with_name("report.json").is_file():
        return json.loads(Path(local).with_name("report.json").read_text()), local, artifact_uri
    if version["run_id"]:
        import tempfile

        from mlflow.exceptions import MlflowException

        try:
            with tempfile.TemporaryDirectory() as folder:
                path = registry.download_artifacts(version["run_id"], f"{REPORT_ARTIFACT_DIR}/report.json", folder)
                return json.loads(Path(path).read_text()), None, artifact_uri
        except MlflowException as error:  # a version registered without a report (an import): nothing to summarise
            if not is_not_found(error):
                raise
            return None, None, artifact_uri
    return None, None, None


def show_model(workspace: Workspace, device_id: str) -> dict:
    """One device's model: every version, the champion, and the summary of its report (champion's, else latest)."""
    from mlflow.exceptions import MlflowException

    from workbench.devices import get_device

    get_device(workspace, device_id)
    name = device_model_name(device_id)
    registry = tracking.client(workspace)
    try:
        registry.get_registered_model(name)
    except MlflowException as error:
        if not is_not_found(error):
            raise
        raise WorkbenchError(f"device {device_id} has no registered model {name} yet "
                             f"(run `workbench finetune --device {device_id}`)") from None
    versions = _versions(registry, name)
    champion = next((v["version"] for v in versions if CHAMPION in v["aliases"]), None)
    shown = next((v for v in versions if v["version"] == champion), versions[-1] if versions else None)
    report, local, artifact_uri = _load_report(registry, shown, workspace) if shown else (None, None, None)
    return {
        "name": name, "device": device_id, "champion": champion,
        "versions": [{k: v for k, v in version.items() if k != "tags"} for version in versions],
        "report_version": shown["version"] if shown else None,
        "report": _report_summary(report) if report else None,
        "report_path": local, "report_artifact": artifact_uri,
    }


def ui_command(workspace: Workspace, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow server` command line serving the workspace's store (UI and REST API)."""
    uri = workspace.tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise WorkbenchError(f"MLFLOW_TRACKING_URI={uri} is already a tracking server: open it in a browser")
    if not (1 <= int(port) <= 65535):
        raise WorkbenchError(f"--port {port}: not a TCP port (1..65535)")
    tracking.configure(workspace)  # creates the store once, safely, before the server opens it
    workspace.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--artifacts-destination", str(workspace.mlflow_artifacts), "--host", host, "--port", str(int(port)),
            "--workers", "1"]
