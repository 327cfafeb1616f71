"""`workbench pretrain`: train the general tape-noise model on the whole noise library and the clean corpus.

    pretrain(workspace, "quickstart")  ->  PretrainResult (MLflow run, registered version, metrics)

1. Load the recipe; select the noise library's train and validation snippets (the recipe's devices and
   speeds, all by default) and the clean corpus (registered corpora, else the synthetic one).
2. Build (once, then reuse) the stored validation mixtures.
3. Start or reopen the MLflow run: the recipe as params, the data as dataset inputs, system facts.
4. Train with the shared loop (`loop.train`), logging metrics per step; resumable from `registry/runs/`.
5. Save the best weights as a checkpoint and register it as a new version of `tape-denoiser-general`.

Under `torchrun` every process runs this function; rank 0 alone writes files and talks to MLflow.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.audio.io import atomic_write_json
from workbench.devices import format_speed, get_device
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress
from workbench.recipes import load_recipe, recipe_digest, validation_seconds
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

    @property
    def initial(self) -> dict | None:
        """The validation before any training (step 0) when this run started fresh."""
        return self.history[0] if self.history and self.history[0]["step"] == 0 else None

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "version": self.version, "model_uri": self.model_uri,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "run_dir": str(self.run_dir),
                "step": self.step, "stopped": self.stopped, "steps_per_s": round(self.steps_per_s, 4),
                "recipe": self.recipe, "initial": self.initial, "best": self.best,
                "last": self.history[-1] if self.history else None}


def select_noise(workspace: Workspace, devices: list[str], speeds: list[float], split: str) -> list:
    """The noise library's snippets of `split` for the chosen devices and speeds (all when the lists are empty)."""
    from workbench.noise.library import NoiseLibrary

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


def pretrain(workspace: Workspace, recipe_ref: str | Path, *, resume: bool = False, steps: int | None = None,
             accelerator: str | None = None, num_workers: int | None = None, alias: str | None = None,
             noise_devices: list[str] | None = None, progress: Progress = no_progress) -> PretrainResult:
    """Train and register the general model; see the module docstring.

    `steps` overrides the recipe's step count, `noise_devices` its machines (data.devices); `alias` (e.g.
    "base") is moved to the new version.
    Ctrl-C (or SIGTERM) saves the state and raises KeyboardInterrupt; `resume=True` continues the last
    unfinished run of the recipe exactly, in the same MLflow run.
    """
    from workbench import tracking
    from workbench.corpus import corpus_files
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import TwoStageUNet, count_parameters, get_config
    from workbench.train.data import MixingSpec, TrainingExamples, stored_mixtures
    from workbench.train.distributed import init_distributed, shutdown_distributed
    from workbench.train.loop import Schedule, load_weights, train

    overrides = {"schedule.steps": steps} if steps else {}
    if noise_devices:
        overrides["data.devices"] = list(noise_devices)
    recipe = load_recipe(recipe_ref, workspace, overrides=overrides or None)
    device = default_device() if accelerator in (None, "", "auto") else accelerator
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"--accelerator {device}: no CUDA GPU is available here (use cpu)")
    dist = init_distributed(device)
    if dist.enabled and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    data = recipe["data"]
    try:
        # The data: rank 0 prepares what is written once (synthetic corpus, validation mixtures) first.
        mixing = MixingSpec.from_recipe(data)
        segment_frames = round(data["segment_seconds"] * 44_100)
        train_noise = select_noise(workspace, data["devices"], data["speeds"], "train")
        validation_noise = select_noise(workspace, data["devices"], data["speeds"], "validation")
        if dist.is_main:
            corpus_files(workspace, "train", data["corpora"], progress)
        dist.barrier()
        train_clean = corpus_files(workspace, "train", data["corpora"])
        validation_clean = corpus_files(workspace, "validation", data["corpora"])
        if dist.is_main:
            progress("validation mixtures", 0, 1)
            validation = stored_mixtures(workspace.mixtures_dir, "validation", validation_clean, validation_noise,
                                         data["validation_mixtures"], validation_seconds(recipe), mixing,
                                         data["seed"], data["silence_dbfs"])
            progress("validation mixtures", 1, 1)
        dist.barrier()
        validation = stored_mixtures(workspace.mixtures_dir, "validation", validation_clean, validation_noise,
                                     data["validation_mixtures"], validation_seconds(recipe), mixing,
                                     data["seed"], data["silence_dbfs"])
        examples = TrainingExamples(train_clean, train_noise, segment_frames, mixing, data["seed"], data["silence_dbfs"])

        # The run directory (rank 0 decides) and, when resuming, the MLflow run it belongs to.
        if resume:
            run_dir = dist.broadcast(str(_find_resumable(workspace, recipe["name"])) if dist.is_main else None)
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            run_dir = dist.broadcast(str(workspace.runs_dir / f"pretrain-{recipe['name']}-{stamp}") if dist.is_main else None)
        run_dir = Path(run_dir)
        run_info = json.loads((run_dir / RUN_FILE).read_text()) if resume else {}

        torch.manual_seed(data["seed"])  # the same initial weights on every rank and every fresh run
        config = get_config(recipe["model"]["size"])
        model = TwoStageUNet(config)
        schedule = Schedule.from_recipe(recipe)

        tracked = tracking.start_run(EXPERIMENT, run_name=f"pretrain {recipe['name']}", run_id=run_info.get("run_id"),
                                     workspace=workspace) if dist.is_main else contextlib.nullcontext()
        with tracked as run:
            run_id = run.info.run_id if run else None
            lineage = {}
            if dist.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                if not resume:
                    atomic_write_json(run_dir / RUN_FILE, {"run_id": run_id, "recipe": recipe, "started": _dt.datetime.now(
                        _dt.timezone.utc).isoformat(timespec="seconds"), "finished": False})
                tracking.log_recipe(recipe)
                tracking.log_system_info(device, dist.world_size)
                import mlflow

                mlflow.set_tags({"workbench.kind": "pretrain", "recipe": recipe["name"],
                                 "recipe.digest": recipe_digest(recipe), "model.size": config.size,
                                 "model.parameters": str(count_parameters(config)), "run_dir": str(run_dir)})
                lineage = tracking.log_lineage(workspace, {"training": train_noise, "validation": validation_noise},
                                               {"training": train_clean, "validation": validation_clean},
                                               extra={"validation_mixtures": {"key": validation.key,
                                                                              "path": str(validation.path),
                                                                              "count": len(validation)}})

            result = train(model, schedule, examples, validation, run_dir, device=device, resume=resume,
                           num_workers=data["num_workers"] if num_workers is None else num_workers, dist=dist,
                           progress=progress, log_metrics=tracking.log_metrics if dist.is_main else None,
                           validate_at_start=not resume, stage=f"pretrain {recipe['name']}")

            version = checkpoint = uri = None
            if dist.is_main:
                load_weights(model, result.best_weights)
                checkpoint = run_dir / CHECKPOINT_NAME
                model_lineage = {"kind": "pretrain", "recipe": recipe["name"], "recipe_digest": recipe_digest(recipe),
                                 "mlflow_run_id": run_id, "steps": result.step, "best_step": result.best["step"],
                                 "noise_digest": lineage["noise"]["training"]["digest"],
                                 "corpus_digest": lineage["corpus"]["training"]["digest"],
                                 "devices": lineage["noise"]["training"]["devices"],
                                 "validation": {k: result.best[k] for k in ("val_loss", "val_delta_snr_db", "val_input_snr_db")}}
                save_checkpoint(checkpoint, model.cpu(), model_lineage)
                best = result.best
                mlflow.log_metrics({"best_val_loss": best["val_loss"], "best_val_delta_snr_db": best["val_delta_snr_db"],
                                    "best_step": best["step"]})
                description = (
                    f"General tape-noise model from `workbench pretrain --recipe {recipe['name']}` "
                    f"({config.size} size, {result.step} steps, stopped: {result.stopped}). Validation at step "
                    f"{best['step']} on {len(validation)} fixed mixtures ({validation_seconds(recipe):g} s, input SNR "
                    f"{best['val_input_snr_db']:.1f} dB on average): ΔSNR {best['val_delta_snr_db']:+.2f} dB, loss "
                    f"{best['val_loss']:.4f}. Noise: {', '.join(lineage['noise']['training']['devices'])} "
                    f"(digest {lineage['noise']['training']['digest']}); clean corpus digest "
                    f"{lineage['corpus']['training']['digest']}.")
                tags = {"kind": "pretrain", "recipe": recipe["name"], "size": config.size, "steps": result.step,
                        "best_step": best["step"], "val_loss": f"{best['val_loss']:.6f}",
                        "val_delta_snr_db": f"{best['val_delta_snr_db']:.3f}",
                        "devices": ",".join(lineage["noise"]["training"]["devices"]),
                        "noise_digest": lineage["noise"]["training"]["digest"],
                        "corpus_digest": lineage["corpus"]["training"]["digest"], "run_id": run_id}
                version = tracking.register_checkpoint(checkpoint, tracking.GENERAL_MODEL, tags=tags,
                                                       description=description, workspace=workspace)
                if alias:
                    tracking.set_alias(tracking.GENERAL_MODEL, alias, version, workspace)
                uri = tracking.model_uri(tracking.GENERAL_MODEL, version)
                info = json.loads((run_dir / RUN_FILE).read_text())
                atomic_write_json(run_dir / RUN_FILE, {**info, "finished": True, "version": version, "model_uri": uri})
            dist.barrier()
    finally:
        shutdown_distributed(dist)
    return PretrainResult(run_id, version, uri, checkpoint, run_dir, result.step, result.stopped, result.history,
                          result.best, result.steps_per_s, recipe["name"], lineage)


def register_checkpoint_file(workspace: Workspace, checkpoint: Path, *, name: str, alias: str | None = None,
                             description: str | None = None) -> int:
    """Register a checkpoint made elsewhere (e.g. `import-checkpoint`): its sidecar's facts become version tags."""
    from workbench import tracking
    from workbench.model.checkpoint import load_checkpoint

    _, info = load_checkpoint(Path(checkpoint))  # refuses a damaged or mismatched file before it is registered
    lineage = info.get("lineage") or {}
    tags = {"kind": str(lineage.get("kind", "imported")), "size": str(info.get("size", "")),
            **{f"lineage.{k}": str(v)[:5000] for k, v in lineage.items() if not isinstance(v, (dict, list))}}
    description = description or (f"{info.get('size', '?')}-size checkpoint registered from {Path(checkpoint).name}"
                                  + (f" ({lineage['source']})" if "source" in lineage else "") + ".")
    version = tracking.register_checkpoint(checkpoint, name, tags=tags, description=description, workspace=workspace)
    if alias:
        tracking.set_alias(name, alias, version, workspace)
    return version
