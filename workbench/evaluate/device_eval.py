"""The evaluation of a device model: the fine-tuned network beside the noisy input, the base model, the
current champion and spectral gating on the machine's test fragments, and the promotion gate.

    result = evaluate_models(plan, {BASE_MODEL: base, FINE_TUNED: model})
    promoted, reason = promotion_decision(result, snrs, champion_version, min_gain_db)

`plan` is the fine-tuning plan (`workbench.finetune.Plan`): the machine, its speeds, its test and train
noise, the test music and the recipe's [evaluation] settings. A model is scored through
`workbench.model.overlap_add.denoise_samples`, the very chunked inference `workbench denoise` and the
pyfunc model run.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.audio.dsp import MODEL_SAMPLE_RATE
from workbench.evaluate.baselines import (
    NOISY_INPUT,
    SPECTRAL_GATING,
    noisy_input,
    spectral_gating,
)
from workbench.evaluate.evaluate import PerSet, evaluate_methods
from workbench.evaluate.fragments import evaluation_fragments
from workbench.model.overlap_add import denoise_samples
from workbench.model_registry.names import FINE_TUNED, rivals
from workbench.noise.library import NoiseLibrary
from workbench.progress import Progress, no_progress

if TYPE_CHECKING:  # the plan is finetune's; finetune imports this module
    from workbench.finetune import Plan

# Spectral gating is given this much of the machine's train noise as its noise profile.
GATING_NOISE_SECONDS = 10.0


def _gating_noise(plan: Plan, speed: float | None) -> np.ndarray:
    """Spectral gating's noise profile: up to GATING_NOISE_SECONDS of the machine's TRAIN noise at that speed."""
    snippets = [s for s in plan.noise["train"] if speed is None or abs(float(s.speed_ips) - float(speed)) < 1e-6]
    parts, total = [], 0
    for snippet in snippets:
        parts.append(snippet.load())
        total += parts[-1].shape[0]
        if total >= GATING_NOISE_SECONDS * MODEL_SAMPLE_RATE:
            break
    return np.concatenate(parts)[: int(GATING_NOISE_SECONDS * MODEL_SAMPLE_RATE)]


def evaluate_models(plan: Plan, models: dict[str, Any], progress: Progress = no_progress):
    """Score the models (name -> TwoStageUNet) with the noisy input and spectral gating on the machine's
    test fragments, one fragment set per speed."""
    settings = plan.evaluation
    sets = []
    for speed in plan.speeds:
        snippets = [s for s in plan.noise["test"] if abs(float(s.speed_ips) - speed) < 1e-6]
        sets.append(evaluation_fragments(plan.workspace.mixtures_dir, plan.device.id, speed, plan.clean["test"], snippets,
                                         count=settings.fragments, seconds=settings.seconds, seed=settings.seed,
                                         snrs_db=settings.snrs_db, silence_dbfs=plan.recipe["data"]["silence_dbfs"],
                                         progress=progress))
    methods: dict[str, Any] = {NOISY_INPUT: noisy_input}
    # A model is scored through the chunked inference `denoise` and the pyfunc model run.
    methods |= {name: functools.partial(denoise_samples, model) for name, model in models.items()}
    methods[SPECTRAL_GATING] = PerSet(lambda fragment_set: spectral_gating(_gating_noise(plan, fragment_set.speed)),
                                      noise_gains=True)
    return evaluate_methods(sets, methods, batch_size=settings.batch_size, hum_hz=_hum_fundamentals(plan, sets),
                            progress=progress, peaq=settings.peaq)


def _hum_fundamentals(plan: Plan, sets) -> dict[str, float]:
    """Set label -> the mains hum fundamental of the machine's noise profile at that speed (sets whose
    noise has no hum that stands out are left out: there is no hum to measure)."""
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


def paired_summary(result, snrs: list[float], champion_version: int | None) -> dict[str, dict[str, dict]]:
    """rival method -> str(snr) -> the paired ΔSNR gain of the fine-tuned model over it."""
    return {method: {f"{snr:g}": {k: v for k, v in result.paired(FINE_TUNED, method, snr).to_dict().items()
                                  if k in ("mean", "ci_low", "ci_high", "half_width", "n")} for snr in snrs}
            for method, _ in rivals(champion_version)}


def summary_by_method(result, snrs: list[float]) -> dict[str, dict[str, dict]]:
    return {method: {f"{snr:g}": {k: v for k, v in result.summary(method, snr).to_dict().items()
                                  if k in ("mean", "ci_low", "ci_high", "n")} for snr in snrs}
            for method in result.methods}
