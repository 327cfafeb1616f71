"""The registry's vocabulary: model names, aliases, version-tag keys, descriptions and model URIs.

Every other module spells these through the constants here, never as literal strings: a device model
is `tape-denoiser-<device>`, the general model `tape-denoiser-general`; `@base` marks the general model
fine-tuning starts from, `@champion` a device's best proven version. This module imports nothing heavy
(no mlflow, no torch), so anything may import it.
"""

from __future__ import annotations

import re

MODEL_PREFIX = "tape-denoiser-"
GENERAL_MODEL = MODEL_PREFIX + "general"
CHAMPION = "champion"
BASE_ALIAS = "base"

MODEL_ARTIFACT = "model"  # the logged model's name inside a run
REPORT_ARTIFACT_DIR = "report"  # the evaluation report inside a device model's run
CACHE_DIR = "models-cache"  # registry/models-cache/<name>/<version>/: downloaded registered checkpoints

# Version tags. Those written by `workbench finetune` describe a device model; the ΔSNR ones are
# "delta_snr_<snr>db", one per input SNR, the ΔPEAQ ones "delta_peaq_<snr>db" beside them when the
# evaluation computed PEAQ, the paired gains "gain_vs_<rival>_<snr>db".
TAG_DEVICE = "device"
TAG_SPEEDS = "speeds"
TAG_BASE_MODEL = "base_model"
TAG_BASE_VERSION = "base_version"
TAG_BASE_URI = "base_uri"
TAG_STUDY = "study"
TAG_STUDY_STORAGE = "study_storage"
TAG_STUDY_KEY = "study_key"  # the study's own id: which study (not just which name) registered a version
TAG_BEST_TRIAL = "best_trial"
TAG_RECIPE = "recipe"
TAG_HUM_TEMPLATE = "hum_template"  # the machine's hum cancelled before the network, or "none"
TAG_RECIPE_DIGEST = "recipe_digest"
TAG_NOISE_MINUTES = "noise_minutes"
TAG_NOISE_MINUTES_TEST = "noise_minutes_test"
TAG_PROMOTED = "promoted"  # "true" / "false": the gate's verdict
TAG_GATE = "gate"  # the verdict in words, for people
TAG_REASON = "gate_reason"  # the gate's reason alone, read back when a rerun finds the version
TAG_MIN_GAIN = "min_gain_db"
TAG_REPORT = "report"  # the workspace copy of the version's report.html
DELTA_SNR_PREFIX = "delta_snr_"
DELTA_PEAQ_PREFIX = "delta_peaq_"
CI_DELTA_SNR_PREFIX = "ci_delta_snr_"
PAIRED_GAIN_PREFIX = "gain_vs_"
# Tags of checkpoints registered from a file (an import, the boxed general model, a pretrain).
TAG_KIND = "kind"
TAG_SIZE = "size"
TAG_LINEAGE_PREFIX = "lineage."
# Run tag of the process registering a version (host, pid, start), to tell a dead one from a live one.
WORKER_TAG = "workbench.worker"

# The registered models an evaluation scores a fine-tuned version against, by their method names in the
# report: the gate promotes a version to @champion only when it beats the @base model and the champion.
BASE_MODEL = "base model"
FINE_TUNED = "fine-tuned"
CHAMPION_METHOD = "champion"

# What `--device ID` uses while the machine has no champion: the general model the device models start from.
GENERAL_BASE_URI = f"models:/{GENERAL_MODEL}@{BASE_ALIAS}"

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


def device_model_name(device_id: str) -> str:
    return MODEL_PREFIX + device_id


def device_of(model_name: str) -> str:
    """The device a `tape-denoiser-<device>` model belongs to ("general" for the general model)."""
    return model_name.removeprefix(MODEL_PREFIX)


def model_uri(name: str, version: int | None = None, alias: str | None = None) -> str:
    assert (version is None) != (alias is None), "a model URI names a version or an alias"
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"


def champion_uri(device_id: str) -> str:
    """The registry URI of a replay machine's current best model."""
    return model_uri(device_model_name(device_id), alias=CHAMPION)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, version, alias) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`; None for anything else."""
    match = _MODELS_URI.match(uri.strip())
    return (match["name"], match["version"], match["alias"]) if match else None


def is_model_uri(ref: str) -> bool:
    """True for MLflow URIs (models:/..., runs:/..., any scheme of two letters or more); False for paths."""
    scheme, sep, _ = str(ref).partition(":")
    return bool(sep) and len(scheme) >= 2 and scheme.replace("-", "").replace("+", "").isalnum() \
        and str(ref)[len(scheme) + 1 :].startswith("/")


def model_description(name: str) -> str:
    """The registered model's own description (each version has its own beside it)."""
    if name == GENERAL_MODEL:
        return ("General tape-noise denoiser (two-stage U-Net, Moliner & Välimäki 2022; tape noise per Irigaray et al. "
                "2023), the base every device model is fine-tuned from.")
    return f"Denoiser fine-tuned to one replay machine ({device_of(name)})."


def delta_snr_tag(snr_db: float) -> str:
    return f"{DELTA_SNR_PREFIX}{snr_db:g}db"


def delta_peaq_tag(snr_db: float) -> str:
    return f"{DELTA_PEAQ_PREFIX}{snr_db:g}db"


def ci_delta_snr_tag(snr_db: float) -> str:
    return f"{CI_DELTA_SNR_PREFIX}{snr_db:g}db"


def paired_gain_tag(rival_alias: str, snr_db: float) -> str:
    """The version tag holding the paired ΔSNR gain over a rival ("base" or "champion") at one input SNR."""
    return f"{PAIRED_GAIN_PREFIX}{rival_alias}_{snr_db:g}db"


def rivals(champion_version: int | None) -> list[tuple[str, str]]:
    """(method, how the gate names it) of every model the fine-tuned one must beat."""
    found = [(BASE_MODEL, "the base model")]
    if champion_version is not None:
        found.append((CHAMPION_METHOD, f"champion v{champion_version}"))
    return found
