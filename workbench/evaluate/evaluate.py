"""Score denoising methods side by side on fixed test fragments.

`evaluate_methods` runs every method on every fragment at every input SNR and keeps, per fragment, SNR,
ΔSNR, SI-SDR and ΔSI-SDR (and, with `peaq=True`, the PEAQ ODG against the clean fragment and ΔPEAQ, its
gain over the noisy input's ODG); their means with 95 % confidence intervals per speed and pooled over speeds,
and paired ones (one method minus another on the same fragments); the Welch spectrum of the noise each
method leaves behind (estimate − clean) next to the noise that was added; the mains hum each method
leaves (when the set's hum fundamental is given); one fragment's audio for the report's spectrograms and
short clips of a few fragments to listen to. Methods are plain callables (see
`workbench.evaluate.baselines`), so a model, a baseline and a champion are scored the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from workbench.audio.io import MODEL_SAMPLE_RATE, check_finite
from workbench.evaluate.fragments import FragmentSet
from workbench.evaluate.metrics import HumResidual, Summary, hum_residual, mean_ci, paired_ci, si_sdr_db, snr_db
from workbench.evaluate.peaq import peaq_odg_rows
from workbench.noise.profile import PSD_SEGMENT_SECONDS
from workbench.progress import Progress, no_progress

METRICS = ("snr", "delta_snr", "si_sdr", "delta_si_sdr")
METRIC_TITLES = {"snr": "SNR (dB)", "delta_snr": "ΔSNR (dB)", "si_sdr": "SI-SDR (dB)", "delta_si_sdr": "ΔSI-SDR (dB)"}
PEAQ_METRICS = ("peaq_odg", "delta_peaq")  # present when evaluate_methods ran with peaq=True
METRIC_TITLES |= {"peaq_odg": "PEAQ ODG", "delta_peaq": "ΔPEAQ (ODG)"}
POOLED = "all"
NOISE_ADDED = "noise added"
NOISY = "noisy"  # the clip's noisy input (a method named "noisy input" may also be there: the same audio)
CLEAN = "clean"
CLIP_COUNT = 2  # fragments kept as listening clips ...
CLIP_SECONDS = 4.0  # ... of at most this long each (the start of the fragment)


@dataclass(frozen=True)
class PerSet:
    """A method that depends on the fragment set, e.g. spectral gating given the noise of that set's speed:
    `build(fragment_set)` returns the callable used on that set. With `noise_gains` the callable is called
    as `method(noisy, gains)`, `gains` (B,) being the factor Eq. 1 put on each row's noise: a noise
    reference scaled by it sits at the level the noise has in that row, as a blank tape recorded with
    the transfer's gain would."""

    build: Callable[[FragmentSet], Callable[..., np.ndarray]]
    noise_gains: bool = False


@dataclass
class EvaluationResult:
    """Every number of one evaluation; `to_dict` gives them all as JSON-ready data."""

    methods: list[str]
    snrs_db: list[float]
    sets: list[dict]  # one per fragment set: label, device, speed, digest, count, seconds, path
    scores: dict[tuple[str, str, float], dict[str, np.ndarray]]  # (method, set label, snr) -> metric -> (N,)
    frequencies: np.ndarray
    spectra: dict[tuple[str, float], dict[str, np.ndarray]]  # (set label, snr) -> NOISE_ADDED | method -> PSD
    examples: dict[str, dict] = field(default_factory=dict)  # set label -> {"snr", "clean", "noisy", methods...}
    sample_rate: int = MODEL_SAMPLE_RATE
    hum: dict[tuple[str, str, float], HumResidual] = field(default_factory=dict)  # (method, set label, snr) -> hum
    # Listening clips: {"set", "index", "snr", CLEAN: (T,), NOISY: (T,), each method: (T,)}.
    clips: list[dict] = field(default_factory=list)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this result holds: METRICS, and PEAQ_METRICS when PEAQ was computed."""
        first = next(iter(self.scores.values()), {})
        return METRICS + tuple(m for m in PEAQ_METRICS if m in first)

    @property
    def labels(self) -> list[str]:
        return [s["label"] for s in self.sets]

    def values(self, method: str, snr: float, metric: str = "delta_snr", label: str = POOLED) -> np.ndarray:
        """Per-fragment values of one metric; `label` "all" pools the fragments of every speed."""
        labels = self.labels if label == POOLED else [label]
        return np.concatenate([self.scores[(method, lab, float(snr))][metric] for lab in labels])

    def summary(self, method: str, snr: float, metric: str = "delta_snr", label: str = POOLED) -> Summary:
        return mean_ci(self.values(method, snr, metric, label))

    def paired(self, method: str, rival: str, snr: float, metric: str = "delta_snr", label: str = POOLED) -> Summary:
        """Mean and 95 % t-interval of `method − rival` over the same fragments (paired differences)."""
        return paired_ci(self.values(method, snr, metric, label), self.values(rival, snr, metric, label))

    def paired_table(self, method: str, rivals: Sequence[str], metric: str = "delta_snr") -> list[dict]:
        """One row per (set or pooled, input SNR, rival): `method − rival`, mean and interval."""
        labels = self.labels + ([POOLED] if len(self.sets) > 1 else [])
        return [{"set": label, "input_snr_db": snr, "method": method, "rival": rival, "metric": metric,
                 **self.paired(method, rival, snr, metric, label).to_dict()}
                for label in labels for snr in self.snrs_db for rival in rivals if rival in self.methods]

    def table(self) -> list[dict]:
        """One row per (set or pooled, input SNR, method) with the mean and CI of every metric."""
        labels = self.labels + ([POOLED] if len(self.sets) > 1 else [])
        rows = []
        for label in labels:
            for snr in self.snrs_db:
                for method in self.methods:
                    row = {"set": label, "input_snr_db": snr, "method": method}
                    for metric in self.metrics:
                        row[metric] = self.summary(method, snr, metric, label).to_dict()
                    rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {
            "methods": self.methods,
            "input_snrs_db": self.snrs_db,
            "fragment_sets": self.sets,
            "summary": self.table(),
            "per_fragment": [
                {"method": method, "set": label, "input_snr_db": snr,
                 **{metric: [round(float(v), 4) for v in values[metric]] for metric in self.metrics}}
                for (method, label, snr), values in self.scores.items()
            ],
            "residual_spectra": {
                "frequencies_hz": [round(float(f), 3) for f in self.frequencies],
                "unit": "dB re 1/Hz (full scale = 1)",
                "curves": [
                    {"set": label, "input_snr_db": snr,
                     **{name: [round(float(v), 3) for v in _to_db(psd)] for name, psd in curves.items()}}
                    for (label, snr), curves in self.spectra.items()
                ],
            },
            "hum": [{"method": method, "set": label, "input_snr_db": snr, **hum.to_dict()}
                    for (method, label, snr), hum in self.hum.items()],
            "clips": [{"set": c["set"], "fragment": c["index"], "input_snr_db": c["snr"],
                       "seconds": len(c[CLEAN]) / self.sample_rate} for c in self.clips],
        }


def _to_db(psd: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(psd, 1e-30))


def _welch(x: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean Welch PSD over the rows of x (N, T), with the noise profile's segment (Hann, 50 % overlap),
    so residual spectra and the device's noise profile are read on the same frequency grid."""
    # scipy submodules load slowly: only their callers pay.
    from scipy.signal import welch

    segment = min(int(round(PSD_SEGMENT_SECONDS * sample_rate)), x.shape[-1])
    frequencies, psd = welch(x.astype(np.float64), fs=sample_rate, window="hann", nperseg=segment, axis=-1)
    return frequencies, psd.reshape(-1, psd.shape[-1]).mean(axis=0)


def _run_method(method: Callable[..., np.ndarray], noisy: np.ndarray, batch_size: int,
                noise_gains: np.ndarray | None = None) -> np.ndarray:
    estimates = []
    for start in range(0, noisy.shape[0], batch_size):
        batch = noisy[start:start + batch_size]
        extra = () if noise_gains is None else (noise_gains[start:start + batch_size],)
        estimate = np.asarray(method(batch, *extra), dtype=np.float32)
        if estimate.shape != batch.shape:
            raise ValueError(f"a method returned shape {estimate.shape} for input {batch.shape}")
        estimates.append(estimate)
    return np.concatenate(estimates)


def _check_finite_estimate(estimate: np.ndarray, method: str, label: str, snr: float, sample_rate: int) -> None:
    """A method (a damaged checkpoint, a diverged model) that outputs NaN or inf is refused in one line
    naming the fragment and the time: a non-finite value never reaches a metric."""
    bad = np.flatnonzero(~np.isfinite(estimate).all(axis=1))
    if bad.size:
        check_finite(estimate[bad[0]], f"evaluation of {method!r} on {label} fragment {int(bad[0])} at {snr:g} dB",
                     sample_rate, what="the model (a damaged or diverged one?) outputs NaN or inf")


def evaluate_methods(fragments: FragmentSet | Sequence[FragmentSet],
                     methods: Mapping[str, Callable[[np.ndarray], np.ndarray] | PerSet], *, batch_size: int = 4,
                     example_index: int = 0, hum_hz: Mapping[str, float] | None = None,
                     clips: int = CLIP_COUNT, clip_seconds: float = CLIP_SECONDS,
                     progress: Progress = no_progress, peaq: bool = False) -> EvaluationResult:
    """Run every method on every fragment set at each of its input SNRs and score the estimates.

    `hum_hz` (set label -> mains hum fundamental in Hz) adds each method's residual hum on those sets;
    `clips` fragments (taken in turn from each set) are kept, cut to `clip_seconds`, at the lowest input
    SNR for listening; with `peaq`, also each fragment's PEAQ ODG (workbench.evaluate.peaq) and ΔPEAQ."""
    sets = [fragments] if isinstance(fragments, FragmentSet) else list(fragments)
    assert sets and methods, "evaluate_methods needs fragments and methods"
    snrs = [float(s) for s in sets[0].snrs_db]
    assert all([float(s) for s in f.snrs_db] == snrs for f in sets), "every set must use the same input SNRs"
    sample_rate = sets[0].sample_rate
    scores: dict = {}
    spectra: dict = {}
    examples: dict = {}
    hums: dict = {}
    clip_frames = int(round(clip_seconds * sample_rate))
    clip_at = _clip_fragments(sets, clips)
    clip_list = {key: {"set": key[0], "index": key[1], "snr": min(snrs)} for key in clip_at}
    frequencies = np.zeros(0)
    total, done = len(sets) * len(snrs) * len(methods), 0
    for fragment_set in sets:
        label = fragment_set.label
        clean = fragment_set.clean
        example_at = min(example_index, fragment_set.count - 1)
        fundamental = (hum_hz or {}).get(label)
        for snr in snrs:
            noisy = fragment_set.noisy(snr)
            input_snr = snr_db(clean, noisy)
            input_si_sdr = si_sdr_db(clean, noisy)
            input_odg = peaq_odg_rows(clean, noisy, sample_rate) if peaq else None
            frequencies, added = _welch(noisy - clean, sample_rate)
            spectra[(label, snr)] = {NOISE_ADDED: added}
            if snr == min(snrs):
                examples[label] = {"snr": snr, "clean": clean[example_at], "noisy": noisy[example_at]}
                for (clip_label, index), clip in clip_list.items():
                    if clip_label == label:
                        clip[CLEAN], clip[NOISY] = clean[index, :clip_frames], noisy[index, :clip_frames]
            for name, method in methods.items():
                gains = None
                if isinstance(method, PerSet):
                    gains = fragment_set.noise_gains(snr) if method.noise_gains else None
                    method = method.build(fragment_set)
                estimate = _run_method(method, noisy, batch_size, gains)
                _check_finite_estimate(estimate, name, label, snr, sample_rate)
                out_snr = snr_db(clean, estimate)
                out_si_sdr = si_sdr_db(clean, estimate)
                scores[(name, label, snr)] = {
                    "snr": out_snr, "delta_snr": out_snr - input_snr,
                    "si_sdr": out_si_sdr, "delta_si_sdr": out_si_sdr - input_si_sdr,
                }
                if peaq:  # the noisy input as a method is graded already
                    odg = input_odg if np.array_equal(estimate, noisy) else peaq_odg_rows(clean, estimate, sample_rate)
                    scores[(name, label, snr)] |= {"peaq_odg": odg, "delta_peaq": odg - input_odg}
                spectra[(label, snr)][name] = _welch(estimate - clean, sample_rate)[1]
                if fundamental:
                    hums[(name, label, snr)] = hum_residual(noisy - clean, estimate - clean, sample_rate, fundamental)
                if snr == min(snrs):
                    examples[label][name] = estimate[example_at]
                    for (clip_label, index), clip in clip_list.items():
                        if clip_label == label:
                            clip[name] = estimate[index, :clip_frames]
                done += 1
                progress("evaluate", done, total, method=name, snr=snr)
    described = [{"label": f.label, "device": f.device, "speed": f.speed, "digest": f.digest, "count": f.count,
                  "seconds": f.clean.shape[1] / f.sample_rate, "path": str(f.path) if f.path else None}
                 for f in sets]
    return EvaluationResult(list(methods), snrs, described, scores, frequencies, spectra, examples, sample_rate,
                            hums, list(clip_list.values()))


def _clip_fragments(sets: Sequence[FragmentSet], count: int) -> list[tuple[str, int]]:
    """(set label, fragment index) of `count` fragments, taken from each set in turn."""
    chosen: list[tuple[str, int]] = []
    for index in range(max(s.count for s in sets)):
        for fragment_set in sets:
            if len(chosen) < count and index < fragment_set.count:
                chosen.append((fragment_set.label, index))
    return chosen
