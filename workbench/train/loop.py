"""The one training loop, shared by pretraining and fine-tuning. Read it top to bottom.

    train(model, schedule, examples, validation, run_dir)   ->   TrainResult

Each step: take this step's batch of (clean crop, noise crop, SNR, gain) from the DataLoader, mix it on the
training device (Eq. 1), go to spectra (`analysis`), run the two-stage U-Net (bf16 autocast on a GPU,
and on a CPU that multiplies bf16 in hardware for the wider networks: `uses_bf16`),
take Eq. 2's loss (plus an optional L2-SP pull toward the base weights when fine-tuning), clip the
gradient norm, and step Adam at the schedule's learning rate. Every `validate_every` steps: validation
loss and ΔSNR on the fixed validation mixtures; the best weights are kept; the run stops early after
`patience` validations without improvement, or when `on_validation(step, metrics)` returns True (Optuna
pruning). Every `checkpoint_every` steps, at the end, and on Ctrl-C the full state is saved, so
`resume=True` continues exactly where it stopped: the same weights, Adam moments, schedule position, RNG
states and data position (example indices are a function of the step, see `data.py`).

State is `run_dir/state.safetensors`: every tensor (model, Adam moments, RNG states) plus, in its
metadata, a JSON document with the rest (step, history, optimiser hyper-parameters). One file, written
atomically, no pickle anywhere. `run_dir/state.json` is a readable copy of that JSON; `best.safetensors`
holds the best weights so far.
"""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from workbench.audio.io import atomic_path, atomic_write_json
from workbench.errors import WorkbenchError
from workbench.evaluate.metrics import snr_db
from workbench.model.stft import analysis, synthesis
from workbench.model.unet import ModelConfig, TwoStageUNet, denoising_loss, low_band_weights
from workbench.progress import Progress, no_progress
from workbench.recipes import PRECISIONS
from workbench.train.data import Mixtures, TrainingExamples, mix_batch, training_batches
from workbench.train.distributed import Distributed

STATE_FILE = "state.safetensors"
BEST_FILE = "best.safetensors"
VALIDATION_BATCH = 8
MIN_IMPROVEMENT = 1e-4  # a validation loss must beat the best by this fraction of its size to count as progress
                        # (of its size: the "snr" loss is in dB, below zero)

# Named groups of the network's parameters (prefixes of `TwoStageUNet.named_parameters()`), for freezing
# when fine-tuning. Stage 1 ends at the supervised attention module; stage 2 produces the output.
PARAMETER_GROUPS: dict[str, tuple[str, ...]] = {
    "encoder_s1": ("input_conv1.", "encoder1."),
    "decoder_s1": ("decoder1.",),
    "sam": ("sam.",),
    "encoder_s2": ("input_conv2.", "encoder2."),
    "decoder_s2": ("decoder2.",),
    "output": ("output_conv.",),
    "stage1": ("input_conv1.", "encoder1.", "decoder1.", "sam."),
    "stage2": ("input_conv2.", "encoder2.", "decoder2.", "output_conv."),
    "encoders": ("input_conv1.", "encoder1.", "input_conv2.", "encoder2."),
    "decoders": ("decoder1.", "decoder2."),
    "bottlenecks": ("encoder1.bottleneck.", "encoder2.bottleneck."),
}


@dataclass(frozen=True)
class Schedule:
    """How to optimise: the recipe's [schedule] section, plus fine-tuning's freezing and L2-SP weight."""

    steps: int
    batch_size: int
    learning_rate: float
    betas: tuple[float, float] = (0.5, 0.9)
    shape: str = "step"  # step | cosine | constant
    decay_every: int = 100_000
    decay_factor: float = 10.0
    min_learning_rate: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0
    validate_every: int = 1000
    checkpoint_every: int = 5000
    patience: int = 0
    freeze: tuple[str, ...] = ()  # names from PARAMETER_GROUPS
    l2sp_alpha: float = 0.0  # weight of (α/2)·‖w − w_base‖² over the trained parameters
    low_band_hz: float = 0.0  # the loss weighs bins below this by 1 + low_band_weight (model.unet.low_band_weights)
    low_band_weight: float = 0.0
    loss: str = "l1"  # l1 (the paper's Eq. 2) | snr | snr+l1: model.unet.denoising_loss
    stage1_weight: float = 1.0  # the stage-1 estimate's share of the loss (1: the paper's; 0: the final estimate alone)
    precision: str = "auto"  # auto | float32 | bf16: the network's arithmetic in training (`uses_bf16`)

    @classmethod
    def from_recipe(cls, recipe: dict, **changes) -> "Schedule":
        section = dict(recipe["schedule"])
        section["betas"] = tuple(section["betas"])
        return cls(**{**section, **changes})


CPU_BF16_MIN_CHANNELS = 16  # oneDNN's bf16 convolutions work in blocks of 16 channels: narrower networks gain nothing


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AMX tiles (Intel Xeon since Sapphire Rapids) or the
    AVX-512 bf16 dot product (AMD Zen 4 and later, Intel Cooper Lake). Without either, oneDNN emulates bf16."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def uses_bf16(precision: str, device: torch.device, config: ModelConfig) -> bool:
    """Whether training `config` on `device` runs the network under bf16 autocast (weights, optimiser and
    loss stay float32): "bf16" always, "float32" never, "auto" on a CUDA GPU, and on a CPU that multiplies bf16
    in hardware (`cpu_multiplies_bf16`) for networks whose first level has at least CPU_BF16_MIN_CHANNELS
    channels. A training step of 4 × 1 s on 2 cores, bf16 against float32: with AMX (Xeon) small 1.55x and paper
    2.2x as fast, tiny (4 channels) 0.91x (benchmarks/train.py); with AVX-512 bf16 (AMD EPYC Zen 4) small 1.39x,
    paper 1.57x, tiny 1.02x (one process, the two alternating)."""
    assert precision in PRECISIONS, precision
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_multiplies_bf16() and config.channels[0] >= CPU_BF16_MIN_CHANNELS


def learning_rate_at(step: int, schedule: Schedule) -> float:
    """The learning rate for step `step` (0-based): linear warm-up, then the schedule's shape."""
    base = schedule.learning_rate
    if step < schedule.warmup_steps:
        return base * (step + 1) / schedule.warmup_steps
    if schedule.shape == "constant":
        return base
    if schedule.shape == "step":  # the paper: ÷10 every 100 k steps
        return base / schedule.decay_factor ** (step // schedule.decay_every)
    if schedule.shape == "cosine":
        progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
        return schedule.min_learning_rate + (base - schedule.min_learning_rate) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule shape {schedule.shape!r}")


def parameter_group(model: torch.nn.Module, group: str) -> list[str]:
    """Names of the parameters in a named group (see PARAMETER_GROUPS)."""
    if group not in PARAMETER_GROUPS:
        raise WorkbenchError(f"unknown parameter group {group!r} (known: {', '.join(PARAMETER_GROUPS)})")
    names = [name for name, _ in model.named_parameters() if name.startswith(PARAMETER_GROUPS[group])]
    assert names, f"parameter group {group} matches nothing: the model's parameter names changed"
    return names


@dataclass
class TrainResult:
    step: int  # steps completed
    stopped: str  # "completed", "plateau" or "callback"
    losses: dict[int, float]  # training loss of each step run in THIS call (1-based step numbers)
    history: list[dict]  # every validation so far (resumed runs included): step, val_loss, val_delta_snr_db, ...
    best: dict | None  # the validation with the lowest loss
    run_dir: Path
    elapsed_s: float = 0.0
    steps_per_s: float = 0.0
    autocast: str | None = None  # "bfloat16" when the network ran under bf16 autocast (`uses_bf16`)

    @property
    def last(self) -> dict | None:
        return self.history[-1] if self.history else None

    @property
    def best_weights(self) -> Path:
        return self.run_dir / BEST_FILE


# ----------------------------------------------------------------------------------------------- state

def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam's state dict as safetensors-able tensors ("optim.<index>.<name>") and JSON for the rest."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write the whole resumable state atomically: tensors in safetensors, the rest as JSON in its metadata."""
    optimizer_tensors, optimizer_meta = _optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = _rng_state()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= optimizer_tensors | rng_tensors
    document = {**meta, "optimizer": optimizer_meta, "rng": rng_meta}
    path = Path(run_dir) / STATE_FILE
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"state": json.dumps(document)})
    readable = {k: v for k, v in document.items() if k not in ("rng", "optimizer")}
    atomic_write_json(path.with_suffix(".json"), readable)
    return path


def read_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, JSON document) of a saved state, or None when the run has none."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            document = json.loads(handle.metadata()["state"])
        return load_file(str(path)), document
    # A damaged state must be named, not crash the resume obscurely: a torn or foreign file (SafetensorError,
    # OSError), bad or missing metadata (ValueError for JSON, KeyError, TypeError for none at all).
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise WorkbenchError(f"{path}: unreadable training state ({type(error).__name__}: {error})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights saved by this loop (best.safetensors, or the model part of state.safetensors)."""
    tensors = load_file(str(path))
    if any(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(tensors)


# ------------------------------------------------------------------------------------------ validation

@torch.no_grad()
def validate(model: TwoStageUNet, mixtures: Mixtures, device: torch.device, dist: Distributed = Distributed(),
             bf16: bool = False, loss_of: Callable[..., torch.Tensor] = denoising_loss) -> dict[str, float]:
    """The training loss (`loss_of(s1, s2, clean_spec)`: the schedule's, see `train`) and ΔSNR (estimate's SNR minus the noisy input's, in dB) on fixed mixtures.

    With DDP each rank scores every world_size-th mixture and the sums are combined, so all ranks get the
    same numbers.
    """
    was_training = model.training
    model.eval()
    indices = list(range(dist.rank, len(mixtures), dist.world_size))
    loss_sum = delta_sum = input_sum = 0.0
    for first in range(0, len(indices), VALIDATION_BATCH):
        chosen = indices[first:first + VALIDATION_BATCH]
        noisy = mixtures.noisy[chosen].to(device)
        clean = mixtures.clean[chosen].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s1, s2 = model(analysis(noisy))
        s1, s2 = s1.float(), s2.float()
        loss_sum += float(loss_of(s1, s2, analysis(clean))) * len(chosen)
        estimate = synthesis(s2, noisy.shape[-1])
        clean_np, noisy_np, estimate_np = (t.cpu().numpy() for t in (clean, noisy, estimate))
        input_snr = snr_db(clean_np, noisy_np)
        input_sum += float(input_snr.sum())
        delta_sum += float((snr_db(clean_np, estimate_np) - input_snr).sum())
    model.train(was_training)
    loss_sum, delta_sum, input_sum = dist.sum([loss_sum, delta_sum, input_sum])
    n = len(mixtures)
    return {"val_loss": loss_sum / n, "val_delta_snr_db": delta_sum / n, "val_input_snr_db": input_sum / n}


# ---------------------------------------------------------------------------------------------- Ctrl-C

class _DeferredInterrupt:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (torchrun stopping its workers, a scheduler preempting the
    job) into a flag checked between steps, so the state saved is consistent; a second one interrupts at
    once. Only in the main thread, where Python delivers signals."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


# ------------------------------------------------------------------------------------------------ train

def train(model: TwoStageUNet, schedule: Schedule, examples: TrainingExamples, validation: Mixtures, run_dir: Path,
          *, device: str | torch.device = "cpu", resume: bool = False, num_workers: int = 0,
          base_weights: dict[str, torch.Tensor] | None = None, dist: Distributed = Distributed(),
          progress: Progress = no_progress, log_metrics: Callable[[dict[str, float], int], None] | None = None,
          on_validation: Callable[[int, dict], bool] | None = None, validate_at_start: bool = False,
          stage: str = "train") -> TrainResult:
    """Train `model` in place; see the module docstring. Returns what happened (losses, validations).

    `base_weights` (name -> tensor) are the weights L2-SP pulls toward (schedule.l2sp_alpha > 0).
    `log_metrics(metrics, step)` receives the training loss and learning rate every step and each
    validation's metrics (rank 0 only). `on_validation(step, metrics)` returning True stops the run.
    `validate_at_start` scores the starting weights first (step 0), the baseline training must beat.
    """
    device = torch.device(device)
    run_dir = Path(run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    bf16 = uses_bf16(schedule.precision, device, model.config)
    autocast = "bfloat16" if bf16 else None
    model.to(device).train()
    bin_weights = low_band_weights(schedule.low_band_hz, schedule.low_band_weight)
    loss_of = functools.partial(denoising_loss, bin_weights=bin_weights.to(device) if bin_weights is not None else None,
                                loss=schedule.loss, stage1_weight=schedule.stage1_weight)

    # Fine-tuning: frozen groups keep their weights; Adam sees only the parameters that train.
    frozen = {name for group in schedule.freeze for name in parameter_group(model, group)}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise WorkbenchError(f"freezing {', '.join(schedule.freeze)} leaves nothing to train")
    optimizer = torch.optim.Adam([p for _, p in trainable], lr=schedule.learning_rate, betas=schedule.betas)
    anchors = None
    if schedule.l2sp_alpha > 0:
        assert base_weights is not None, "L2-SP needs the base weights"
        anchors = [base_weights[name].detach().to(device) for name, _ in trainable]

    # Resume: weights, Adam, RNG, step, history — everything, or nothing at all.
    step, history, best, bad_validations, stopped = 0, [], None, 0, "completed"
    if resume:
        saved = read_state(run_dir)
        if saved is None:
            raise WorkbenchError(f"{run_dir}: no saved state to resume from")
        tensors, document = saved
        if document["batch_size"] != schedule.batch_size or list(document["freeze"]) != list(schedule.freeze):
            raise WorkbenchError(f"{run_dir}: saved with batch size {document['batch_size']} and frozen "
                                 f"{document['freeze']}; resume with the same (asked {schedule.batch_size}, {list(schedule.freeze)})")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(_optimizer_from_flat(tensors, document["optimizer"]))
        _set_rng_state(tensors, document["rng"])
        step, history, best, bad_validations = document["step"], document["history"], document["best"], document["bad_validations"]
        if document.get("stopped", "completed") != "completed":  # it stopped early on purpose: stay stopped
            return TrainResult(step, document["stopped"], {}, history, best, run_dir, autocast=autocast)

    raw_model = model
    if dist.enabled:  # gradients are averaged across processes after each backward pass
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None)

    def keep_if_best(record: dict) -> None:
        nonlocal best, bad_validations
        if best is None or record["val_loss"] < best["val_loss"] - MIN_IMPROVEMENT * abs(best["val_loss"]):
            best, bad_validations = record, 0
            if dist.is_main:
                with atomic_path(run_dir / BEST_FILE) as temporary:
                    save_file({k: v.detach().cpu().contiguous() for k, v in raw_model.state_dict().items()},
                              str(temporary), metadata={"step": str(record["step"])})
        else:
            bad_validations += 1

    def snapshot() -> None:
        if dist.is_main:
            save_state(run_dir, raw_model, optimizer, {
                "step": step, "history": history, "best": best, "bad_validations": bad_validations,
                "stopped": stopped, "batch_size": schedule.batch_size, "freeze": list(schedule.freeze),
                "schedule": asdict(schedule), "saved_at": time.time()})
        dist.barrier()

    if validate_at_start and step == 0 and not history:
        record = {"step": 0, **validate(raw_model, validation, device, dist, bf16, loss_of)}
        history.append(record)
        keep_if_best(record)
        if dist.is_main and log_metrics:
            log_metrics({k: v for k, v in record.items() if k != "step"}, 0)

    losses: dict[int, float] = {}
    started, steps_at_start = time.perf_counter(), step
    smoothed_loss = None
    batches = training_batches(examples, step, schedule.steps, schedule.batch_size, num_workers=num_workers,
                               rank=dist.rank, world_size=dist.world_size, pin_memory=device.type == "cuda")
    with _DeferredInterrupt() as interrupt:
        try:
            for batch in batches:
                # One optimisation step.
                learning_rate = learning_rate_at(step, schedule)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate
                noisy, target = mix_batch(batch, device)
                noisy_spec, clean_spec = analysis(noisy), analysis(target)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    s1, s2 = model(noisy_spec)
                loss = loss_of(s1.float(), s2.float(), clean_spec)
                objective = loss
                if anchors is not None:
                    pull = sum(((p - a) ** 2).sum() for (_, p), a in zip(trainable, anchors))
                    objective = loss + 0.5 * schedule.l2sp_alpha * pull
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if schedule.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for _, p in trainable], schedule.grad_clip)
                optimizer.step()
                step += 1

                # Bookkeeping: the loss of the whole (global) batch and whether any rank got a Ctrl-C,
                # in one all-reduce; logging and progress are rank 0's.
                loss_sum, interrupts = dist.sum([float(loss.detach()), float(interrupt.requested)])
                losses[step] = loss_sum / dist.world_size
                smoothed_loss = losses[step] if smoothed_loss is None else 0.95 * smoothed_loss + 0.05 * losses[step]
                if dist.is_main and log_metrics:
                    log_metrics({"train_loss": losses[step], "learning_rate": learning_rate}, step)

                if step % schedule.validate_every == 0 or step == schedule.steps:
                    metrics = validate(raw_model, validation, device, dist, bf16, loss_of)
                    record = {"step": step, **metrics}
                    history.append(record)
                    keep_if_best(record)
                    if dist.is_main and log_metrics:
                        log_metrics(metrics, step)
                    stop = bool(on_validation(step, record)) if on_validation and dist.is_main else False
                    if dist.broadcast(stop):
                        stopped = "callback"
                    elif schedule.patience and bad_validations >= schedule.patience:
                        stopped = "plateau"

                elapsed = time.perf_counter() - started
                rate = (step - steps_at_start) / elapsed if elapsed > 0 else 0.0
                if dist.is_main:
                    progress(stage, step, schedule.steps, loss=smoothed_loss, steps_per_s=rate,
                             samples_per_s=rate * schedule.batch_size, lr=learning_rate,
                             **({"val_dsnr": history[-1]["val_delta_snr_db"]} if history else {}))
                if step % schedule.checkpoint_every == 0 and step < schedule.steps:
                    snapshot()
                if interrupts:
                    raise KeyboardInterrupt
                if stopped != "completed":
                    break
        except KeyboardInterrupt:
            snapshot()  # everything up to the last completed step; `resume=True` continues from here
            raise
    if not history or history[-1]["step"] != step:  # e.g. resumed after the last step: score the end state
        record = {"step": step, **validate(raw_model, validation, device, dist, bf16, loss_of)}
        history.append(record)
        keep_if_best(record)
    snapshot()
    elapsed = time.perf_counter() - started
    return TrainResult(step, stopped, losses, history, best, run_dir, elapsed,
                       (step - steps_at_start) / elapsed if elapsed > 0 else 0.0, autocast)
