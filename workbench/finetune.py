"""`workbench finetune --device ID`: fit the general model to one replay machine, prove it, register it.

    finetune_device(workspace, "uher-4000-l", trials=6)  ->  FinetuneResult

1. Check everything cheap first (device, speed, recipe, the machine's train/validation/test noise, the
   base model, the Optuna storage), so bad input costs one line and no work.
2. Optuna study `finetune-<device>[@<speed>]-<identity>` (the identity digests the base model's weights, the
   recipe, the noise and the music: one study per question, `tuning.study_identity`; see
   `workbench.train.tuning`): each trial trains the base with the shared loop (`workbench.train.loop.train`)
   on the machine's TRAIN noise and reports validation ΔSNR on its VALIDATION noise to the pruner; each
   trial is a nested MLflow run under the study's run.
3. The best trial's weights are evaluated on the machine's TEST noise with the research protocol (fixed
   10 s fragments at 10 and 16 dB) next to the noisy input, the base model, the current champion and
   spectral gating; the report (HTML + JSON) is written.
4. Registered as a new version of `tape-denoiser-<device>` with tags, a description and the report; the
   alias `champion` moves only if, at every input SNR (fragments pooled over the machine's speeds), the
   new version's own ΔSNR interval lies above 0 (it does no harm) and the paired interval of its gain
   over the base model and over the previous champion lies above the recipe's [evaluation] min_gain_db
   (see `promotion_decision`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.devices import format_speed, get_device
from workbench.errors import WorkbenchError
from workbench.model_registry import (
    CHAMPION,
    device_model_name,
    fetch_checkpoint,
    get_alias_version,
    model_uri,
    resolve_base,
)
from workbench.model_registry.device_models import RegisteredVersion, register_device_model, registered_version
from workbench.model_registry.names import BASE_MODEL, CHAMPION_METHOD, FINE_TUNED, rivals
from workbench.progress import Progress, no_progress
from workbench.workspace import Workspace

EXPERIMENT_PREFIX = "finetune-"
NOISY_INPUT = "noisy input"  # = workbench.evaluate.baselines.NOISY_INPUT
SPECTRAL_GATING = "spectral gating"  # = workbench.evaluate.baselines.SPECTRAL_GATING
# Spectral gating is given this much of the machine's train noise as its noise profile.
GATING_NOISE_SECONDS = 10.0
STUDY_RUN_ATTR = "mlflow_run_id"
STUDY_KEY_ATTR = "workbench_key"


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
    from workbench.train.tuning import identity_digest

    return f"finetune-{device_id}" + (f"@{format_speed(speed)}" if speed is not None else "") + \
        f"-{identity_digest(identity)}"


def _plan_identity(base_path: Path, base: dict, recipe: dict, noise: dict[str, list], clean: dict[str, list]) -> dict:
    from workbench.audio.io import sha256_file
    from workbench.corpus import corpus_digest
    from workbench.model.checkpoint import config_path_for
    from workbench.noise.library import NoiseLibrary
    from workbench.recipes import recipe_digest
    from workbench.train.tuning import study_identity

    config = json.loads(config_path_for(base_path).read_text()) if config_path_for(base_path).is_file() else {}
    weights = config.get("weights_sha256") or sha256_file(base_path)  # load_checkpoint has checked it against the file
    version = f"{base['name']} v{base['version']}, " if base.get("version") is not None else ""
    return study_identity(base=f"{version}sha256 {weights[:16]}", recipe=recipe_digest(recipe),
                          noise=NoiseLibrary.digest([s for split in noise.values() for s in split])[:16],
                          corpus=corpus_digest([f for split in clean.values() for f in split]))


def make_plan(workspace: Workspace, device_id: str, *, speed: float | None = None, base: str | None = None,
              recipe: str | Path = "quickstart", trials: int | None = None, timeout: str | float | None = None,
              storage: str | None = None, accelerator: str = "auto") -> Plan:
    """Validate every input (one-line errors) and gather the data selection; nothing is trained or written."""
    import torch

    from workbench.corpus import corpus_files
    from workbench.evaluate.fragments import evaluation_settings
    from workbench.model.checkpoint import load_checkpoint
    from workbench.recipes import load_recipe
    from workbench.train.pretrain import default_device, select_noise
    from workbench.train.tuning import finetune_settings, open_storage, parse_duration

    device = get_device(workspace, device_id)
    speeds = [device.check_speed(speed)] if speed is not None else list(device.speeds_ips)
    loaded = load_recipe(recipe, workspace)
    settings = finetune_settings(loaded)
    evaluation = evaluation_settings(loaded)

    # The machine's noise: every chosen speed needs train, validation and test snippets. Without --speed,
    # the speeds with no noise at all are left out (a machine is often captured at one speed only).
    if speed is None:
        from workbench.noise.library import NoiseLibrary

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
    open_storage(storage_url)  # unreachable storage: one line, before any work

    accelerator = default_device() if accelerator in (None, "", "auto") else accelerator
    if accelerator.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"--accelerator {accelerator}: no CUDA GPU is available here (use cpu)")
    timeout_s = parse_duration(timeout) if timeout is not None else settings.timeout_s
    identity = _plan_identity(base_path, base_facts, loaded, noise, clean)
    name = study_name(device.id, speed, identity)
    label = device.id + (f"@{format_speed(speed)}" if speed is not None else "")
    return Plan(workspace, device, speeds, loaded, settings, evaluation, noise, clean, base_path, base_facts,
                base_model, storage_url, name, label, accelerator, trials or settings.trials, timeout_s,
                identity=identity)


# ------------------------------------------------------------------------------------------ the study

def _validation_mixtures(plan: Plan):
    """The machine's fixed validation mixtures (the recipe's mixing, never a trial's), built once."""
    from workbench.recipes import validation_seconds
    from workbench.train.data import MixingSpec, stored_mixtures

    data = plan.recipe["data"]
    return stored_mixtures(plan.workspace.mixtures_dir, f"validation-{plan.device.id}", plan.clean["validation"],
                           plan.noise["validation"], data["validation_mixtures"], validation_seconds(plan.recipe),
                           MixingSpec.from_recipe(data), data["seed"], data["silence_dbfs"])


def trial_schedule(plan: Plan, params: dict):
    """A trial's recipe and Schedule: the recipe with the trial's overrides, the loop's finetune settings."""
    from workbench.recipes import apply_overrides
    from workbench.train.loop import Schedule
    from workbench.train.tuning import freeze_groups, trial_overrides

    recipe_changes, loop_changes = trial_overrides(params)
    recipe = apply_overrides(plan.recipe, recipe_changes) if recipe_changes else plan.recipe
    freeze = freeze_groups(loop_changes.get("freeze", list(plan.settings.freeze)))
    schedule = Schedule.from_recipe(recipe, validate_every=plan.settings.validate_every, freeze=freeze,
                                    l2sp_alpha=float(loop_changes.get("l2sp_alpha", plan.settings.l2sp_alpha)))
    return recipe, schedule


def train_with_params(plan: Plan, params: dict, run_dir: Path, *, base_model, validation, progress: Progress,
                      stage: str, on_validation=None, log_metrics=None):
    """Train a copy of the base with one trial's parameters (resuming `run_dir` if it holds a state)."""
    from workbench.train.data import MixingSpec, TrainingExamples
    from workbench.train.loop import read_state, train

    recipe, schedule = trial_schedule(plan, params)
    data = recipe["data"]
    examples = TrainingExamples(plan.clean["train"], plan.noise["train"], round(data["segment_seconds"] * 44_100),
                                MixingSpec.from_recipe(data), data["seed"], data["silence_dbfs"])
    model = copy.deepcopy(base_model)
    base_weights = {name: p.detach().clone() for name, p in base_model.named_parameters()} if schedule.l2sp_alpha > 0 else None
    resume = read_state(run_dir) is not None
    return train(model, schedule, examples, validation, run_dir, device=plan.accelerator, resume=resume,
                 num_workers=data["num_workers"], base_weights=base_weights, progress=progress,
                 log_metrics=log_metrics, on_validation=on_validation, stage=stage), model


def _objective(plan: Plan, study, base_model, validation, progress: Progress):
    """The Optuna objective: train one trial's schedule, report validation ΔSNR, prune or return the best."""
    import optuna

    from workbench import tracking
    from workbench.train.loop import read_state
    from workbench.train.tuning import root_trial_number

    def objective(trial: optuna.Trial) -> float:
        import mlflow

        params = {d.name: d.suggest(trial) for d in plan.settings.dimensions}
        frozen = study._storage.get_trial(trial._trial_id)
        run_dir = plan.study_dir / f"trial-{root_trial_number(frozen):04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        saved = read_state(run_dir)
        for record in (saved[1]["history"] if saved else []):  # a retried trial: the pruner sees its past
            trial.report(record["val_delta_snr_db"], record["step"])
        if saved and trial.should_prune():
            raise optuna.TrialPruned(f"on resume, at step {saved[1]['step']}")

        def on_validation(step: int, record: dict) -> bool:
            trial.report(record["val_delta_snr_db"], step)
            return trial.should_prune()

        with tracking.start_run(plan.experiment, run_name=f"trial {trial.number}", nested=True, workspace=plan.workspace,
                                tags={"optuna.study": plan.study_name, "optuna.trial": str(trial.number),
                                      "workbench.kind": "finetune-trial", "run_dir": str(run_dir)}) as run:
            trial.set_user_attr(STUDY_RUN_ATTR, run.info.run_id)
            mlflow.log_params({k: str(v) for k, v in params.items()})
            result, _ = train_with_params(plan, params, run_dir, base_model=base_model, validation=validation,
                                          progress=progress, stage=f"trial {trial.number}", on_validation=on_validation,
                                          log_metrics=tracking.log_metrics)
            pruned = result.stopped == "callback"
            mlflow.set_tag("optuna.state", "PRUNED" if pruned else "COMPLETE")
            if not pruned:
                mlflow.log_metrics({"best_val_delta_snr_db": result.best["val_delta_snr_db"],
                                    "best_val_loss": result.best["val_loss"], "best_step": result.best["step"]})
        if pruned:
            raise optuna.TrialPruned(f"at step {result.step}")
        trial.set_user_attr("best_step", int(result.best["step"]))
        return float(result.best["val_delta_snr_db"])

    return objective


def _close_abandoned_runs(study, client) -> None:
    """The MLflow runs of trials whose process died stay RUNNING forever: mark them KILLED."""
    import optuna

    from workbench.train.tuning import INTERRUPTED_ATTR, heartbeat_failed_trials

    silent = heartbeat_failed_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run_id = trial.user_attrs.get(STUDY_RUN_ATTR)
        if run_id and (INTERRUPTED_ATTR in trial.user_attrs or trial.number in silent):
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, "KILLED")
            except Exception:  # the run is gone (another store): nothing to close
                pass


def _study_run(plan: Plan, study) -> tuple[str, bool]:
    """The MLflow run that holds the study's trials, and whether this call created it: the one recorded
    in the study if it still exists, else a new one. Under the study's lock, so that workers started
    together share one run."""
    from mlflow.exceptions import MlflowException

    from workbench import tracking
    from workbench.train.tuning import describe_storage, study_lock

    registry = tracking.client(plan.workspace)
    with study_lock(plan.storage_url, plan.study_name):
        run_id = study._storage.get_study_user_attrs(study._study_id).get(STUDY_RUN_ATTR)  # not a cached copy
        if run_id:
            try:
                registry.get_run(run_id)
                return run_id, False
            except MlflowException as error:  # deleted, or recorded in another tracking store: start a new one
                if error.get_http_status_code() != 404:
                    raise
        run = registry.create_run(
            tracking.experiment_id(plan.experiment, plan.workspace), run_name=plan.study_name,
            tags={"workbench.kind": "finetune-study", "optuna.study": plan.study_name,
                  "optuna.storage": describe_storage(plan.storage_url), "device": plan.device.id})
        study.set_user_attr(STUDY_RUN_ATTR, run.info.run_id)
        return run.info.run_id, True


# ------------------------------------------------------------------------------------------ evaluation

def _model_method(model):
    """A model as an evaluation method: the pyfunc wrapper's chunked inference (what `denoise` runs,
    many chunks per forward call)."""
    from workbench.denoise import denoise_samples

    def run(noisy: np.ndarray) -> np.ndarray:
        return denoise_samples(model, noisy)

    return run


def _gating_noise(plan: Plan, speed: float | None) -> np.ndarray:
    """Spectral gating's noise profile: up to GATING_NOISE_SECONDS of the machine's TRAIN noise at that speed."""
    snippets = [s for s in plan.noise["train"] if speed is None or abs(float(s.speed_ips) - float(speed)) < 1e-6]
    parts, total = [], 0
    for snippet in snippets:
        parts.append(snippet.load())
        total += parts[-1].shape[0]
        if total >= GATING_NOISE_SECONDS * 44_100:
            break
    return np.concatenate(parts)[: int(GATING_NOISE_SECONDS * 44_100)]


def evaluate_models(plan: Plan, models: dict[str, Any], progress: Progress = no_progress):
    """Score the models (name -> TwoStageUNet) with the noisy input and spectral gating on the machine's
    test fragments, one fragment set per speed."""
    from workbench.evaluate.baselines import noisy_input, spectral_gating
    from workbench.evaluate.evaluate import PerSet, evaluate_methods
    from workbench.evaluate.fragments import evaluation_fragments

    settings = plan.evaluation
    sets = []
    for speed in plan.speeds:
        snippets = [s for s in plan.noise["test"] if abs(float(s.speed_ips) - speed) < 1e-6]
        sets.append(evaluation_fragments(plan.workspace.mixtures_dir, plan.device.id, speed, plan.clean["test"], snippets,
                                         count=settings.fragments, seconds=settings.seconds, seed=settings.seed,
                                         snrs_db=settings.snrs_db, silence_dbfs=plan.recipe["data"]["silence_dbfs"],
                                         progress=progress))
    methods: dict[str, Any] = {NOISY_INPUT: noisy_input}
    methods |= {name: _model_method(model) for name, model in models.items()}
    methods[SPECTRAL_GATING] = PerSet(lambda fragment_set: spectral_gating(_gating_noise(plan, fragment_set.speed)),
                                      noise_gains=True)
    return evaluate_methods(sets, methods, batch_size=settings.batch_size, hum_hz=_hum_fundamentals(plan, sets),
                            progress=progress, peaq=settings.peaq)


def _hum_fundamentals(plan: Plan, sets) -> dict[str, float]:
    """Set label -> the mains hum fundamental of the machine's noise profile at that speed (sets whose
    noise has no hum that stands out are left out: there is no hum to measure)."""
    from workbench.noise.library import NoiseLibrary

    library = NoiseLibrary(plan.workspace)
    found = {}
    for fragment_set in sets:
        profile = library.profile(plan.device.id, fragment_set.speed)
        if profile is not None and profile.hum is not None:
            found[fragment_set.label] = profile.hum.fundamental_hz
    return found


def promotion_decision(result, snrs: list[float], champion_version: int | None,
                       min_gain_db: float = 0.0) -> tuple[bool, str]:
    """The gate. Promote only when, at every input SNR (fragments pooled over the machine's speeds):
    the fine-tuned model's own ΔSNR 95 % interval lies above 0 (it does no harm on average), and the
    95 % t-interval of its paired ΔSNR gain (per fragment, fine-tuned − rival) over the base model and
    over the current champion lies above `min_gain_db`. A gain whose interval reaches down to the
    threshold is not resolved and does not count. The reason names each rival, input SNR and interval
    that failed (or, when promoted, the gains)."""
    failures, gains = [], []
    for snr in snrs:
        own = result.summary(FINE_TUNED, snr)
        if not own.lies_above(0.0):
            failures.append(f"may make recordings worse at {snr:g} dB input: its own ΔSNR {own.interval_text()} "
                            "does not lie above 0 dB")
    for method, shown in rivals(champion_version):
        for snr in snrs:
            gain = result.paired(FINE_TUNED, method, snr)
            if gain.lies_above(min_gain_db):
                gains.append(f"{shown} by {gain.interval_text()} at {snr:g} dB input")
            else:
                worse = " (worse)" if gain.n >= 2 and gain.ci_high < 0 else ""
                failures.append(f"does not beat {shown} at {snr:g} dB input: paired ΔSNR gain {gain.interval_text()}"
                                f"{worse} does not lie above {min_gain_db:+g} dB")
    if failures:
        return False, "; ".join(failures)
    return True, "beats " + ", ".join(gains) + " (paired ΔSNR gain, 95 % interval); its own ΔSNR lies above 0 dB " \
                 "at every input SNR"


def _paired_summary(result, snrs: list[float], champion_version: int | None) -> dict[str, dict[str, dict]]:
    """rival method -> str(snr) -> the paired ΔSNR gain of the fine-tuned model over it."""
    return {method: {f"{snr:g}": {k: v for k, v in result.paired(FINE_TUNED, method, snr).to_dict().items()
                                  if k in ("mean", "ci_low", "ci_high", "half_width", "n")} for snr in snrs}
            for method, _ in rivals(champion_version)}


def _summary(result, snrs: list[float]) -> dict[str, dict[str, dict]]:
    return {method: {f"{snr:g}": {k: v for k, v in result.summary(method, snr).to_dict().items()
                                  if k in ("mean", "ci_low", "ci_high", "n")} for snr in snrs}
            for method in result.methods}


# ------------------------------------------------------------------------------------------ the command

def finetune_device(workspace: Workspace, device_id: str, *, speed: float | None = None, base: str | None = None,
                    recipe: str | Path = "quickstart", trials: int | None = None, timeout: str | float | None = None,
                    storage: str | None = None, accelerator: str = "auto",
                    progress: Progress = no_progress) -> FinetuneResult:
    """Tune, evaluate, report and register a device model; see the module docstring."""
    import optuna

    from workbench import tracking
    from workbench.evaluate.report import study_summary
    from workbench.train.tuning import describe_storage, study_lock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = make_plan(workspace, device_id, speed=speed, base=base, recipe=recipe, trials=trials, timeout=timeout,
                     storage=storage, accelerator=accelerator)
    study = _open_study(plan)
    progress("validation mixtures", 0, 1)
    validation = _validation_mixtures(plan)
    progress("validation mixtures", 1, 1)
    parent_id, created = _study_run(plan, study)
    with tracking.start_run(plan.experiment, run_id=parent_id, workspace=plan.workspace):
        if created:
            tracking.log_recipe(plan.recipe)
            tracking.log_system_info(plan.accelerator)
        # Workers share the study's run: two logging the same datasets at once collide in MLflow's store.
        with study_lock(plan.storage_url, plan.study_name):
            lineage = tracking.log_lineage(
                plan.workspace, {"training": plan.noise["train"], "validation": plan.noise["validation"], "test": plan.noise["test"]},
                {"training": plan.clean["train"], "validation": plan.clean["validation"], "test": plan.clean["test"]},
                extra={"base_model": plan.base, "validation_mixtures": {"key": validation.key, "path": str(validation.path)}})

        tune(plan, study, validation, progress)
        best, info = study.best_trial, study_summary(study)
        # Every worker of the study ends here having seen the same trials; one at a time, so the first
        # registers the best trial and the others find its version.
        with study_lock(plan.storage_url, plan.study_name):
            earlier = registered_version(plan, best.number)
            if earlier is not None:
                return _result_from_report(plan, info, earlier)
            model = best_model(plan, best, validation, progress)
            champion = get_alias_version(device_model_name(plan.device.id), CHAMPION, plan.workspace)
            result = evaluate_models(plan, _scored_models(plan, model, champion), progress)
            promoted, reason = promotion_decision(result, list(plan.evaluation.snrs_db), champion,
                                                  plan.evaluation.min_gain_db)
            registered = register_device_model(plan, study, info, best, model, result, lineage, champion, promoted,
                                               reason)
            return _result_from_evaluation(plan, info, registered, result, champion)


def _open_study(plan: Plan):
    """Create or join the plan's study; its key (a study attribute) names the trials' training folders."""
    import uuid

    from workbench.train.tuning import check_identity, make_pruner, open_study, study_lock

    study = open_study(plan.study_name, plan.storage_url, seed=plan.settings.seed, pruner=make_pruner(plan.settings.pruner))
    with study_lock(plan.storage_url, plan.study_name):  # workers started together: the first one sets the key
        check_identity(study, plan.identity, plan.storage_url)
        if STUDY_KEY_ATTR not in study.user_attrs:
            study.set_user_attr(STUDY_KEY_ATTR, uuid.uuid4().hex[:12])
            study.set_user_attr("device", plan.device.id)
            study.set_user_attr("speeds", [float(s) for s in plan.speeds])
        plan.study_key = study.user_attrs[STUDY_KEY_ATTR]
    return study


def tune(plan: Plan, study, validation, progress: Progress = no_progress) -> None:
    """Run the study's missing trials (after recovering those of dead workers); at least one must complete."""
    import optuna

    from workbench import tracking
    from workbench.evaluate.report import BASELINE_ATTR
    from workbench.train.tuning import FINISHED, finished_trials, recover_abandoned_trials, run_study

    def study_progress(*_):
        progress(f"study {plan.study_name}", finished_trials(study), plan.trials)

    recover_abandoned_trials(study)
    _close_abandoned_runs(study, tracking.client(plan.workspace))
    if BASELINE_ATTR not in study.user_attrs:  # the line every trial must clear, drawn in the report
        from workbench.train.loop import validate

        progress("validate the base model", 0, 1)
        scores = validate(copy.deepcopy(plan.base_model).to(plan.accelerator), validation, plan.accelerator)
        study.set_user_attr(BASELINE_ATTR, scores["val_delta_snr_db"])
        progress("validate the base model", 1, 1)
    study_progress()
    run_study(study, _objective(plan, study, plan.base_model, validation, progress), trials=plan.trials,
              timeout_s=plan.timeout_s, callbacks=[study_progress])
    _close_abandoned_runs(study, tracking.client(plan.workspace))  # those of peers the heartbeat found dead
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        counts = {s.name.lower(): n for s in FINISHED if (n := len(study.get_trials(deepcopy=False, states=(s,))))}
        raise WorkbenchError(f"study {plan.study_name}: no trial completed ({counts or 'none ran'}); widen "
                             "[finetune.search], loosen [finetune.pruner] or give more --trials / --timeout")


def best_model(plan: Plan, best, validation, progress: Progress = no_progress):
    """The best trial's network: its kept weights, or trained again when the trial ran on another host."""
    from workbench.train.loop import BEST_FILE, load_weights
    from workbench.train.tuning import root_trial_number

    weights = plan.study_dir / f"trial-{root_trial_number(best):04d}" / BEST_FILE
    model = copy.deepcopy(plan.base_model)
    if not weights.is_file():
        retrain_dir = plan.study_dir / f"retrain-{best.number:04d}"
        train_with_params(plan, best.params, retrain_dir, base_model=plan.base_model, validation=validation,
                          progress=progress, stage=f"retrain trial {best.number}")
        weights = retrain_dir / BEST_FILE
    load_weights(model, weights)
    return model.eval()


def _scored_models(plan: Plan, model, champion: int | None) -> dict:
    """The networks evaluated beside the baselines: base, fine-tuned and (if there is one) the champion."""
    from workbench.model.checkpoint import load_checkpoint

    models = {BASE_MODEL: plan.base_model.eval(), FINE_TUNED: model}
    if champion is not None:
        name = device_model_name(plan.device.id)
        path, _ = fetch_checkpoint(model_uri(name, alias=CHAMPION), plan.workspace)
        models[CHAMPION_METHOD] = load_checkpoint(path, device="cpu")[0]
    return models


def _result_from_evaluation(plan: Plan, info: dict, registered: RegisteredVersion, result,
                            champion: int | None) -> FinetuneResult:
    """The result of a version registered now, summarised from its evaluation."""
    from workbench.train.tuning import describe_storage

    snrs = list(plan.evaluation.snrs_db)
    return FinetuneResult(plan.device.id, plan.speeds, plan.study_name, describe_storage(plan.storage_url),
                          info["counts"], info["best"], registered.model_name, registered.version, registered.promoted,
                          registered.reason, snrs, _summary(result, snrs), registered.report_html,
                          registered.report_json, registered.run_id, plan.base, champion,
                          paired=_paired_summary(result, snrs, champion), min_gain_db=plan.evaluation.min_gain_db,
                          hum=result.to_dict()["hum"])


def _result_from_report(plan: Plan, info: dict, registered: RegisteredVersion) -> FinetuneResult:
    """The result of a version this study already registered (another worker, or an earlier run), read
    back from its report.json."""
    from workbench.evaluate.report import pooled_paired
    from workbench.train.tuning import describe_storage

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
                          hum=report.get("evaluation", {}).get("hum", []))
