"""`workbench pretrain`: train the general tape-noise model on the whole noise library and the clean corpus.

    pretrain(workspace, "quickstart")  ->  PretrainResult (MLflow run, registered version, metrics)

1. Load the recipe; select the noise library's train and validation snippets (the recipe's devices and
   speeds, all by default) and the clean corpus (registered corpora, else the synthetic one).
2. Build (once, then reuse) the stored validation mixtures.
3. Start or reopen the MLflow run: the recipe as params, the data as dataset inputs, system facts.
4. Train with the shared loop (`loop.train`), logging metrics per step; resumable from `registry/runs/`.
   The network starts from a fresh initialisation, or from a model's weights (`start_from`: the boxed
   general model continued on an archive's own noise, or on hum families, costs a fraction of training anew).
5. Save the best weights as a checkpoint and register it as a new version of `tape-denoiser-general`.

A run folder trained where MLflow is not installed (`benchmarks/pretrain_offline.py` on a GPU machine with
only torch) has no MLflow run in its run.json; resuming it adopts it: a new MLflow run gets the recipe, the
lineage, the machine it trained on and its validation history, and step 5 registers its weights.

Under `torchrun` every process runs this function; rank 0 alone writes files and talks to MLflow (what it
alone does is `_MainRank`'s).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench import tracking
from workbench.audio.io import atomic_write_json
from workbench.corpus import corpus_files
from workbench.devices import format_speed, get_device
from workbench.errors import WorkbenchError
from workbench.model.checkpoint import save_checkpoint
from workbench.model.unet import TwoStageUNet, count_parameters, get_config
from workbench.noise.library import NoiseLibrary
from workbench.model_registry import GENERAL_MODEL, model_uri, register_checkpoint, set_alias
from workbench.progress import Progress, no_progress
from workbench.recipes import load_recipe, recipe_digest, validation_seconds
from workbench.train.data import Mixtures, TrainingExamples, recipe_validation_mixtures
from workbench.train.distributed import (
    Distributed,
    init_distributed,
    shutdown_distributed,
)
from workbench.train.loop import Schedule, load_weights, train
from workbench.workspace import Workspace

RUN_FILE = "run.json"
CHECKPOINT_NAME = "general.safetensors"
EXPERIMENT = "pretrain"


@dataclass
class PretrainResult:
    run_id: str | None
    version: int | None
    model_uri: str | None
    checkpoint: Path | None
    run_dir: Path
    step: int
    stopped: str
    history: list[dict]
    best: dict | None
    steps_per_s: float
    recipe: str
    lineage: dict = field(default_factory=dict)
    trained_offline: dict | None = None  # an adopted run: where and how long it trained

    @property
    def initial(self) -> dict | None:
        """The validation before any training (step 0) when this run started fresh."""
        return self.history[0] if self.history and self.history[0]["step"] == 0 else None

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "version": self.version, "model_uri": self.model_uri,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "run_dir": str(self.run_dir),
                "step": self.step, "stopped": self.stopped, "steps_per_s": round(self.steps_per_s, 4),
                "recipe": self.recipe, "initial": self.initial, "best": self.best,
                "last": self.history[-1] if self.history else None, "trained_offline": self.trained_offline}


def select_noise(workspace: Workspace, devices: list[str], speeds: list[float], split: str) -> list:
    """The noise library's snippets of `split` for the chosen devices and speeds (all when the lists are empty)."""
    library = NoiseLibrary(workspace)
    for device_id in devices:
        get_device(workspace, device_id)  # unknown device: one clear line
    snippets = [s for s in library.snippets(split=split)
                if (not devices or s.device in devices)
                and (not speeds or any(abs(float(s.speed_ips) - float(v)) < 1e-6 for v in speeds))]
    if not snippets:
        which = f" for {', '.join(devices)}" if devices else ""
        at = f" at {', '.join(format_speed(v) for v in speeds)} ips" if speeds else ""
        raise WorkbenchError(f"the noise library has no {split} noise{which}{at}; record blank tape on the machine and "
                             "run `workbench capture-noise --device ID --speed IPS FILE`")
    for device_id in devices:
        if not any(s.device == device_id for s in snippets):
            raise WorkbenchError(f"device {device_id}: no {split} noise in the library (capture-noise it first)")
    return snippets


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _find_resumable(workspace: Workspace, recipe_name: str) -> Path:
    candidates = sorted(workspace.runs_dir.glob(f"pretrain-{recipe_name}-*"))
    for run_dir in reversed(candidates):
        info = run_dir / RUN_FILE
        if info.is_file() and not json.loads(info.read_text()).get("finished"):
            return run_dir
    raise WorkbenchError(f"no interrupted pretrain run of recipe {recipe_name!r} in {workspace.runs_dir} to resume")


@dataclass
class _Data:
    """The run's data, the same on every rank: noise and music per split, the stored validation mixtures
    and the training examples."""

    train_noise: list
    validation_noise: list
    train_clean: list
    validation_clean: list
    validation: Mixtures
    examples: TrainingExamples


def _recipe(workspace: Workspace, recipe_ref: str | Path, steps: int | None, noise_devices: list[str] | None) -> dict:
    """The recipe with the command's overrides (its step count, its noise machines)."""
    overrides = {"schedule.steps": steps} if steps else {}
    if noise_devices:
        overrides["data.devices"] = list(noise_devices)
    return load_recipe(recipe_ref, workspace, overrides=overrides or None)


def _prepare_data(workspace: Workspace, recipe: dict, dist: Distributed, progress: Progress) -> _Data:
    """Rank 0 writes what is written once (the synthetic corpus, the validation mixtures); then every rank
    reads the same data."""
    data = recipe["data"]
    train_noise = select_noise(workspace, data["devices"], data["speeds"], "train")
    validation_noise = select_noise(workspace, data["devices"], data["speeds"], "validation")
    if dist.is_main:
        corpus_files(workspace, "train", data["corpora"], progress)
        progress("validation mixtures", 0, 1)
        recipe_validation_mixtures(recipe, workspace.mixtures_dir, "validation",
                                   corpus_files(workspace, "validation", data["corpora"]), validation_noise)
        progress("validation mixtures", 1, 1)
    dist.barrier()
    train_clean = corpus_files(workspace, "train", data["corpora"])
    validation_clean = corpus_files(workspace, "validation", data["corpora"])
    validation = recipe_validation_mixtures(recipe, workspace.mixtures_dir, "validation", validation_clean, validation_noise)
    examples = TrainingExamples.from_recipe(train_clean, train_noise, data)
    return _Data(train_noise, validation_noise, train_clean, validation_clean, validation, examples)


def _start_weights(workspace: Workspace, ref: str, model: TwoStageUNet) -> dict:
    """Load the weights of checkpoint or model `ref` into `model` (the recipe's network); returns what the run
    records of them (the checkpoint's sha256 and lineage)."""
    from workbench.model.checkpoint import load_checkpoint
    from workbench.model_registry import resolve_checkpoint

    path, facts = resolve_checkpoint(ref, workspace)
    start, info = load_checkpoint(path)
    if start.config != model.config:
        raise WorkbenchError(f"{ref}: a {start.config.size!r} network {start.config.channels}, but the recipe trains "
                             f"{model.config.size!r} {model.config.channels}; start from a model of the recipe's size")
    model.load_state_dict(start.state_dict())
    return {"ref": str(ref), "uri": facts.get("uri"), "version": facts.get("version"),
            "weights_sha256": info.get("weights_sha256"), "lineage": info.get("lineage", {})}


def _start_name(start: dict) -> str:
    """How tags and descriptions name the weights a run started from: the model URI, else the reference given."""
    return start["uri"] or start["ref"]


def _run_dir(workspace: Workspace, recipe: dict, dist: Distributed, resume: bool) -> tuple[Path, dict]:
    """The run directory (rank 0 decides, every rank gets it) and, when resuming, its run record."""
    if resume:
        chosen = str(_find_resumable(workspace, recipe["name"])) if dist.is_main else None
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        chosen = str(workspace.runs_dir / f"pretrain-{recipe['name']}-{stamp}") if dist.is_main else None
    run_dir = Path(dist.broadcast(chosen))
    return run_dir, json.loads((run_dir / RUN_FILE).read_text()) if resume else {}


@dataclass
class _MainRank:
    """What rank 0 alone does: the MLflow run with the recipe, system and data lineage, then the best
    weights saved as a checkpoint and registered as a version of the general model."""

    workspace: Workspace
    recipe: dict
    run_dir: Path
    data: _Data
    run_id: str | None = None
    lineage: dict = field(default_factory=dict)
    offline: dict | None = None  # what an adopted run records of where it trained (run.json's "trained_offline")
    start_from: dict | None = None  # the weights the network started from (`_start_weights`), None: a fresh start

    @contextlib.contextmanager
    def run(self, run_info: dict, resume: bool, device: str, world_size: int, config) -> Iterator[_MainRank]:
        """The MLflow run (reopened when resuming) with everything the run is made of logged into it."""
        import mlflow  # heavy (≈1.4 s): only rank 0 of a training process loads it

        recipe, data = self.recipe, self.data
        with tracking.start_run(EXPERIMENT, run_name=f"pretrain {recipe['name']}", run_id=run_info.get("run_id"),
                                workspace=self.workspace) as run:
            self.run_id = run.info.run_id
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.offline = run_info.get("trained_offline") if resume and not run_info.get("run_id") else None
            if not resume or self.offline is not None:
                started = run_info.get("started") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                atomic_write_json(self.run_dir / RUN_FILE, {**run_info, "run_id": self.run_id, "recipe": recipe,
                                                            "started": started, "finished": False,
                                                            **({"start_from": self.start_from} if self.start_from else {})})
            if self.start_from:
                mlflow.set_tags({"start_from": _start_name(self.start_from),
                                 "start_from.weights_sha256": self.start_from["weights_sha256"] or ""})
            tracking.log_recipe(recipe)
            # An adopted run's tags describe the machine that trained it, not this one.
            tracking.log_system_info(device, world_size, info=self.offline["system"] if self.offline else None)
            if self.offline is not None:
                mlflow.set_tags({"trained_offline": "true",
                                 "trained_offline.data_digests": json.dumps(self.offline.get("data_digests", {}))})
            mlflow.set_tags({"workbench.kind": "pretrain", "recipe": recipe["name"],
                             "recipe.digest": recipe_digest(recipe), "model.size": config.size,
                             "model.parameters": str(count_parameters(config)), "run_dir": str(self.run_dir)})
            self.lineage = tracking.log_lineage(
                self.workspace, {"training": data.train_noise, "validation": data.validation_noise},
                {"training": data.train_clean, "validation": data.validation_clean},
                extra={"validation_mixtures": {"key": data.validation.key, "path": str(data.validation.path),
                                               "count": len(data.validation)}})
            yield self

    def register(self, model: TwoStageUNet, result, alias: str | None) -> tuple[int, Path, str]:
        """Save the best weights as a checkpoint, register it (tags, description), move `alias` to it and
        mark the run finished; returns (version, checkpoint, model URI)."""
        import mlflow  # heavy: see `run`

        recipe, lineage, validation = self.recipe, self.lineage, self.data.validation
        if self.offline is not None:  # its validations were never logged: log them at their steps
            for record in result.history:
                tracking.log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
        else:  # what this machine ran; an adopted run's record says where and how it trained
            mlflow.set_tag("training.autocast", result.autocast or "none")
        load_weights(model, result.best_weights)
        checkpoint = self.run_dir / CHECKPOINT_NAME
        model_lineage = {"kind": "pretrain", "recipe": recipe["name"], "recipe_digest": recipe_digest(recipe),
                         "mlflow_run_id": self.run_id, "steps": result.step, "best_step": result.best["step"],
                         "noise_digest": lineage["noise"]["training"]["digest"],
                         "corpus_digest": lineage["corpus"]["training"]["digest"],
                         "devices": lineage["noise"]["training"]["devices"],
                         "validation": {k: result.best[k] for k in ("val_loss", "val_delta_snr_db", "val_input_snr_db")}}
        if self.start_from:
            model_lineage["start_from"] = self.start_from
        if self.offline is not None:
            model_lineage["trained_offline"] = {k: self.offline[k] for k in ("system", "data_digests", "seconds")
                                                if k in self.offline}
        save_checkpoint(checkpoint, model.cpu(), model_lineage)
        best, size = result.best, model.config.size
        mlflow.log_metrics({"best_val_loss": best["val_loss"], "best_val_delta_snr_db": best["val_delta_snr_db"],
                            "best_step": best["step"]})
        description = (
            f"General tape-noise model from `workbench pretrain --recipe {recipe['name']}` "
            f"({size} size, {result.step} steps"
            f"{', from ' + _start_name(self.start_from) if self.start_from else ''}, "
            f"stopped: {result.stopped}). Validation at step "
            f"{best['step']} on {len(validation)} fixed mixtures ({validation_seconds(recipe):g} s, input SNR "
            f"{best['val_input_snr_db']:.1f} dB on average): ΔSNR {best['val_delta_snr_db']:+.2f} dB, loss "
            f"{best['val_loss']:.4f}. Noise: {', '.join(lineage['noise']['training']['devices'])} "
            f"(digest {lineage['noise']['training']['digest']}); clean corpus digest "
            f"{lineage['corpus']['training']['digest']}.")
        tags = {"kind": "pretrain", "recipe": recipe["name"], "size": size, "steps": result.step,
                "best_step": best["step"], "val_loss": f"{best['val_loss']:.6f}",
                "val_delta_snr_db": f"{best['val_delta_snr_db']:.3f}",
                "devices": ",".join(lineage["noise"]["training"]["devices"]),
                "noise_digest": lineage["noise"]["training"]["digest"],
                "corpus_digest": lineage["corpus"]["training"]["digest"], "run_id": self.run_id,
                **({"start_from": _start_name(self.start_from)} if self.start_from else {})}
        version = register_checkpoint(checkpoint, GENERAL_MODEL, tags=tags,
                                      description=description, workspace=self.workspace)
        if alias:
            set_alias(GENERAL_MODEL, alias, version, self.workspace)
        uri = model_uri(GENERAL_MODEL, version)
        info = json.loads((self.run_dir / RUN_FILE).read_text())
        atomic_write_json(self.run_dir / RUN_FILE, {**info, "finished": True, "version": version, "model_uri": uri})
        return version, checkpoint, uri


def pretrain(workspace: Workspace, recipe_ref: str | Path, *, resume: bool = False, steps: int | None = None,
             accelerator: str | None = None, num_workers: int | None = None, alias: str | None = None,
             noise_devices: list[str] | None = None, start_from: str | None = None,
             progress: Progress = no_progress) -> PretrainResult:
    """Train and register the general model; see the module docstring.

    `steps` overrides the recipe's step count, `noise_devices` its machines (data.devices); `alias` (e.g.
    "base") is moved to the new version. `start_from` (a checkpoint file or model URI, of the recipe's network
    size) gives the starting weights; a resumed run keeps the ones it started from.
    Ctrl-C (or SIGTERM) saves the state and raises KeyboardInterrupt; `resume=True` continues the last
    unfinished run of the recipe exactly, in the same MLflow run.
    """
    if resume and start_from is not None:
        raise WorkbenchError("--start-from gives a new run its first weights; a resumed run continues from its own")
    # 1. The recipe and the torch device; under torchrun, this process's rank.
    recipe = _recipe(workspace, recipe_ref, steps, noise_devices)
    device = default_device() if accelerator in (None, "", "auto") else accelerator
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"--accelerator {device}: no CUDA GPU is available here (use cpu)")
    dist = init_distributed(device)
    if dist.enabled and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    try:
        # 2. The data, written once by rank 0 and read by every rank.
        data = _prepare_data(workspace, recipe, dist, progress)
        # 3. The run directory and, when resuming, the MLflow run it belongs to.
        run_dir, run_info = _run_dir(workspace, recipe, dist, resume)
        # 4. The network: the same initial weights on every rank and every fresh run.
        torch.manual_seed(recipe["data"]["seed"])
        model = TwoStageUNet(get_config(recipe["model"]["size"]))
        started_from = _start_weights(workspace, start_from, model) if start_from is not None else run_info.get("start_from")
        # 5. Train, rank 0 logging into the MLflow run; 6. rank 0 saves and registers the best weights.
        main = _MainRank(workspace, recipe, run_dir, data, start_from=started_from) if dist.is_main else None
        version = checkpoint = uri = None
        with main.run(run_info, resume, device, dist.world_size, model.config) if main else contextlib.nullcontext():
            result = train(model, Schedule.from_recipe(recipe), data.examples, data.validation, run_dir, device=device,
                           resume=resume, num_workers=recipe["data"]["num_workers"] if num_workers is None else num_workers,
                           dist=dist, progress=progress, log_metrics=tracking.log_metrics if main else None,
                           validate_at_start=not resume, stage=f"pretrain {recipe['name']}")
            if main:
                version, checkpoint, uri = main.register(model, result, alias)
            dist.barrier()
    finally:
        shutdown_distributed(dist)
    return PretrainResult(main.run_id if main else None, version, uri, checkpoint, run_dir, result.step, result.stopped,
                          result.history, result.best, result.steps_per_s, recipe["name"], main.lineage if main else {},
                          main.offline if main else None)

