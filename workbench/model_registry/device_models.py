"""Registering a fine-tuned device model: `workbench finetune`'s last step, and what a rerun finds of it.

    registered = register_device_model(plan, study, info, best, model, evaluation, lineage, champion, promoted,
                                       reason)
    registered = registered_version(plan, best.number)   # the version this study already registered, or None

`plan` is the fine-tune's plan (workbench.finetune.Plan: device, speeds, study, base, recipe, evaluation
settings, workspace), `evaluation` the EvaluationResult of the models scored on the machine's test noise.

A version of `tape-denoiser-<device>` is registered in a nested run of the study's run, with its tags
(names.TAG_*: device, speeds, base, study, ΔSNR and its interval per input SNR, the paired gains over
the base model and the champion, the gate's verdict and reason), a description, and the evaluation
report; the report is copied into the workspace (`reports/<device>/v<N>/`) and `@champion` moves only
when the gate promoted the version. A process killed on the way is recognised by its run's worker tag
and a rerun finishes what it left undone, never registering the same trial twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import tracking
from workbench.devices import format_speed
from workbench.evaluate.baselines import NOISY_INPUT
from workbench.evaluate.report import write_report
from workbench.model.checkpoint import save_checkpoint
from workbench.model_registry.names import (
    BASE_ALIAS,
    BASE_MODEL,
    CHAMPION,
    CHAMPION_METHOD,
    FINE_TUNED,
    TAG_BASE_MODEL,
    TAG_BASE_URI,
    TAG_BASE_VERSION,
    TAG_BEST_TRIAL,
    TAG_DEVICE,
    TAG_GATE,
    TAG_HUM_TEMPLATE,
    TAG_MIN_GAIN,
    TAG_NOISE_MINUTES,
    TAG_NOISE_MINUTES_TEST,
    TAG_PROMOTED,
    TAG_REASON,
    TAG_RECIPE,
    TAG_REPORT,
    TAG_SPEEDS,
    TAG_STUDY,
    TAG_STUDY_KEY,
    TAG_STUDY_STORAGE,
    WORKER_TAG,
    ci_delta_snr_tag,
    delta_peaq_tag,
    delta_snr_tag,
    device_model_name,
    paired_gain_tag,
    rivals,
)
from workbench.model_registry.register import get_alias_version, register_checkpoint, set_alias
from workbench.recipes import recipe_digest
from workbench.train.tuning import _is_alive, describe_storage, worker_identity

KIND_FINETUNE_MODEL = "finetune-model"  # the run tag `workbench.kind` of a registration run
EARLIER = " (registered earlier for this study's best trial)"


@dataclass
class RegisteredVersion:
    """A device model's version as registered, and what the gate decided for it."""

    model_name: str
    version: int
    promoted: bool  # promoted by the gate and (still) @champion
    reason: str
    report_html: Path  # the workspace's copy of its report
    report_json: Path
    run_id: str | None  # the run that registered it
    registered_now: bool


def paired_tag(rival: str, snr: float) -> str:
    """The version tag holding the paired ΔSNR gain over a rival method at one input SNR."""
    return paired_gain_tag(BASE_ALIAS if rival == BASE_MODEL else CHAMPION, snr)


def _verdict(promoted: bool, reason: str) -> str:
    return ("promoted to @champion: it " if promoted else "not promoted: it ") + reason


def _description(plan, result, study_info: dict, promoted: bool, reason: str, champion: int | None) -> str:
    d = plan.device
    speeds = ", ".join(format_speed(s) for s in plan.speeds)
    settings = plan.evaluation
    lines = [f"Fine-tuned to {d.id} ({d.make} {d.model}, {d.format}) at {speeds} ips from "
             f"{plan.base['uri']} on {plan.noise_minutes('train'):g} min of its train noise."]
    for snr in settings.snrs_db:
        parts = [f"{name} {result.summary(name, snr).mean:+.2f}" for name in result.methods if name != NOISY_INPUT]
        paired = [f"over {shown} {result.paired(FINE_TUNED, method, snr).interval_text()}"
                  for method, shown in rivals(champion)]
        lines.append(f"Test noise at {snr:g} dB input ({result.summary(FINE_TUNED, snr).n} fragments of "
                     f"{settings.seconds:g} s), ΔSNR in dB: " + ", ".join(parts) + "; paired gain of the "
                     "fine-tuned model (mean [95 % t-interval]) " + ", ".join(paired) + ".")
        if "delta_peaq" in result.metrics:
            lines[-1] += " ΔPEAQ (ODG): " + ", ".join(
                f"{name} {result.summary(name, snr, 'delta_peaq').mean:+.2f}" for name in result.methods
                if name != NOISY_INPUT) + "."
    best = study_info["best"]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(study_info["counts"].items()))
    lines.append(f"Optuna study {plan.study_name} ({counts}); best trial #{best['number']} "
                 f"(validation ΔSNR {best['value']:+.2f} dB): "
                 + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()) + ".")
    lines.append(("Promoted to @champion: it " if promoted else "Not promoted: it ") + reason
                 + (f" (previous champion v{champion})." if champion else "."))
    return "\n\n".join(lines)


def register_device_model(plan, study, info: dict, best, model, result, lineage: dict, champion: int | None,
                          promoted: bool, reason: str) -> RegisteredVersion:
    """Save the checkpoint, write the report, register the version (tags, description, report) in a nested
    run of its own, copy the report into the workspace, and move @champion if the gate allows."""
    import mlflow  # the fluent API of the run opened here; mlflow costs a second to import

    model_name = device_model_name(plan.device.id)
    snrs = list(plan.evaluation.snrs_db)
    storage = describe_storage(plan.storage_url)
    checkpoint = plan.study_dir / f"{model_name}-trial-{best.number:04d}.safetensors"
    save_checkpoint(checkpoint, model, {
        "kind": "finetune", "device": plan.device.id, "speeds": plan.speeds, "base": plan.base,
        "study": plan.study_name, "trial": best.number, "params": best.params, "recipe": plan.recipe["name"],
        "recipe_digest": recipe_digest(plan.recipe), "noise_digest": lineage["noise"]["training"]["digest"],
        "corpus_digest": lineage["corpus"]["training"]["digest"]})
    description = _description(plan, result, info, promoted, reason, champion)
    hum_template = model.hum_template.summary() if model.hum_template is not None else "none"
    splits = (("train", "training"), ("validation", "validation"), ("test", "test"))
    with tracking.start_run(plan.experiment, run_name=f"evaluate and register trial {best.number}", nested=True,
                            workspace=plan.workspace, tags={tracking.TAG_RUN_KIND: KIND_FINETUNE_MODEL,
                                                            WORKER_TAG: json.dumps(worker_identity()),
                                                            tracking.TAG_OPTUNA_STUDY: plan.study_name,
                                                            tracking.TAG_OPTUNA_TRIAL: str(best.number)}) as run:
        for snr in snrs:
            for method in result.methods:
                key = method.replace(" ", "_").replace("-", "_")
                mlflow.log_metric(f"test_delta_snr_{snr:g}db_{key}", result.summary(method, snr).mean)
                mlflow.log_metric(f"test_delta_si_sdr_{snr:g}db_{key}", result.summary(method, snr, "delta_si_sdr").mean)
                if "delta_peaq" in result.metrics:
                    mlflow.log_metric(f"test_delta_peaq_{snr:g}db_{key}", result.summary(method, snr, "delta_peaq").mean)
        report_lineage = {
            "noise_snippets": {split: {k: lineage["noise"][ctx][k] for k in ("digest", "minutes", "sha256")}
                               for split, ctx in splits},
            "clean_corpus": {split: {k: v for k, v in lineage["corpus"][ctx].items() if k != "sha256"}
                             for split, ctx in splits},
            "base_model": plan.base, "recipe": plan.recipe, "validation_mixtures": lineage.get("validation_mixtures"),
            "evaluation_fragments": [{"label": s["label"], "digest": s["digest"], "path": s["path"]} for s in result.sets],
            "mlflow_run_id": run.info.run_id, "study_storage": storage,
        }
        model_facts = {"registered_model": model_name, "device": plan.device.id,
                       "speeds_ips": [format_speed(s) for s in plan.speeds], "base": plan.base["uri"],
                       "best_trial": best.number, "best_params": best.params,
                       "previous_champion": f"v{champion}" if champion else "none",
                       "hum_template": hum_template,
                       "weights_sha256": json.loads(checkpoint.with_suffix(".json").read_text())["weights_sha256"]}
        report_dir = plan.study_dir / f"report-trial-{best.number:04d}"
        files = write_report(report_dir, result, title=f"{model_name}: fine-tuned to {plan.device.id}",
                             lineage=report_lineage, study=study, model=model_facts,
                             decision={"promoted": promoted, "message": _verdict(promoted, reason)},
                             summary_text=description.split("\n\n")[0],
                             paired=(FINE_TUNED, [method for method, _ in rivals(champion)]),
                             min_gain_db=plan.evaluation.min_gain_db,
                             clip_methods=[m for m in (BASE_MODEL, FINE_TUNED, CHAMPION_METHOD) if m in result.methods])
        mlflow.log_artifacts(str(report_dir), "report")
        tags = {TAG_DEVICE: plan.device.id, TAG_SPEEDS: ",".join(format_speed(s) for s in plan.speeds),
                TAG_BASE_MODEL: plan.base.get("name") or plan.base["uri"], TAG_BASE_VERSION: plan.base.get("version") or "",
                TAG_BASE_URI: plan.base["uri"], TAG_STUDY: plan.study_name, TAG_STUDY_STORAGE: storage,
                TAG_STUDY_KEY: plan.study_key,
                TAG_BEST_TRIAL: best.number, TAG_RECIPE: plan.recipe["name"],
                TAG_HUM_TEMPLATE: hum_template,
                TAG_NOISE_MINUTES: plan.noise_minutes("train"), TAG_NOISE_MINUTES_TEST: plan.noise_minutes("test"),
                TAG_PROMOTED: str(promoted).lower(), TAG_GATE: _verdict(promoted, reason)[:4900],
                TAG_REASON: reason[:4900], TAG_MIN_GAIN: f"{plan.evaluation.min_gain_db:g}",
                **{delta_snr_tag(snr): f"{result.summary(FINE_TUNED, snr).mean:.3f}" for snr in snrs},
                **{delta_peaq_tag(snr): f"{result.summary(FINE_TUNED, snr, 'delta_peaq').mean:.3f}"
                   for snr in snrs if "delta_peaq" in result.metrics},
                **{ci_delta_snr_tag(snr): _interval_tag(result.summary(FINE_TUNED, snr)) for snr in snrs},
                **{paired_tag(method, snr): _interval_tag(result.paired(FINE_TUNED, method, snr))
                   for method, _ in rivals(champion) for snr in snrs}}
        version = register_checkpoint(checkpoint, model_name, tags=tags, description=description,
                                      artifacts={"report.html": files.html, "report.json": files.json},
                                      workspace=plan.workspace)
        local = plan.workspace.reports_dir / plan.device.id / f"v{version}"
        local.mkdir(parents=True, exist_ok=True)
        for path in (files.html, files.json):
            shutil.copy2(path, local / path.name)
        tracking.client(plan.workspace).set_model_version_tag(model_name, str(version), TAG_REPORT, str(local / "report.html"))
        if promoted:
            set_alias(model_name, CHAMPION, version, plan.workspace)
    return RegisteredVersion(model_name, version, promoted, reason, local / "report.html", local / "report.json",
                             run.info.run_id, registered_now=True)


def _interval_tag(summary) -> str:
    """A mean and its 95 % interval as one tag value: "+0.490 [+0.120, +0.860] n=40"."""
    return f"{summary.mean:+.3f} [{summary.ci_low:+.3f}, {summary.ci_high:+.3f}] n={summary.n}"


def registered_version(plan, trial: int) -> RegisteredVersion | None:
    """The version this study already registered from `trial` (another worker, or an earlier run killed
    after creating it, whose remaining steps are done now); None when there is none. Closes the
    registration runs of this study whose process died first."""
    _close_killed_registrations(plan)
    existing = _registered_for(tracking.client(plan.workspace), plan, trial)
    if existing is None:
        return None
    _finish_registration(plan, existing, trial)
    return _earlier_version(plan, existing)


def _registered_for(registry, plan, trial: int) -> Any | None:
    """The version already registered from this trial of this very study (its key, not just its name), if any."""
    name = device_model_name(plan.device.id)
    # Any error here (a store that fails, a server away) must stop the worker, never read as "none yet":
    # that would register the trial a second time.
    for version in registry.search_model_versions(f"name = '{name}'", max_results=1000):
        tags = version.tags or {}
        if tags.get(TAG_STUDY_KEY) == plan.study_key and tags.get(TAG_BEST_TRIAL) == str(trial):
            return version
    return None


def _close_killed_registrations(plan) -> None:
    """Registration runs of this study whose process died (SIGKILL, power cut) stay RUNNING: close them,
    FINISHED when their version made it into the registry, else KILLED (the rerun registers it anew)."""
    registry = tracking.client(plan.workspace)
    experiment = registry.get_experiment_by_name(plan.experiment)
    if experiment is None:
        return
    runs = registry.search_runs([experiment.experiment_id], f"tags.`{tracking.TAG_OPTUNA_STUDY}` = '{plan.study_name}' and "
                                f"tags.`{tracking.TAG_RUN_KIND}` = '{KIND_FINETUNE_MODEL}' and attributes.status = 'RUNNING'")
    for run in runs:
        if _is_alive(json.loads(run.data.tags.get(WORKER_TAG, "{}"))):
            continue  # a worker sharing the study is registering right now
        registered = registry.search_model_versions(f"run_id = '{run.info.run_id}'")
        registry.set_terminated(run.info.run_id, "FINISHED" if registered else "KILLED")


def _finish_registration(plan, version, trial: int) -> None:
    """The steps after a version's creation, done again where a killed run left them undone: the report's
    copy in the workspace and its tag, and @champion for a version its gate promoted (unless a later
    version has been promoted since)."""
    registry, tags = tracking.client(plan.workspace), version.tags or {}
    local = plan.workspace.reports_dir / plan.device.id / f"v{version.version}"
    written = plan.study_dir / f"report-trial-{trial:04d}"
    if not (local / "report.html").is_file() and (written / "report.html").is_file():
        local.mkdir(parents=True, exist_ok=True)
        for name in ("report.html", "report.json"):
            shutil.copy2(written / name, local / name)
    if TAG_REPORT not in tags and (local / "report.html").is_file():
        registry.set_model_version_tag(version.name, str(version.version), TAG_REPORT, str(local / "report.html"))
    champion = get_alias_version(version.name, CHAMPION, plan.workspace)
    if tags.get(TAG_PROMOTED) == "true" and (champion is None or champion < int(version.version)):
        set_alias(version.name, CHAMPION, int(version.version), plan.workspace)


def _earlier_version(plan, version) -> RegisteredVersion:
    """What the registry says of a version registered earlier: its verdict and reason from its tags."""
    tags = version.tags or {}
    html = Path(tags.get(TAG_REPORT) or plan.workspace.reports_dir / plan.device.id / f"v{version.version}" / "report.html")
    aliases = tracking.client(plan.workspace).get_registered_model(version.name).aliases or {}
    promoted = tags.get(TAG_PROMOTED) == "true" and str(aliases.get(CHAMPION)) == str(version.version)
    return RegisteredVersion(version.name, int(version.version), promoted, tags.get(TAG_REASON, "") + EARLIER,
                             html, html.with_name("report.json"), version.run_id, registered_now=False)
