"""`workbench finetune --device ID`: fit the general model to one replay machine, prove it, register it.

    finetune_device(workspace, "uher-4000-l", trials=6)  ->  FinetuneResult

The orchestrator; each step's work lives in its own module:

1. The plan (`make_plan`, here): everything cheap is checked first (device, speed, recipe, the machine's
   train/validation/test noise, the base model, the Optuna storage), so bad input costs one line and no work.
2. The study (`workbench.train.tuning`): Optuna study `finetune-<device>[@<speed>]-<identity>` (the identity
   digests the base model's weights, the recipe, the noise and the music: one study per question); each
   trial trains the base with the shared loop (`workbench.train.loop.train`) on the machine's TRAIN noise
   and reports validation ΔSNR on its VALIDATION noise to the pruner; each trial is a nested MLflow run
   under the study's run.
3. The best model (`best_model`, here): the best trial's kept weights, or that trial trained again. With
   the recipe's [finetune] hum_template, the machine's hum template is learnt from its TRAIN noise first
   (`machine_hum_template`); the trials train and validate on the noise with that hum cancelled
   (`hum_cancelled_plan`), and the device model cancels it before the network wherever it runs.
4. The evaluation (`workbench.evaluate.device_eval`): on the machine's TEST noise with the research
   protocol (fixed 10 s fragments at 10 and 16 dB) next to the noisy input, the base model, the current
   champion and spectral gating; the gate (`promotion_decision`) promotes only if, at every input SNR
   (fragments pooled over the machine's speeds), the new version's own ΔSNR interval lies above 0 (it does
   no harm) and the paired interval of its gain over the base model and over the previous champion lies
   above the recipe's [evaluation] min_gain_db.
5. The registration: the report (HTML + JSON) is written and the model registered as a new version of
   `tape-denoiser-<device>` with tags, a description and the report; the alias `champion` moves if the
   gate allows.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from workbench import tracking
from workbench.audio.hum import HumTemplate, cancel_hum, learn_hum_template
from workbench.audio.io import MODEL_SAMPLE_RATE, sha256_file, write_audio
from workbench.corpus import corpus_digest, corpus_files
from workbench.devices import format_speed, get_device
from workbench.errors import WorkbenchError
from workbench.evaluate.device_eval import (
    evaluate_models,
    paired_summary,
    promotion_decision,
    summary_by_method,
)
from workbench.evaluate.fragments import evaluation_settings
from workbench.evaluate.report import pooled_paired, study_summary
from workbench.model.checkpoint import config_path_for, load_checkpoint
from workbench.model_registry import (
    CHAMPION,
    device_model_name,
    fetch_checkpoint,
    get_alias_version,
    model_uri,
    resolve_base,
)
from workbench.model_registry.device_models import RegisteredVersion, register_device_model, registered_version
from workbench.model_registry.names import BASE_MODEL, CHAMPION_METHOD, FINE_TUNED
from workbench.noise.library import NoiseLibrary
from workbench.noise.profile import HUM_STANDS_OUT_DB
from workbench.progress import Progress, no_progress
from workbench.recipes import load_recipe, recipe_digest
from workbench.train.loop import BEST_FILE, load_weights
from workbench.train.pretrain import default_device, select_noise
from workbench.train.tuning import (
    describe_storage,
    finetune_settings,
    identity_digest,
    open_plan_study,
    open_storage,
    parse_duration,
    root_trial_number,
    study_identity,
    study_lock,
    study_run,
    train_with_params,
    tune,
    validation_mixtures,
)
from workbench.workspace import Workspace

EXPERIMENT_PREFIX = "finetune-"
HUM_TEMPLATE_SECONDS = 240.0  # blank tape averaged into a hum template (per machine, channels together)


@dataclass
class FinetuneResult:
    device: str
    speeds: list[float]
    study: str
    storage: str
    trials: dict[str, int]  # state -> count
    best_trial: dict
    model_name: str
    version: int
    promoted: bool
    reason: str
    snrs_db: list[float]
    summary: dict[str, dict[str, dict]]  # method -> str(snr) -> {"mean", "ci_low", "ci_high"} (pooled ΔSNR)
    report_html: Path
    report_json: Path
    run_id: str | None
    base: dict = field(default_factory=dict)
    champion_before: int | None = None
    registered_now: bool = True
    # rival -> str(snr) -> {"mean", "ci_low", "ci_high", "half_width", "n"}: fine-tuned − rival, paired ΔSNR
    paired: dict[str, dict[str, dict]] = field(default_factory=dict)
    min_gain_db: float = 0.0
    hum: list[dict] = field(default_factory=list)  # per method, set and input SNR: the mains hum left behind
    hum_template: str = "none"  # the machine's hum cancelled before the network (HumTemplate.summary)

    @property
    def trials_summary(self) -> str:
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(self.trials.items()))
        best = self.best_trial
        return f"{counts}; best trial #{best['number']} (validation ΔSNR {best['value']:+.2f} dB)"

    def table(self) -> dict[str, list[tuple[float, float, float]]]:
        """method -> [(mean, ci_low, ci_high) of ΔSNR per input SNR]."""
        return {method: [(cells[f"{snr:g}"]["mean"], cells[f"{snr:g}"]["ci_low"], cells[f"{snr:g}"]["ci_high"])
                         for snr in self.snrs_db] for method, cells in self.summary.items()}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["report_html"], data["report_json"] = str(self.report_html), str(self.report_json)
        data["model_uri"] = model_uri(self.model_name, self.version)
        return data


# ------------------------------------------------------------------------------------------ the plan

@dataclass
class Plan:
    """Everything `finetune_device` needs, checked before any work starts."""

    workspace: Workspace
    device: Any
    speeds: list[float]
    recipe: dict
    settings: Any  # tuning.FinetuneSettings
    evaluation: Any  # fragments.EvaluationSettings
    noise: dict[str, list]  # split -> snippets
    clean: dict[str, list]  # split -> corpus files
    base_path: Path
    base: dict  # facts about the base model
    base_model: Any  # the loaded base network (CPU)
    storage_url: str
    storage: optuna.storages.BaseStorage  # the study's, opened once (`tuning.open_storage`)
    study_name: str
    label: str  # device or device@speed
    accelerator: str
    trials: int
    timeout_s: float | None
    study_key: str = ""  # the study's own id (a study user attr): names its training folders
    identity: dict = field(default_factory=dict)  # what the study's trials are measured on (tuning.study_identity)

    @property
    def experiment(self) -> str:
        return EXPERIMENT_PREFIX + self.device.id

    @property
    def study_dir(self) -> Path:
        """Trial folders of this very study: a study of the same name in another storage, or one deleted
        and created again, never finds (and resumes) another's training state."""
        assert self.study_key, "open the study first"
        return self.workspace.runs_dir / "finetune" / f"{self.study_name}-{self.study_key}"

    def noise_minutes(self, split: str) -> float:
        return round(sum(s.frames / s.sample_rate for s in self.noise[split]) / 60, 3)


def study_name(device_id: str, speed: float | None, identity: dict[str, str]) -> str:
    """`finetune-<device>[@<speed>]-<identity digest>`: a study answers one question, so a run with another
    base model, recipe, noise or music starts its own study, and a rerun with the same ones resumes it."""
    return f"finetune-{device_id}" + (f"@{format_speed(speed)}" if speed is not None else "") + \
        f"-{identity_digest(identity)}"


def _plan_identity(base_path: Path, base: dict, recipe: dict, noise: dict[str, list], clean: dict[str, list]) -> dict:
    config = json.loads(config_path_for(base_path).read_text()) if config_path_for(base_path).is_file() else {}
    weights = config.get("weights_sha256") or sha256_file(base_path)  # load_checkpoint has checked it against the file
    version = f"{base['name']} v{base['version']}, " if base.get("version") is not None else ""
    return study_identity(base=f"{version}sha256 {weights[:16]}", recipe=recipe_digest(recipe),
                          noise=NoiseLibrary.digest([s for split in noise.values() for s in split])[:16],
                          corpus=corpus_digest([f for split in clean.values() for f in split]))


def make_plan(workspace: Workspace, device_id: str, *, speed: float | None = None, base: str | None = None,
              recipe: str | Path = "quickstart", steps: int | None = None, trials: int | None = None,
              timeout: str | float | None = None, storage: str | None = None, accelerator: str = "auto") -> Plan:
    """Validate every input (one-line errors) and gather the data selection; nothing is trained or written."""
    device = get_device(workspace, device_id)
    speeds = [device.check_speed(speed)] if speed is not None else list(device.speeds_ips)
    loaded = load_recipe(recipe, workspace, {"schedule.steps": steps} if steps is not None else None)
    settings = finetune_settings(loaded)
    evaluation = evaluation_settings(loaded)

    # The machine's noise: every chosen speed needs train, validation and test snippets. Without --speed,
    # the speeds with no noise at all are left out (a machine is often captured at one speed only).
    if speed is None:
        captured = {float(s.speed_ips) for s in NoiseLibrary(workspace).snippets(device=device.id)}
        speeds = [s for s in speeds if any(abs(s - c) < 1e-6 for c in captured)]
        if not speeds:
            raise WorkbenchError(f"device {device.id}: the noise library has no noise of it; record blank tape on it and "
                                 f"run `workbench capture-noise --device {device.id} --speed IPS FILE`")
    noise = {split: select_noise(workspace, [device.id], speeds, split) for split in ("test", "validation", "train")}
    for split in ("test", "validation", "train"):
        for s in speeds:
            if not any(abs(float(n.speed_ips) - s) < 1e-6 for n in noise[split]):
                raise WorkbenchError(f"device {device.id}: no {split} noise at {format_speed(s)} ips in the noise library "
                                     f"(capture more blank tape at that speed, or choose --speed)")
    corpora = loaded["data"]["corpora"]
    clean = {split: corpus_files(workspace, split, corpora) for split in ("train", "validation", "test")}

    base_path, base_facts = resolve_base(workspace, base)
    base_model, _ = load_checkpoint(base_path, device="cpu")
    base_size = base_model.config.size
    if base_size != loaded["model"]["size"]:
        raise WorkbenchError(f"recipe {loaded['name']} is for the {loaded['model']['size']!r} size but the base "
                             f"{base_facts['uri']} is {base_size!r}: choose a recipe for that size (e.g. finetune-paper for paper)")
    base_facts["size"] = base_size

    storage_url = storage or workspace.optuna_storage()
    opened = open_storage(storage_url)  # unreachable storage: one line, before any work

    accelerator = default_device() if accelerator in (None, "", "auto") else accelerator
    if accelerator.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"--accelerator {accelerator}: no CUDA GPU is available here (use cpu)")
    timeout_s = parse_duration(timeout) if timeout is not None else settings.timeout_s
    identity = _plan_identity(base_path, base_facts, loaded, noise, clean)
    name = study_name(device.id, speed, identity)
    label = device.id + (f"@{format_speed(speed)}" if speed is not None else "")
    return Plan(workspace, device, speeds, loaded, settings, evaluation, noise, clean, base_path, base_facts,
                base_model, storage_url, opened, name, label, accelerator, trials or settings.trials, timeout_s,
                identity=identity)


# ------------------------------------------------------------------------------------------ evaluation



# ------------------------------------------------------------------------------------------ the command

def finetune_device(workspace: Workspace, device_id: str, *, speed: float | None = None, base: str | None = None,
                    recipe: str | Path = "quickstart", steps: int | None = None, trials: int | None = None,
                    timeout: str | float | None = None, storage: str | None = None, accelerator: str = "auto",
                    progress: Progress = no_progress) -> FinetuneResult:
    """Tune, evaluate, report and register a device model; see the module docstring.

    `steps` replaces the recipe's schedule.steps (each trial's length); the study's name changes with it.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # 1. The plan: every input checked, nothing written yet.
    plan = make_plan(workspace, device_id, speed=speed, base=base, recipe=recipe, steps=steps, trials=trials,
                     timeout=timeout, storage=storage, accelerator=accelerator)
    # 2. The study: join it, its fixed validation mixtures, its MLflow run (with the data's lineage), its trials.
    study = open_plan_study(plan)
    # The machine's hum template, if the recipe asks: the network then trains and validates on the machine's
    # noise with that hum cancelled, as it will meet it (the evaluation and lineage keep the noise as it is).
    hum_template = machine_hum_template(plan, progress)
    training = hum_cancelled_plan(plan, hum_template, progress)
    progress("validation mixtures", 0, 1)
    validation = validation_mixtures(training)
    progress("validation mixtures", 1, 1)
    parent_id, created = study_run(plan, study)
    with tracking.start_run(plan.experiment, run_id=parent_id, workspace=plan.workspace):
        lineage = _log_study_inputs(plan, validation, created, hum_template)
        tune(training, study, validation, progress)
        best, info = study.best_trial, study_summary(study)
        # Every worker of the study ends here having seen the same trials; one at a time, so the first
        # registers the best trial and the others find its version.
        with study_lock(plan.storage_url, plan.study_name):
            # 3. The best model (unless this study registered it already).
            earlier = registered_version(plan, best.number)
            if earlier is not None:
                return _result_from_report(plan, info, earlier)
            model = best_model(training, best, validation, progress)
            model.hum_template = hum_template
            # 4. The evaluation: beside the baselines, the base model and the champion; the gate.
            champion = get_alias_version(device_model_name(plan.device.id), CHAMPION, plan.workspace)
            result = evaluate_models(plan, _scored_models(plan, model, champion), progress)
            promoted, reason = promotion_decision(result, list(plan.evaluation.snrs_db), champion,
                                                  plan.evaluation.min_gain_db)
            # 5. The registration: report, version, tags, @champion if the gate allows.
            registered = register_device_model(plan, study, info, best, model, result, lineage, champion, promoted,
                                               reason)
            return _result_from_evaluation(plan, info, registered, result, champion, hum_template)


def _log_study_inputs(plan: Plan, validation, created: bool, hum_template: HumTemplate | None = None) -> dict:
    """Log what the study's trials are measured on into its run (the recipe and system once, when the run
    was created); returns the data's lineage."""
    if created:
        tracking.log_recipe(plan.recipe)
        tracking.log_system_info(plan.accelerator)
    # Workers share the study's run: two logging the same datasets at once collide in MLflow's store.
    with study_lock(plan.storage_url, plan.study_name):
        return tracking.log_lineage(
            plan.workspace, {"training": plan.noise["train"], "validation": plan.noise["validation"], "test": plan.noise["test"]},
            {"training": plan.clean["train"], "validation": plan.clean["validation"], "test": plan.clean["test"]},
            extra={"base_model": plan.base, "validation_mixtures": {"key": validation.key, "path": str(validation.path)},
                   "hum_template": hum_template.to_dict() if hum_template is not None else None})


def best_model(plan: Plan, best, validation, progress: Progress = no_progress):
    """The best trial's network: its kept weights, or trained again when the trial ran on another host."""
    weights = plan.study_dir / f"trial-{root_trial_number(best):04d}" / BEST_FILE
    model = copy.deepcopy(plan.base_model)
    if not weights.is_file():
        retrain_dir = plan.study_dir / f"retrain-{best.number:04d}"
        train_with_params(plan, best.params, retrain_dir, base_model=plan.base_model, validation=validation,
                          progress=progress, stage=f"retrain trial {best.number}")
        weights = retrain_dir / BEST_FILE
    load_weights(model, weights)
    return model.eval()


def machine_hum_template(plan: Plan, progress: Progress = no_progress) -> HumTemplate | None:
    """The machine's hum template (`workbench.audio.hum`), learnt from its TRAIN noise at the speed with
    the most of it whose noise profile shows a hum family, from the harmonics that stand out there; None
    when the recipe does not ask for one ([finetune] hum_template) or no profile shows hum."""
    if not plan.settings.hum_template:
        return None
    library = NoiseLibrary(plan.workspace)
    found = []
    for speed in plan.speeds:
        profile = library.profile(plan.device.id, speed)
        if profile is not None and profile.hum is not None:
            snippets = [s for s in plan.noise["train"] if abs(float(s.speed_ips) - speed) < 1e-6]
            found.append((sum(s.frames for s in snippets), profile.hum, snippets))
    if not found:
        return None
    _, hum, snippets = max(found, key=lambda entry: entry[0])
    harmonics = [k for k, (_, level) in enumerate(hum.harmonics_db, start=1) if level >= HUM_STANDS_OUT_DB]
    kept, frames = [], 0
    for snippet in snippets:  # enough blank tape for a steady average, not all of a large library
        if frames >= HUM_TEMPLATE_SECONDS * MODEL_SAMPLE_RATE:
            break
        kept.append(snippet)
        frames += snippet.frames
    progress("hum template", 0, 1)
    template = learn_hum_template(((s.channel, s.load()) for s in kept), hum.fundamental_hz, harmonics)
    progress("hum template", 1, 1)
    return template


def hum_cancelled_plan(plan: Plan, template: HumTemplate | None, progress: Progress = no_progress) -> Plan:
    """`plan` with its TRAIN and VALIDATION noise replaced by copies with the machine's hum cancelled
    (each snippet by its own channel's shape), written once under registry/mixtures/hum-cancelled/<digest>/;
    `plan` itself without a template."""
    if template is None:
        return plan
    digest = hashlib.sha256(json.dumps(template.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    folder = plan.workspace.mixtures_dir / "hum-cancelled" / digest

    def cancelled(snippet):
        path = folder / f"{snippet.sha256}.wav"
        if not path.is_file():
            own = (replace(template, shapes=(template.shapes[snippet.channel],))
                   if snippet.channel < len(template.shapes) else template)
            write_audio(path, cancel_hum(snippet.load(), own), MODEL_SAMPLE_RATE, subtype="FLOAT")
        return replace(snippet, path=path, sha256=f"{snippet.sha256}-hum-{digest}")

    noise, done = dict(plan.noise), 0
    total = len(plan.noise["train"]) + len(plan.noise["validation"])
    for split in ("train", "validation"):
        copies = []
        for snippet in plan.noise[split]:
            progress("hum-cancelled noise", done, total)
            copies.append(cancelled(snippet))
            done += 1
        noise[split] = copies
    progress("hum-cancelled noise", total, total)
    return replace(plan, noise=noise)


def _scored_models(plan: Plan, model, champion: int | None) -> dict:
    """The networks evaluated beside the baselines: base, fine-tuned and (if there is one) the champion."""
    models = {BASE_MODEL: plan.base_model.eval(), FINE_TUNED: model}
    if champion is not None:
        name = device_model_name(plan.device.id)
        path, _ = fetch_checkpoint(model_uri(name, alias=CHAMPION), plan.workspace)
        models[CHAMPION_METHOD] = load_checkpoint(path, device="cpu")[0]
    return models


def _result_from_evaluation(plan: Plan, info: dict, registered: RegisteredVersion, result,
                            champion: int | None, hum_template: HumTemplate | None = None) -> FinetuneResult:
    """The result of a version registered now, summarised from its evaluation."""
    snrs = list(plan.evaluation.snrs_db)
    return FinetuneResult(plan.device.id, plan.speeds, plan.study_name, describe_storage(plan.storage_url),
                          info["counts"], info["best"], registered.model_name, registered.version, registered.promoted,
                          registered.reason, snrs, summary_by_method(result, snrs), registered.report_html,
                          registered.report_json, registered.run_id, plan.base, champion,
                          paired=paired_summary(result, snrs, champion), min_gain_db=plan.evaluation.min_gain_db,
                          hum=result.to_dict()["hum"],
                          hum_template=hum_template.summary() if hum_template is not None else "none")


def _result_from_report(plan: Plan, info: dict, registered: RegisteredVersion) -> FinetuneResult:
    """The result of a version this study already registered (another worker, or an earlier run), read
    back from its report.json."""
    path = registered.report_json
    report = json.loads(path.read_text()) if path.is_file() else {}
    summary: dict[str, dict[str, dict]] = {}
    for row in report.get("evaluation", {}).get("summary", []):
        if row["set"] == "all" or len(report["evaluation"]["fragment_sets"]) == 1:
            cell = row["delta_snr"]
            summary.setdefault(row["method"], {})[f"{row['input_snr_db']:g}"] = {
                k: cell[k] for k in ("mean", "ci_low", "ci_high", "n")}
    return FinetuneResult(plan.device.id, plan.speeds, plan.study_name, describe_storage(plan.storage_url),
                          info["counts"], info["best"], registered.model_name, registered.version, registered.promoted,
                          registered.reason, list(plan.evaluation.snrs_db), summary, registered.report_html, path,
                          registered.run_id, plan.base, None, registered_now=False, paired=pooled_paired(report),
                          min_gain_db=float((report.get("paired") or {}).get("min_gain_db") or 0.0),
                          hum=report.get("evaluation", {}).get("hum", []),
                          hum_template=(report.get("model") or {}).get("hum_template", "none"))
