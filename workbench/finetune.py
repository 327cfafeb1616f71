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
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.devices import format_speed, get_device
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress
from workbench.workspace import Workspace

EXPERIMENT_PREFIX = "finetune-"
NOISY_INPUT = "noisy input"  # = workbench.evaluate.baselines.NOISY_INPUT
BASE_MODEL = "base model"
FINE_TUNED = "fine-tuned"
CHAMPION_METHOD = "champion"
SPECTRAL_GATING = "spectral gating"  # = workbench.evaluate.baselines.SPECTRAL_GATING
# Spectral gating is given this much of the machine's train noise as its noise profile.
GATING_NOISE_SECONDS = 10.0
STUDY_RUN_ATTR = "mlflow_run_id"
STUDY_KEY_ATTR = "workbench_key"
WORKER_TAG = "workbench.worker"  # the process registering a version (host, pid, start), to tell a dead one


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
        data["model_uri"] = f"models:/{self.model_name}/{self.version}"
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


def resolve_base(workspace: Workspace, ref: str | None) -> tuple[Path, dict]:
    """The base checkpoint: a file, any MLflow model URI, or (default) the general model @base / latest."""
    from workbench import tracking

    if ref is None:
        version = tracking.get_alias_version(tracking.GENERAL_MODEL, "base", workspace)
        if version is None:
            version = tracking.latest_version(tracking.GENERAL_MODEL, workspace)
        if version is None:
            raise WorkbenchError(f"no general model is registered ({tracking.GENERAL_MODEL}): run `workbench pretrain`, "
                                 "import the published one with `workbench import-checkpoint`, or pass --base FILE")
        ref = tracking.model_uri(tracking.GENERAL_MODEL, version)
    if ref.startswith("models:/"):
        path, facts = tracking.fetch_checkpoint(ref, workspace)
        return path, {"ref": ref, "name": facts["name"], "version": facts["version"], "uri": facts["uri"],
                      "run_id": facts["run_id"]}
    if "://" in ref or ref.startswith("runs:/"):
        return _download_checkpoint(workspace, ref)
    from workbench.model.checkpoint import weights_path_for

    path = weights_path_for(Path(ref).expanduser())
    if not path.is_file():
        raise WorkbenchError(f"--base {ref}: no such checkpoint file (give X.safetensors with X.json beside it, or models:/NAME/VERSION)")
    return path.resolve(), {"ref": ref, "name": path.name, "version": None, "uri": str(path.resolve()), "run_id": None}


def _download_checkpoint(workspace: Workspace, uri: str) -> tuple[Path, dict]:
    """A checkpoint inside any other MLflow artifact URI (runs:/RUN/model, a logged model's URI...)."""
    import hashlib
    import tempfile

    from workbench import tracking

    mlflow = tracking.configure(workspace)
    target = workspace.registry / tracking.CACHE_DIR / "uris" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    found = [p for p in target.rglob("*.safetensors") if p.with_suffix(".json").is_file()] if target.is_dir() else []
    if len(found) != 1:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download.", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging))
        except Exception as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise WorkbenchError(f"--base {uri}: cannot download ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        found = [p for p in staging.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
        if len(found) != 1:
            shutil.rmtree(staging, ignore_errors=True)
            raise WorkbenchError(f"--base {uri}: holds {len(found)} workbench checkpoints (X.safetensors + X.json); need exactly one")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        found = [p for p in target.rglob("*.safetensors") if p.with_suffix(".json").is_file()]
    return found[0], {"ref": uri, "name": uri, "version": None, "uri": uri, "run_id": None}


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


def _rivals(champion_version: int | None) -> list[tuple[str, str]]:
    """(method, how the gate names it) of every model the fine-tuned one must beat."""
    rivals = [(BASE_MODEL, "the base model")]
    if champion_version is not None:
        rivals.append((CHAMPION_METHOD, f"champion v{champion_version}"))
    return rivals


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
    for method, shown in _rivals(champion_version):
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
            for method, _ in _rivals(champion_version)}


def paired_tag(rival: str, snr: float) -> str:
    """The version tag holding the paired ΔSNR gain over a rival at one input SNR."""
    return f"gain_vs_{'base' if rival == BASE_MODEL else 'champion'}_{snr:g}db"


def _verdict(promoted: bool, reason: str) -> str:
    return ("promoted to @champion: it " if promoted else "not promoted: it ") + reason


def _summary(result, snrs: list[float]) -> dict[str, dict[str, dict]]:
    return {method: {f"{snr:g}": {k: v for k, v in result.summary(method, snr).to_dict().items()
                                  if k in ("mean", "ci_low", "ci_high", "n")} for snr in snrs}
            for method in result.methods}


def _description(plan: Plan, result, study_info: dict, promoted: bool, reason: str, champion: int | None) -> str:
    d = plan.device
    speeds = ", ".join(format_speed(s) for s in plan.speeds)
    settings = plan.evaluation
    lines = [f"Fine-tuned to {d.id} ({d.make} {d.model}, {d.format}) at {speeds} ips from "
             f"{plan.base['uri']} on {plan.noise_minutes('train'):g} min of its train noise."]
    for snr in settings.snrs_db:
        parts = [f"{name} {result.summary(name, snr).mean:+.2f}" for name in result.methods if name != NOISY_INPUT]
        paired = [f"over {shown} {result.paired(FINE_TUNED, method, snr).interval_text()}"
                  for method, shown in _rivals(champion)]
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
            _close_killed_registrations(plan)
            existing = _registered_for(tracking.client(plan.workspace), plan, best.number)
            if existing is not None:
                _finish_registration(plan, existing, best.number)
                return _result_from_version(plan, existing, info)
            model = best_model(plan, best, validation, progress)
            champion = tracking.get_alias_version(tracking.device_model_name(plan.device.id), "champion", plan.workspace)
            result = evaluate_models(plan, _scored_models(plan, model, champion), progress)
            promoted, reason = promotion_decision(result, list(plan.evaluation.snrs_db), champion,
                                                  plan.evaluation.min_gain_db)
            return _register(plan, study, info, best, model, result, lineage, champion, promoted, reason)


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
    from workbench import tracking
    from workbench.model.checkpoint import load_checkpoint

    models = {BASE_MODEL: plan.base_model.eval(), FINE_TUNED: model}
    if champion is not None:
        name = tracking.device_model_name(plan.device.id)
        path, _ = tracking.fetch_checkpoint(tracking.model_uri(name, alias="champion"), plan.workspace)
        models[CHAMPION_METHOD] = load_checkpoint(path, device="cpu")[0]
    return models


def _register(plan: Plan, study, info: dict, best, model, result, lineage: dict, champion: int | None,
              promoted: bool, reason: str) -> FinetuneResult:
    """Save the checkpoint, write the report, register the version (tags, description, report) in a nested
    run of its own, copy the report into the workspace, and move @champion if the gate allows."""
    import mlflow

    from workbench import tracking
    from workbench.evaluate.report import write_report
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model_registry import CHAMPION, TAG_GATE, TAG_PROMOTED, TAG_REPORT, delta_peaq_tag, delta_snr_tag
    from workbench.recipes import recipe_digest
    from workbench.train.tuning import describe_storage, worker_identity

    model_name = tracking.device_model_name(plan.device.id)
    snrs = list(plan.evaluation.snrs_db)
    storage = describe_storage(plan.storage_url)
    checkpoint = plan.study_dir / f"{model_name}-trial-{best.number:04d}.safetensors"
    save_checkpoint(checkpoint, model, {
        "kind": "finetune", "device": plan.device.id, "speeds": plan.speeds, "base": plan.base,
        "study": plan.study_name, "trial": best.number, "params": best.params, "recipe": plan.recipe["name"],
        "recipe_digest": recipe_digest(plan.recipe), "noise_digest": lineage["noise"]["training"]["digest"],
        "corpus_digest": lineage["corpus"]["training"]["digest"]})
    description = _description(plan, result, info, promoted, reason, champion)
    splits = (("train", "training"), ("validation", "validation"), ("test", "test"))
    with tracking.start_run(plan.experiment, run_name=f"evaluate and register trial {best.number}", nested=True,
                            workspace=plan.workspace, tags={"workbench.kind": "finetune-model",
                                                            WORKER_TAG: json.dumps(worker_identity()),
                                                            "optuna.study": plan.study_name,
                                                            "optuna.trial": str(best.number)}) as run:
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
                       "weights_sha256": json.loads(checkpoint.with_suffix(".json").read_text())["weights_sha256"]}
        report_dir = plan.study_dir / f"report-trial-{best.number:04d}"
        files = write_report(report_dir, result, title=f"{model_name}: fine-tuned to {plan.device.id}",
                             lineage=report_lineage, study=study, model=model_facts,
                             decision={"promoted": promoted, "message": _verdict(promoted, reason)},
                             summary_text=description.split("\n\n")[0],
                             paired=(FINE_TUNED, [method for method, _ in _rivals(champion)]),
                             min_gain_db=plan.evaluation.min_gain_db,
                             clip_methods=[m for m in (BASE_MODEL, FINE_TUNED, CHAMPION_METHOD) if m in result.methods])
        mlflow.log_artifacts(str(report_dir), "report")
        tags = {"device": plan.device.id, "speeds": ",".join(format_speed(s) for s in plan.speeds),
                "base_model": plan.base.get("name") or plan.base["uri"], "base_version": plan.base.get("version") or "",
                "base_uri": plan.base["uri"], "study": plan.study_name, "study_storage": storage,
                "study_key": plan.study_key,
                "best_trial": best.number, "recipe": plan.recipe["name"], "noise_minutes": plan.noise_minutes("train"),
                "noise_minutes_test": plan.noise_minutes("test"), TAG_PROMOTED: str(promoted).lower(),
                TAG_GATE: _verdict(promoted, reason)[:4900], "min_gain_db": f"{plan.evaluation.min_gain_db:g}",
                **{delta_snr_tag(snr): f"{result.summary(FINE_TUNED, snr).mean:.3f}" for snr in snrs},
                **{delta_peaq_tag(snr): f"{result.summary(FINE_TUNED, snr, 'delta_peaq').mean:.3f}"
                   for snr in snrs if "delta_peaq" in result.metrics},
                **{f"ci_delta_snr_{snr:g}db": _interval_tag(result.summary(FINE_TUNED, snr)) for snr in snrs},
                **{paired_tag(method, snr): _interval_tag(result.paired(FINE_TUNED, method, snr))
                   for method, _ in _rivals(champion) for snr in snrs}}
        version = tracking.register_checkpoint(checkpoint, model_name, tags=tags, description=description,
                                               artifacts={"report.html": files.html, "report.json": files.json},
                                               workspace=plan.workspace)
        local = plan.workspace.reports_dir / plan.device.id / f"v{version}"
        local.mkdir(parents=True, exist_ok=True)
        for path in (files.html, files.json):
            shutil.copy2(path, local / path.name)
        tracking.client(plan.workspace).set_model_version_tag(model_name, str(version), TAG_REPORT, str(local / "report.html"))
        if promoted:
            tracking.set_alias(model_name, CHAMPION, version, plan.workspace)
    return FinetuneResult(plan.device.id, plan.speeds, plan.study_name, storage, info["counts"], info["best"],
                          model_name, version, promoted, reason, snrs, _summary(result, snrs),
                          local / "report.html", local / "report.json", run.info.run_id, plan.base, champion,
                          paired=_paired_summary(result, snrs, champion), min_gain_db=plan.evaluation.min_gain_db,
                          hum=result.to_dict()["hum"])


def _interval_tag(summary) -> str:
    """A mean and its 95 % interval as one tag value: "+0.490 [+0.120, +0.860] n=40"."""
    return f"{summary.mean:+.3f} [{summary.ci_low:+.3f}, {summary.ci_high:+.3f}] n={summary.n}"


def _registered_for(registry, plan: Plan, trial: int) -> Any | None:
    """The version already registered from this trial of this very study (its key, not just its name), if any."""
    from workbench import tracking

    name = tracking.device_model_name(plan.device.id)
    # Any error here (a store that fails, a server away) must stop the worker, never read as "none yet":
    # that would register the trial a second time.
    for version in registry.search_model_versions(f"name = '{name}'", max_results=1000):
        tags = version.tags or {}
        if tags.get("study_key") == plan.study_key and tags.get("best_trial") == str(trial):
            return version
    return None


def _close_killed_registrations(plan: Plan) -> None:
    """Registration runs of this study whose process died (SIGKILL, power cut) stay RUNNING: close them,
    FINISHED when their version made it into the registry, else KILLED (the rerun registers it anew)."""
    from workbench import tracking
    from workbench.train.tuning import _is_alive

    registry = tracking.client(plan.workspace)
    experiment = registry.get_experiment_by_name(plan.experiment)
    if experiment is None:
        return
    runs = registry.search_runs([experiment.experiment_id], f"tags.`optuna.study` = '{plan.study_name}' and "
                                "tags.`workbench.kind` = 'finetune-model' and attributes.status = 'RUNNING'")
    for run in runs:
        if _is_alive(json.loads(run.data.tags.get(WORKER_TAG, "{}"))):
            continue  # a worker sharing the study is registering right now
        registered = registry.search_model_versions(f"run_id = '{run.info.run_id}'")
        registry.set_terminated(run.info.run_id, "FINISHED" if registered else "KILLED")


def _finish_registration(plan: Plan, version, trial: int) -> None:
    """The steps after a version's creation, done again where a killed run left them undone: the report's
    copy in the workspace and its tag, and @champion for a version its gate promoted (unless a later
    version has been promoted since)."""
    from workbench import tracking
    from workbench.model_registry import CHAMPION, TAG_PROMOTED, TAG_REPORT

    registry, tags = tracking.client(plan.workspace), version.tags or {}
    local = plan.workspace.reports_dir / plan.device.id / f"v{version.version}"
    written = plan.study_dir / f"report-trial-{trial:04d}"
    if not (local / "report.html").is_file() and (written / "report.html").is_file():
        local.mkdir(parents=True, exist_ok=True)
        for name in ("report.html", "report.json"):
            shutil.copy2(written / name, local / name)
    if TAG_REPORT not in tags and (local / "report.html").is_file():
        registry.set_model_version_tag(version.name, str(version.version), TAG_REPORT, str(local / "report.html"))
    champion = tracking.get_alias_version(version.name, CHAMPION, plan.workspace)
    if tags.get(TAG_PROMOTED) == "true" and (champion is None or champion < int(version.version)):
        tracking.set_alias(version.name, CHAMPION, int(version.version), plan.workspace)


def _result_from_version(plan: Plan, version, info: dict) -> FinetuneResult:
    """The result of a version this study already registered (another worker, or an earlier run)."""
    from workbench import tracking
    from workbench.evaluate.report import pooled_paired
    from workbench.model_registry import CHAMPION, TAG_GATE, TAG_PROMOTED, TAG_REPORT
    from workbench.train.tuning import describe_storage

    registry, storage = tracking.client(plan.workspace), describe_storage(plan.storage_url)
    tags = version.tags or {}
    html = Path(tags.get(TAG_REPORT) or plan.workspace.reports_dir / plan.device.id / f"v{version.version}" / "report.html")
    report = json.loads(html.with_name("report.json").read_text()) if html.with_name("report.json").is_file() else {}
    snrs = list(plan.evaluation.snrs_db)
    summary: dict[str, dict[str, dict]] = {}
    for row in report.get("evaluation", {}).get("summary", []):
        if row["set"] == "all" or len(report["evaluation"]["fragment_sets"]) == 1:
            cell = row["delta_snr"]
            summary.setdefault(row["method"], {})[f"{row['input_snr_db']:g}"] = {
                k: cell[k] for k in ("mean", "ci_low", "ci_high", "n")}
    aliases = registry.get_registered_model(version.name).aliases or {}
    promoted = tags.get(TAG_PROMOTED) == "true" and str(aliases.get(CHAMPION)) == str(version.version)
    return FinetuneResult(plan.device.id, plan.speeds, plan.study_name, storage, info["counts"], info["best"],
                          version.name, int(version.version), promoted,
                          tags.get(TAG_GATE, "").split(": it ", 1)[-1] + " (registered earlier for this study's best trial)",
                          snrs, summary,
                          html, html.with_name("report.json"), version.run_id, plan.base, None, registered_now=False,
                          paired=pooled_paired(report), min_gain_db=float((report.get("paired") or {}).get("min_gain_db") or 0.0),
                          hum=report.get("evaluation", {}).get("hum", []))
