"""Checkpoints: safetensors weights plus a JSON sidecar that says what they are. Never pickle.

`model.safetensors` holds the state dict; `model.json` beside it holds the architecture and its config,
the size name, sample rate, STFT parameters, parameter count, the sha256 of the weights file, the
lineage (where the weights came from) and, for a device model, the machine's hum template
(`workbench.audio.hum`: cancelled before the network wherever the model runs). The config and the
template are also embedded in the safetensors header, so a weights file that lost its sidecar still
loads. Both files are written atomically.

Loading checks every tensor name and shape against the config and refuses with one line listing what is
missing, unexpected or mis-shaped; a corrupt or truncated file, or weights that do not match their
sidecar's sha256, are refused with one line too.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import workbench
from workbench.audio.hum import HumTemplate
from workbench.audio.io import atomic_path, atomic_write_json, sha256_file
from workbench.errors import WorkbenchError
from workbench.model.stft import SAMPLE_RATE, STFT_PARAMS
from workbench.model.unet import ModelConfig, TwoStageUNet

FORMAT = "workbench-checkpoint"
FORMAT_VERSION = 1
ARCHITECTURE = "two-stage-unet"
CONFIG_METADATA_KEY = "workbench_config"
MAX_LISTED = 20  # names listed per category in a mismatch message before "… and N more"


def config_path_for(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def weights_path_for(path: Path) -> Path:
    """Accept either file of a checkpoint (weights or sidecar) and return the weights file."""
    path = Path(path)
    return path.with_suffix(".safetensors") if path.suffix == ".json" else path


def describe(model: TwoStageUNet, lineage: dict | None = None) -> dict:
    """The JSON sidecar's content, less the weights file's name and hash."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "reference": "Moliner & Välimäki, ICASSP 2022 (eloimoliner/denoising-historical-recordings)",
        "size": model.config.size,
        "config": model.config.to_dict(),
        "sample_rate": SAMPLE_RATE,
        "stft": dict(STFT_PARAMS),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "hum_template": model.hum_template.to_dict() if model.hum_template is not None else None,
        "lineage": lineage or {},
        "software": {"workbench": workbench.__version__, "torch": torch.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(path: Path, model: TwoStageUNet, lineage: dict | None = None) -> None:
    """Write `path` (.safetensors) and its `.json` sidecar, each atomically (weights first)."""
    path = Path(path)
    assert path.suffix == ".safetensors", f"checkpoint weights go in a .safetensors file, not {path.name}"
    info = describe(model, lineage)
    state = {name: tensor.detach().to("cpu", torch.float32).contiguous()
             for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata={CONFIG_METADATA_KEY: json.dumps(
            {key: info[key] for key in ("format", "format_version", "architecture", "size", "config", "hum_template")})})
        info["weights_file"] = path.name
        info["weights_sha256"] = sha256_file(temporary)
    atomic_write_json(config_path_for(path), info)


def _read_sidecar(weights: Path) -> dict | None:
    sidecar = config_path_for(weights)
    if not sidecar.exists():
        return None
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkbenchError(f"{sidecar}: not a readable checkpoint config ({error})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "config" not in info:
        raise WorkbenchError(f"{sidecar}: not a workbench checkpoint config (no format/config fields)")
    return info


def read_checkpoint_info(path: Path) -> dict:
    """A checkpoint's config (its JSON sidecar, else its safetensors header) without loading or hashing
    the weights: cheap enough to plan work (e.g. learn the size) before anything heavy runs."""
    weights = weights_path_for(path)
    if not weights.is_file():
        raise WorkbenchError(f"checkpoint {weights} does not exist")
    info = _read_sidecar(weights)
    if info is not None:
        return info
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
        info = json.loads(metadata[CONFIG_METADATA_KEY])
    except KeyError:
        raise WorkbenchError(f"{weights}: no {config_path_for(weights).name} beside it and no config "
                             "in its header; cannot tell which network it holds") from None
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WorkbenchError(f"{weights}: not a readable safetensors checkpoint ({reason})") from None
    if not isinstance(info, dict) or "config" not in info:
        raise WorkbenchError(f"{weights}: the config in its header is not a workbench checkpoint config")
    return info


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" … and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def mismatch_message(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """One-line description of how `found` (name -> shape) differs from `expected`; None if it does not."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(name for name in set(expected) & set(found) if tuple(expected[name]) != tuple(found[name]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listed(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped: " + _listed(
            [f"{name} {tuple(found[name])} (expected {tuple(expected[name])})" for name in misshaped]))
    return "; ".join(parts) or None


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[TwoStageUNet, dict]:
    """Load a checkpoint written by `save_checkpoint`: (model in eval mode on `device`, its JSON config)."""
    weights = weights_path_for(path)
    info = read_checkpoint_info(weights)
    if info.get("weights_sha256") and sha256_file(weights) != info["weights_sha256"]:
        raise WorkbenchError(f"{weights}: weights do not match the sha256 in {config_path_for(weights).name} "
                             "(file changed or corrupt)")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WorkbenchError(f"{weights}: not a readable safetensors checkpoint ({reason})") from None
    try:
        config = ModelConfig.from_dict(info["config"])
    except (TypeError, KeyError, AssertionError, ValueError) as error:
        raise WorkbenchError(f"{weights}: invalid model config in checkpoint ({error})") from None

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in TwoStageUNet(config).state_dict().items()}
    problem = mismatch_message(expected, {name: tuple(t.shape) for name, t in state.items()})
    if problem:
        raise WorkbenchError(f"{weights} does not fit the {config.size!r} network: {problem}")
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise WorkbenchError(f"{weights}: non-finite values in {_listed(bad)}")
    model = TwoStageUNet.from_state_dict(config, state, device)
    if info.get("hum_template"):
        try:
            model.hum_template = HumTemplate.from_dict(info["hum_template"])
        except (TypeError, KeyError, AssertionError, ValueError) as error:
            raise WorkbenchError(f"{weights}: invalid hum template in checkpoint ({error})") from None
    return model, info


def checkpoint_summary(path: Path) -> dict:
    """What `workbench checkpoint info` shows: the sidecar (or header) config plus a parameter count check."""
    model, info = load_checkpoint(path, device="cpu")
    summary = dict(info)
    summary["weights_file"] = str(weights_path_for(path))
    summary["parameters_loaded"] = sum(p.numel() for p in model.parameters())
    summary.setdefault("parameters", summary["parameters_loaded"])
    return summary
