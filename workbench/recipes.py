"""Recipes: everything that decides how a model is trained, as plain data in a TOML file.

A recipe names the model size ([model]), the training data ([data]: segment length, the SNR and gain
distributions of Eq. 1, which devices and speeds of the noise library, which clean corpora, the
validation mixtures, the seed) and the optimisation schedule ([schedule]). Fine-tuning adds its own
[finetune] section (with [finetune.search] and [finetune.pruner]) and [evaluation]; those are validated by
the code that owns them and carried through here untouched.

`load_recipe(name_or_path)` finds a recipe (a path; else `recipes/NAME.toml` in the workspace; else the
bundled `recipes/NAME.toml`), fills in the defaults (the tape paper's settings) and validates it, raising
one-line errors that name the file and the key. `recipe_params(recipe)` flattens the result for MLflow.

A recipe may start from another: `extends = "finetune-cpu"` (a name or a path, found the same way) takes
that recipe's file and lays this one over it, table by table and key by key, so it states only what differs.
Its name and description are its own, never the parent's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.workspace import BUNDLED_RECIPES, Workspace, find_workspace

# The tape paper's settings (Irigaray et al. 2023 on Moliner & Välimäki 2022); a recipe overrides any of
# them. Lists are "everything" when empty.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "size": "paper",
    },
    "data": {
        "segment_seconds": 5.0,
        "snr_db": {"distribution": "log-uniform", "low": 6.0, "high": 32.0},
        "gain_db": {"low": -6.0, "high": 0.0},
        "devices": [],  # [] = every device with noise in the library
        "speeds": [],  # [] = every speed those devices have noise for
        "corpora": [],  # [] = every registered clean corpus (the embedded synthetic one when none is)
        "validation_mixtures": 64,
        "validation_seconds": 0.0,  # 0 = segment_seconds
        "silence_dbfs": -50.0,  # clean crops quieter than this (RMS) are drawn again
        "seed": 20230601,
        "num_workers": 2,  # DataLoader worker processes (0 = load in the training process)
        # A synthetic mains-hum family added to a share of the training examples' tape noise (0 = none, the
        # paper's data): workbench.train.data.HumSpec.
        "hum": {"share": 0.0, "mains_hz": [50.0, 60.0], "level_db_low": -12.0, "level_db_high": 6.0, "harmonics": 8},
    },
    "schedule": {
        "steps": 320_000,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "betas": [0.5, 0.9],
        "shape": "step",  # step (÷decay_factor every decay_every steps) | cosine | constant
        "decay_every": 100_000,
        "decay_factor": 10.0,
        "min_learning_rate": 0.0,  # the floor of the cosine shape
        "warmup_steps": 0,
        "grad_clip": 0.0,  # max global gradient norm; 0 = no clipping
        "validate_every": 1000,
        "checkpoint_every": 5000,
        "patience": 0,  # stop after this many validations without a better validation loss; 0 = never
        "low_band_hz": 0.0,  # bins centred below this weigh 1 + low_band_weight in the loss (mean kept 1);
        "low_band_weight": 0.0,  # 0 = the paper's Eq. 2, every bin alike
        "loss": "l1",  # l1 (the paper's Eq. 2) | snr (each example's negative SNR) | snr+l1: workbench.model.unet.denoising_loss
        "stage1_weight": 1.0,  # the stage-1 estimate's share of the loss: 1 as in the paper, 0 for the final estimate alone
        "precision": "auto",  # auto (bf16 on CUDA, and on CPUs with bf16 in hardware for networks 16 channels wide) | float32 | bf16
    },
}

# Sections owned by the fine-tuning and evaluation code: kept as written, validated by their owners.
EXTENSION_SECTIONS = ("finetune", "evaluation")
TOP_LEVEL_KEYS = ("name", "description")
SNR_DISTRIBUTIONS = ("log-uniform", "uniform")
SCHEDULE_SHAPES = ("step", "cosine", "constant")
PRECISIONS = ("auto", "float32", "bf16")  # [schedule] precision: workbench.train.loop.uses_bf16
LOSSES = ("l1", "snr", "snr+l1")  # [schedule] loss: workbench.model.unet.denoising_loss
MODEL_SIZES = ("paper", "small", "tiny")  # workbench.model.SIZES; kept here so loading a recipe needs no torch


def recipe_path(name_or_path: str | Path, workspace: Workspace | None = None) -> Path:
    """Where a recipe lives: an existing path, else the workspace's recipes/NAME.toml, else the bundled one."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    if candidate.suffix == ".toml" or len(candidate.parts) > 1:
        raise WorkbenchError(f"{candidate}: no such recipe file")
    name = str(name_or_path)
    if workspace is None:
        try:
            workspace = find_workspace()
        except WorkbenchError:
            workspace = None
    searched: list[str] = []
    for folder in ([workspace.recipes_dir] if workspace else []) + [BUNDLED_RECIPES]:
        path = folder / f"{name}.toml"
        if str(folder) not in searched:
            searched.append(str(folder))
        if path.is_file():
            return path.resolve()
    known = sorted({p.stem for folder in searched for p in Path(folder).glob("*.toml")})
    raise WorkbenchError(f"recipe {name!r} not found in {' or '.join(searched)} (known: {', '.join(known) or 'none'})")


def load_recipe(name_or_path: str | Path, workspace: Workspace | None = None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe as a validated dict: defaults filled in, `overrides` ({"schedule.steps": 10}) applied.

    Besides the sections it has "name" (the file's stem unless it sets one), "description" and "source"
    (the file it came from).
    """
    path = recipe_path(name_or_path, workspace)
    recipe = build_recipe(_read_extended(path, workspace), source=str(path), default_name=path.stem)
    return apply_overrides(recipe, overrides) if overrides else recipe


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise WorkbenchError(f"{path}: not valid TOML ({error})") from None
    except UnicodeDecodeError:
        raise WorkbenchError(f"{path}: not a UTF-8 text file") from None


def _read_extended(path: Path, workspace: Workspace | None, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe file's table laid over the one it `extends` (recursively), before defaults are filled in."""
    raw = _read_toml(path)
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str) or not parent_name:
        raise WorkbenchError(f"{path}: extends must name a recipe, e.g. extends = \"finetune-cpu\"")
    try:
        parent = recipe_path(parent_name, workspace)
    except WorkbenchError as error:
        raise WorkbenchError(f"{path}: extends {parent_name!r}: {error}") from None
    if parent in (*chain, path):
        raise WorkbenchError(f"{path}: extends {parent_name!r}, which leads back to {parent}: "
                             "recipes cannot extend in a circle")
    base = _read_extended(parent, workspace, (*chain, path))
    for own in ("name", "description"):  # a derived recipe is a recipe of its own
        base.pop(own, None)
    return _laid_over(base, raw)


def _laid_over(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: tables merged key by key, every other value replaced."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _laid_over(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_recipe(raw: dict[str, Any], source: str = "recipe", default_name: str = "recipe") -> dict[str, Any]:
    """Merge `raw` (a parsed TOML document) onto the defaults and validate it."""
    for key, value in raw.items():
        if key in DEFAULTS or key in EXTENSION_SECTIONS:
            if not isinstance(value, dict):
                raise WorkbenchError(f"{source}: [{key}] must be a table")
        elif key not in TOP_LEVEL_KEYS:
            allowed = ", ".join([*TOP_LEVEL_KEYS, *(f"[{s}]" for s in (*DEFAULTS, *EXTENSION_SECTIONS))])
            raise WorkbenchError(f"{source}: unknown key {key!r} (a recipe has {allowed})")
    recipe: dict[str, Any] = {
        "name": str(raw.get("name", default_name)),
        "description": str(raw.get("description", "")),
        "source": source,
    }
    for section, defaults in DEFAULTS.items():
        given = raw.get(section, {})
        for key in given:
            if key not in defaults:
                raise WorkbenchError(f"{source}: unknown key [{section}] {key} (known: {', '.join(defaults)})")
        merged = copy.deepcopy(defaults)
        for key, value in given.items():
            if isinstance(defaults[key], dict):
                if not isinstance(value, dict):
                    raise WorkbenchError(f"{source}: [{section}] {key} must be a table like {_toml(defaults[key])}")
                unknown = set(value) - set(defaults[key])
                if unknown:
                    raise WorkbenchError(f"{source}: unknown key [{section}] {key}.{sorted(unknown)[0]} "
                                         f"(known: {', '.join(defaults[key])})")
                merged[key].update(value)
            else:
                merged[key] = value
        recipe[section] = merged
    for section in EXTENSION_SECTIONS:
        if section in raw:
            recipe[section] = copy.deepcopy(raw[section])
    validate_recipe(recipe, source)
    return recipe


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def _number(source: str, where: str, value: Any, *, integer: bool = False, minimum: float | None = None,
            exclusive: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise WorkbenchError(f"{source}: {where} must be {kind} (got {value!r})")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise WorkbenchError(f"{source}: {where} must be {bound} (got {value!r})")
    return value


def validate_recipe(recipe: dict[str, Any], source: str = "recipe") -> None:
    """Raise a one-line WorkbenchError for the first thing wrong with the [model], [data] and [schedule] sections."""
    model, data, schedule = recipe["model"], recipe["data"], recipe["schedule"]
    if model["size"] not in MODEL_SIZES:
        raise WorkbenchError(f"{source}: [model] size must be one of {', '.join(MODEL_SIZES)} (got {model['size']!r})")

    _number(source, "[data] segment_seconds", data["segment_seconds"], minimum=0.1)
    _number(source, "[data] validation_seconds", data["validation_seconds"], minimum=0)
    if 0 < data["validation_seconds"] < 0.1:
        raise WorkbenchError(f"{source}: [data] validation_seconds must be 0 (= segment_seconds) or >= 0.1")
    snr = data["snr_db"]
    if snr["distribution"] not in SNR_DISTRIBUTIONS:
        raise WorkbenchError(f"{source}: [data] snr_db.distribution must be one of {', '.join(SNR_DISTRIBUTIONS)} "
                             f"(got {snr['distribution']!r})")
    low = _number(source, "[data] snr_db.low", snr["low"])
    high = _number(source, "[data] snr_db.high", snr["high"])
    if low > high:
        raise WorkbenchError(f"{source}: [data] snr_db.low ({low:g}) is above snr_db.high ({high:g})")
    if snr["distribution"] == "log-uniform" and low <= 0:
        raise WorkbenchError(f"{source}: [data] snr_db.low must be > 0 dB for the log-uniform distribution (got {low:g})")
    gain_low = _number(source, "[data] gain_db.low", data["gain_db"]["low"])
    gain_high = _number(source, "[data] gain_db.high", data["gain_db"]["high"])
    if gain_low > gain_high:
        raise WorkbenchError(f"{source}: [data] gain_db.low ({gain_low:g}) is above gain_db.high ({gain_high:g})")
    for key in ("devices", "corpora"):
        if not isinstance(data[key], list) or not all(isinstance(v, str) and v for v in data[key]):
            raise WorkbenchError(f"{source}: [data] {key} must be a list of names (got {data[key]!r})")
    if not isinstance(data["speeds"], list):
        raise WorkbenchError(f"{source}: [data] speeds must be a list of speeds in ips (got {data['speeds']!r})")
    for speed in data["speeds"]:
        _number(source, "[data] speeds entries", speed, minimum=0, exclusive=True)
    _number(source, "[data] validation_mixtures", data["validation_mixtures"], integer=True, minimum=1)
    _number(source, "[data] silence_dbfs", data["silence_dbfs"])
    _number(source, "[data] seed", data["seed"], integer=True, minimum=0)
    _number(source, "[data] num_workers", data["num_workers"], integer=True, minimum=0)
    hum = data["hum"]
    share = _number(source, "[data] hum.share", hum["share"], minimum=0)
    if share > 1:
        raise WorkbenchError(f"{source}: [data] hum.share is a share of the examples, 0 to 1 (got {share!r})")
    if not isinstance(hum["mains_hz"], list) or not hum["mains_hz"]:
        raise WorkbenchError(f"{source}: [data] hum.mains_hz must be a list of frequencies like [50.0, 60.0] "
                             f"(got {hum['mains_hz']!r})")
    for frequency in hum["mains_hz"]:
        _number(source, "[data] hum.mains_hz entries", frequency, minimum=0, exclusive=True)
    level_low = _number(source, "[data] hum.level_db_low", hum["level_db_low"])
    level_high = _number(source, "[data] hum.level_db_high", hum["level_db_high"])
    if level_low > level_high:
        raise WorkbenchError(f"{source}: [data] hum.level_db_low ({level_low:g}) is above hum.level_db_high ({level_high:g})")
    _number(source, "[data] hum.harmonics", hum["harmonics"], integer=True, minimum=1)

    _number(source, "[schedule] steps", schedule["steps"], integer=True, minimum=1)
    _number(source, "[schedule] batch_size", schedule["batch_size"], integer=True, minimum=1)
    _number(source, "[schedule] learning_rate", schedule["learning_rate"], minimum=0, exclusive=True)
    betas = schedule["betas"]
    if (not isinstance(betas, list) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise WorkbenchError(f"{source}: [schedule] betas must be two numbers in [0, 1) like [0.5, 0.9] (got {betas!r})")
    if schedule["shape"] not in SCHEDULE_SHAPES:
        raise WorkbenchError(f"{source}: [schedule] shape must be one of {', '.join(SCHEDULE_SHAPES)} "
                             f"(got {schedule['shape']!r})")
    _number(source, "[schedule] decay_every", schedule["decay_every"], integer=True, minimum=1)
    _number(source, "[schedule] decay_factor", schedule["decay_factor"], minimum=1)
    _number(source, "[schedule] min_learning_rate", schedule["min_learning_rate"], minimum=0)
    _number(source, "[schedule] warmup_steps", schedule["warmup_steps"], integer=True, minimum=0)
    _number(source, "[schedule] grad_clip", schedule["grad_clip"], minimum=0)
    _number(source, "[schedule] validate_every", schedule["validate_every"], integer=True, minimum=1)
    _number(source, "[schedule] checkpoint_every", schedule["checkpoint_every"], integer=True, minimum=1)
    _number(source, "[schedule] patience", schedule["patience"], integer=True, minimum=0)
    _number(source, "[schedule] low_band_hz", schedule["low_band_hz"], minimum=0)
    _number(source, "[schedule] low_band_weight", schedule["low_band_weight"], minimum=0)
    _number(source, "[schedule] stage1_weight", schedule["stage1_weight"], minimum=0)
    if schedule["loss"] not in LOSSES:
        raise WorkbenchError(f"{source}: [schedule] loss must be one of {', '.join(LOSSES)} (got {schedule['loss']!r})")
    if schedule["precision"] not in PRECISIONS:
        raise WorkbenchError(f"{source}: [schedule] precision must be one of {', '.join(PRECISIONS)} "
                             f"(got {schedule['precision']!r})")


def apply_overrides(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `recipe` with dotted keys replaced ({"schedule.steps": 10, "data.snr_db.low": 4}), revalidated.

    Keys of the extension sections ("finetune.…") may be new; keys of the core sections must exist.
    """
    updated = copy.deepcopy(recipe)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] not in DEFAULTS and parts[0] not in EXTENSION_SECTIONS:
            raise WorkbenchError(f"{recipe['source']}: cannot override {dotted!r} (no section [{parts[0]}])")
        node = updated.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        if parts[0] in DEFAULTS and parts[-1] not in node:
            raise WorkbenchError(f"{recipe['source']}: cannot override {dotted!r} (no such key)")
        node[parts[-1]] = value
    validate_recipe(updated, f"{recipe['source']} (with {', '.join(f'{k}={v}' for k, v in overrides.items())})")
    return updated


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value if isinstance(value, str) else json.dumps(value)


def recipe_params(recipe: dict[str, Any]) -> dict[str, str]:
    """The whole resolved recipe as flat string params ({"schedule.learning_rate": "0.0001", ...}) for MLflow."""
    flat: dict[str, str] = {}
    for key, value in recipe.items():
        _flatten("recipe." + key if key in TOP_LEVEL_KEYS or key == "source" else key, value, flat)
    return flat


# Keys added after recipes were first digested, at the value that trains exactly as before they existed.
# At that value they stay out of the digest, so a recipe digested earlier keeps its digest: the boxed
# model's card still matches recipes/general.toml, and a study resumed after an upgrade is the same study.
NEUTRAL_LATER_KEYS = {("schedule", "low_band_hz"): 0.0, ("schedule", "low_band_weight"): 0.0,
                      ("schedule", "precision"): "auto", ("schedule", "loss"): "l1",
                      ("schedule", "stage1_weight"): 1.0, ("data", "hum"): DEFAULTS["data"]["hum"]}


def recipe_digest(recipe: dict[str, Any]) -> str:
    """A short digest of everything that affects training (not the name, description or source file)."""
    core = {k: v for k, v in recipe.items() if k not in (*TOP_LEVEL_KEYS, "source")}
    for (section, key), neutral in NEUTRAL_LATER_KEYS.items():
        if section in core and core[section].get(key, neutral) == neutral:
            core[section] = {k: v for k, v in core[section].items() if k != key}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def validation_seconds(recipe: dict[str, Any]) -> float:
    """Length of each validation mixture: [data] validation_seconds, or the training segment length when 0."""
    return float(recipe["data"]["validation_seconds"] or recipe["data"]["segment_seconds"])
