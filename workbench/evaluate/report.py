"""The evaluation report: one self-contained HTML page and a JSON file holding every number.

The page is what an archive files with a restoration (IASA TC-03 asks that every intervention be
documented): the metrics table per input SNR and speed, the paired gains of the model over its rivals
(the same fragments, so their interval is what tells whether a gain is real), the noise each method
leaves behind against the device's noise and the mains hum it leaves, spectrograms of one fragment,
short clips to listen to (noisy, each model, clean), the Optuna study that chose the schedule, and the
lineage (noise snippets, clean corpus, base model, recipe). Plots are PNGs and clips FLAC, embedded as
base64 data URIs, and styles are inline, so the file opens anywhere, offline, forever. Both files are
written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import soundfile as sf

from workbench.audio.io import atomic_write_json, atomic_write_text
from workbench.evaluate.baselines import NOISY_INPUT
from workbench.evaluate.evaluate import CLEAN, METRIC_TITLES, NOISE_ADDED, NOISY, POOLED, EvaluationResult
from workbench.evaluate.metrics import interval_lies_above

# A study attribute holding the starting model's validation ΔSNR: drawn as the line trials must clear.
BASELINE_ATTR = "base_val_delta_snr_db"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
# Spectrogram analysis for the report's pictures (display only): 2048-sample Hann, hop 512, as the model.
SPECTROGRAM_WINDOW = 2048
SPECTROGRAM_HOP = 512
CLIP_PEAK = 10 ** (-1 / 20)  # listening clips of one fragment share a gain that puts their loudest at -1 dBFS


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    json: Path


# ---------------------------------------------------------------- plots (matplotlib, no pyplot state)

def _figure(width: float, height: float):
    # matplotlib is heavy (≈0.5 s): only a report with figures loads it.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_base64(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_delta_snr(result: EvaluationResult, metric: str = "delta_snr") -> str:
    """Bar chart of mean ΔSNR (or another metric, e.g. delta_peaq) with 95 % CI per method, one group per
    input SNR (pooled over speeds)."""
    figure = _figure(7.5, 3.6)
    axes = figure.add_subplot()
    methods = result.methods
    width = 0.8 / max(1, len(methods))
    for m, method in enumerate(methods):
        means, errors = [], []
        for snr in result.snrs_db:
            summary = result.summary(method, snr, metric, POOLED)
            means.append(summary.mean)
            errors.append(summary.half_width)
        x = np.arange(len(result.snrs_db)) + (m - (len(methods) - 1) / 2) * width
        axes.bar(x, means, width, yerr=errors, capsize=3, label=method)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(np.arange(len(result.snrs_db)), [f"input {snr:g} dB" for snr in result.snrs_db])
    axes.set_ylabel(f"{METRIC_TITLES[metric]}, mean ± 95 % CI")
    axes.legend(fontsize="small", ncols=min(3, len(methods)))
    axes.grid(axis="y", alpha=0.3)
    return _png_base64(figure)


def plot_residual_spectra(result: EvaluationResult, label: str, snr: float) -> str:
    """The noise that was added against the noise each method leaves behind (estimate − clean), Welch PSD."""
    figure = _figure(7.5, 3.8)
    axes = figure.add_subplot()
    curves = result.spectra[(label, snr)]
    frequencies = result.frequencies
    keep = frequencies > 0
    for name, psd in curves.items():
        if name == NOISY_INPUT:
            continue  # its residual is exactly the added noise, drawn in black
        style = {"color": "black", "linewidth": 2.0} if name == NOISE_ADDED else {"linewidth": 1.0}
        shown = f"device noise (as added at {snr:g} dB)" if name == NOISE_ADDED else f"residual after {name}"
        axes.semilogx(frequencies[keep], 10 * np.log10(np.maximum(psd[keep], 1e-30)), label=shown, **style)
    axes.set_xlabel("frequency (Hz)")
    axes.set_ylabel("PSD (dB re FS²/Hz)")
    axes.set_title(f"{label}, input {snr:g} dB SNR", fontsize="medium")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3, which="both")
    return _png_base64(figure)


def plot_spectrograms(example: dict, methods: list[str], sample_rate: int) -> str:
    """Spectrograms of one fragment: noisy, each method's estimate, clean, on one colour scale."""
    from scipy.signal import stft  # scipy submodules load slowly: only their callers pay

    panels = [("noisy input", example["noisy"])] + [(m, example[m]) for m in methods if m in example and m != NOISY_INPUT]
    panels.append(("clean", example["clean"]))
    figure = _figure(7.5, 1.9 * len(panels))
    images = []
    for index, (name, audio) in enumerate(panels):
        frequencies, times, spectrum = stft(audio, fs=sample_rate, nperseg=SPECTROGRAM_WINDOW,
                                            noverlap=SPECTROGRAM_WINDOW - SPECTROGRAM_HOP)
        images.append((name, frequencies, times, 20 * np.log10(np.abs(spectrum) + 1e-9)))
    top = max(float(np.percentile(image, 99.5)) for *_, image in images)
    for index, (name, frequencies, times, image) in enumerate(images):
        axes = figure.add_subplot(len(images), 1, index + 1)
        # imshow, not pcolormesh: a 1025-bin spectrogram draws in a fraction of the time
        mesh = axes.imshow(image, origin="lower", aspect="auto", cmap="magma", vmin=top - 90, vmax=top,
                           extent=(times[0], times[-1], frequencies[0] / 1000, frequencies[-1] / 1000),
                           interpolation="nearest")
        axes.set_ylabel("kHz")
        axes.set_title(name, fontsize="small", loc="left")
        if index < len(images) - 1:
            axes.set_xticklabels([])
    axes.set_xlabel("time (s)")
    figure.colorbar(mesh, ax=figure.axes, label="dB", shrink=0.6)
    return _png_base64(figure)


def plot_study_history(trials: list[dict], direction: str = "maximize", baseline: float | None = None) -> str:
    """Each trial's objective (completed) or last reported value (pruned), the best so far, and the
    starting model's value when known."""
    figure = _figure(7.5, 3.4)
    axes = figure.add_subplot()
    better = max if direction == "maximize" else min
    best, best_line = None, []
    for trial in trials:
        if trial["state"] == "COMPLETE" and trial["value"] is not None:
            best = trial["value"] if best is None else better(best, trial["value"])
        best_line.append(best)
    complete = [(t["number"], t["value"]) for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    pruned = [(t["number"], t["intermediate"][-1][1]) for t in trials if t["state"] == "PRUNED" and t["intermediate"]]
    if complete:
        axes.scatter(*zip(*complete), label="completed", zorder=3)
    if pruned:
        axes.scatter(*zip(*pruned), marker="x", color="grey", label="pruned (last report)", zorder=3)
    numbers = [t["number"] for t in trials]
    if baseline is not None:
        axes.axhline(baseline, color="black", linestyle=":", label="base model")
    if any(b is not None for b in best_line):
        axes.step(numbers, [np.nan if b is None else b for b in best_line], where="post", color="tab:red",
                  label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel("validation ΔSNR (dB)")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return _png_base64(figure)


def plot_intermediate(trials: list[dict], baseline: float | None = None) -> str:
    """Learning curves the pruner saw: validation ΔSNR at each reported step, per trial."""
    figure = _figure(7.5, 3.4)
    axes = figure.add_subplot()
    if baseline is not None:
        axes.axhline(baseline, color="black", linestyle=":", label="base model")
    for trial in trials:
        if trial["intermediate"]:
            steps, values = zip(*trial["intermediate"])
            style = {"linestyle": "--", "alpha": 0.6} if trial["state"] == "PRUNED" else {}
            axes.plot(steps, values, marker=".", label=f"#{trial['number']} {trial['state'].lower()}", **style)
    axes.set_xlabel("training step")
    axes.set_ylabel("validation ΔSNR (dB)")
    if len(trials) <= 12:
        axes.legend(fontsize="x-small", ncols=2)
    axes.grid(alpha=0.3)
    return _png_base64(figure)


def plot_importances(importances: dict[str, float]) -> str:
    figure = _figure(7.5, 0.5 + 0.4 * max(1, len(importances)))
    axes = figure.add_subplot()
    names = list(importances)[::-1]
    axes.barh(names, [importances[n] for n in names], color="tab:green")
    axes.set_xlabel("importance (fANOVA share of objective variance)")
    axes.grid(axis="x", alpha=0.3)
    return _png_base64(figure)


# ---------------------------------------------------------------- the study as data

def study_summary(study) -> dict:
    """An Optuna study's trials, best trial and parameter importances as plain data."""
    import optuna  # heavy: only the study's summary needs it, not every report reader

    trials = []
    for trial in study.get_trials(deepcopy=False):
        trials.append({
            "number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params,
            "intermediate": sorted((int(k), float(v)) for k, v in trial.intermediate_values.items()),
            "duration_s": trial.duration.total_seconds() if trial.duration else None,
            "user_attrs": trial.user_attrs,
        })
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    importances: dict[str, float] = {}
    importance_note = ""
    if len(complete) >= 2:
        try:
            importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError, ZeroDivisionError) as error:
            importance_note = f"parameter importances not computable: {error}"
    else:
        importance_note = f"parameter importances need at least 2 completed trials (have {len(complete)})"
    best = None
    if complete:
        best_trial = study.best_trial
        best = {"number": best_trial.number, "value": best_trial.value, "params": best_trial.params}
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["state"]] = counts.get(trial["state"], 0) + 1
    return {"name": study.study_name, "direction": study.direction.name.lower(), "trials": trials,
            "counts": counts, "best": best, "importances": importances, "importance_note": importance_note,
            "baseline": study.user_attrs.get(BASELINE_ATTR)}


# ---------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} tr.best td{font-weight:bold;background:#eef7ee}
img{max-width:100%;height:auto;display:block;margin:.5em 0} .muted{color:#666;font-size:.9em}
.verdict{padding:.6em 1em;border-radius:4px;background:#f5f5f5;border-left:4px solid #888}
.verdict.yes{border-color:#2a7;background:#eef7ee} .verdict.no{border-color:#c83;background:#fbf3ea}
code{background:#f3f3f3;padding:0 .2em} dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em} dt{font-weight:bold}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _img(data: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _metrics_table(result: EvaluationResult, label: str, snr: float) -> str:
    best_method = max(result.methods, key=lambda m: result.summary(m, snr, "delta_snr", label).mean)
    head = "".join(f"<th>{_e(METRIC_TITLES[m])}</th>" for m in result.metrics)
    rows = []
    for method in result.methods:
        cells = []
        for metric in result.metrics:
            summary = result.summary(method, snr, metric, label)
            cells.append(f"<td>{summary.mean:.2f} <span class=muted>[{summary.ci_low:.2f}, {summary.ci_high:.2f}]</span></td>")
        css = ' class="best"' if method == best_method else ""
        rows.append(f"<tr{css}><td class=l>{_e(method)}</td>{''.join(cells)}</tr>")
    count = len(result.values(result.methods[0], snr, "delta_snr", label))
    return (f"<h3>{_e(label)} — input {snr:g} dB SNR <span class=muted>({count} fragments; mean [95 % CI])</span></h3>"
            f"<table><tr><th class=l>method</th>{head}</tr>{''.join(rows)}</table>")


def _definition_list(data: dict) -> str:
    items = []
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, indent=1, ensure_ascii=False, default=str)
            items.append(f"<dt>{_e(key)}</dt><dd><pre>{_e(value)}</pre></dd>")
        else:
            items.append(f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>")
    return f"<dl>{''.join(items)}</dl>"


def _paired_table(rows: list[dict], label: str, snr: float, min_gain_db: float | None) -> str:
    shown = [r for r in rows if r["set"] == label and r["input_snr_db"] == snr]
    if not shown:
        return ""
    body = []
    for row in shown:
        clears = min_gain_db is not None and interval_lies_above(row["ci_low"], row["n"], min_gain_db)
        verdict = "" if min_gain_db is None else (f"<td>{'yes' if clears else 'no'}</td>")
        body.append(f"<tr><td class=l>{_e(row['method'])} − {_e(row['rival'])}</td><td>{row['mean']:+.2f}</td>"
                    f"<td>[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]</td><td>{row['half_width']:.2f}</td>"
                    f"<td>{row['n']}</td>{verdict}</tr>")
    head = "<th>interval above min gain</th>" if min_gain_db is not None else ""
    return (f"<h3>{_e(label)} — input {snr:g} dB SNR</h3><table><tr><th class=l>paired ΔSNR difference</th>"
            f"<th>mean (dB)</th><th>95 % CI</th><th>± half-width</th><th>fragments</th>{head}</tr>"
            f"{''.join(body)}</table>")


def _hum_table(rows: list[dict], label: str, snr: float) -> str:
    shown = [r for r in rows if r["set"] == label and r["input_snr_db"] == snr and r["method"] != NOISY_INPUT]
    if not shown:
        return ""
    frequencies = shown[0]["frequencies_hz"]
    head = "".join(f"<th>{f:.1f} Hz</th>" for f in frequencies)
    inputs = "".join(f"<td>{v:.1f}</td>" for v in shown[0]["input_db"])
    body = [f"<tr><td class=l>input noise (dB re FS²)</td>{inputs}<td></td></tr>"]
    for row in shown:
        cells = "".join(f"<td>{v:+.1f}</td>" for v in row["relative_db"])
        body.append(f"<tr><td class=l>{_e(row['method'])} (dB vs input)</td>{cells}<td><b>{row['total_db']:+.1f}</b></td></tr>")
    return (f"<h3>{_e(label)} — input {snr:g} dB SNR <span class=muted>(fundamental {shown[0]['fundamental_hz']:.2f} Hz)"
            f"</span></h3><table><tr><th class=l></th>{head}<th>all four</th></tr>{''.join(body)}</table>")


def _flac_base64(audio: np.ndarray, sample_rate: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _clips_section(result: EvaluationResult, methods: list[str]) -> str:
    """An audio player per version of each listening clip: noisy, each method, clean, at one shared gain."""
    parts = []
    for clip in result.clips:
        versions = [("noisy input", clip[NOISY])] + [(m, clip[m]) for m in methods if m in clip and m != NOISY_INPUT]
        versions.append(("clean", clip[CLEAN]))
        peak = max(float(np.max(np.abs(audio))) for _, audio in versions)
        gain = CLIP_PEAK / peak if peak > 0 else 1.0
        seconds = len(clip[CLEAN]) / result.sample_rate
        rows = "".join(f"<tr><td class=l>{_e(name)}</td><td class=l><audio controls preload=none "
                       f"src=\"data:audio/flac;base64,{_flac_base64(gain * audio, result.sample_rate)}\"></audio></td></tr>"
                       for name, audio in versions)
        parts.append(f"<h3>{_e(clip['set'])}, fragment {clip['index']} <span class=muted>(first {seconds:g} s, input "
                     f"{clip['snr']:g} dB SNR, all versions at one gain of {20 * math.log10(gain):+.1f} dB)</span></h3>"
                     f"<table>{rows}</table>")
    return "".join(parts)


def render_html(data: dict, result: EvaluationResult, study: dict | None) -> str:
    """The report page from the report's data; every picture is drawn here and embedded."""
    title = data["title"]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p class=muted>written {_e(data['created'])}</p>"]
    if data.get("summary_text"):
        parts.append(f"<p>{_e(data['summary_text'])}</p>")
    decision = data.get("decision")
    if decision:
        css = "yes" if decision.get("promoted") else "no"
        parts.append(f"<p class='verdict {css}'>{_e(decision.get('message', ''))}</p>")

    parts.append("<h2>Results on the device's test noise</h2>")
    parts.append("<p>Fixed fragments of held-out clean music mixed with the device's <b>test</b> noise "
                 "(never seen while tuning) at each input SNR (Eq. 1). ΔSNR and ΔSI-SDR are gains over the "
                 "noisy input; higher is better.</p>")
    parts.append(_img(plot_delta_snr(result), "mean ΔSNR per method"))
    if "delta_peaq" in result.metrics:
        parts.append("<p>PEAQ ODG: ITU-R BS.1387 Basic version against the clean fragment (0 imperceptible "
                     "… −4 very annoying; 44.1 kHz resampled to 48 kHz, full scale = 92 dB SPL); ΔPEAQ is "
                     "its gain over the noisy input's ODG, higher is better.</p>")
        parts.append(_img(plot_delta_snr(result, "delta_peaq"), "mean ΔPEAQ per method"))
    labels = result.labels + ([POOLED] if len(result.sets) > 1 else [])
    for label in labels:
        for snr in result.snrs_db:
            parts.append(_metrics_table(result, label, snr))

    paired = data.get("paired") or {}
    if paired.get("rows"):
        threshold = paired.get("min_gain_db")
        parts.append("<h2>Paired gains</h2><p>Per fragment, the model's ΔSNR minus each rival's on the <b>same</b> "
                     "fragment; the mean of those differences with the 95 % t-interval of the paired differences "
                     "(the paired t-test's interval). The music and noise that make one fragment harder than "
                     "another cancel, so this interval, not the overlap of the two methods' own intervals, says "
                     "whether the gain is real."
                     + (f" The gate asks that it lie above {threshold:+g} dB at every input SNR." if threshold is not None else "")
                     + "</p>")
        for label in labels:
            for snr in result.snrs_db:
                parts.append(_paired_table(paired["rows"], label, snr, threshold))

    parts.append("<h2>Noise left behind</h2><p>Welch spectrum of the noise that was added (black) and of the "
                 "residual each method leaves (estimate − clean), averaged over fragments.</p>")
    for label in result.labels:
        for snr in result.snrs_db:
            parts.append(_img(plot_residual_spectra(result, label, snr), f"residual spectra {label} {snr} dB"))
    hum_rows = data["evaluation"].get("hum") or []
    if hum_rows:
        parts.append("<h3>Mains hum left behind</h3><p>Power of the residual (estimate − clean) within "
                     "±2 Hz of the mains fundamental and its first three harmonics, against the power the added "
                     "noise has there, in dB (0: the hum is all still there; −10: a tenth of its power is left).</p>")
        for label in result.labels:
            for snr in result.snrs_db:
                parts.append(_hum_table(hum_rows, label, snr))

    parts.append("<h2>One fragment</h2>")
    for label, example in result.examples.items():
        parts.append(f"<p class=muted>{_e(label)}, fragment 0 at input {example['snr']:g} dB SNR</p>")
        parts.append(_img(plot_spectrograms(example, result.methods, result.sample_rate), f"spectrograms {label}"))

    if result.clips:
        clip_methods = data.get("clip_methods") or result.methods
        parts.append("<h2>Listen</h2><p>The start of a few test fragments as the noisy input, each model's "
                     "restoration and the clean original (FLAC in the page; headphones help with hiss and hum).</p>")
        parts.append(_clips_section(result, clip_methods))

    if study:
        parts.append(f"<h2>Optuna study <code>{_e(study['name'])}</code></h2>")
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(study["counts"].items()))
        baseline = study.get("baseline")
        parts.append(f"<p>{_e(counts)}. Objective: validation ΔSNR on the device's validation noise "
                     f"({_e(study['direction'])})"
                     + (f"; the base model scores {baseline:+.3f} dB there" if baseline is not None else "") + ".</p>")
        if study["best"]:
            parts.append(f"<p>Best trial #{study['best']['number']}: {study['best']['value']:.3f} dB with</p>"
                         + _definition_list(study["best"]["params"]))
        if study["trials"]:
            parts.append(_img(plot_study_history(study["trials"], study["direction"], baseline), "optimisation history"))
            parts.append(_img(plot_intermediate(study["trials"], baseline), "intermediate values"))
        if study["importances"]:
            parts.append("<h3>Parameter importances</h3>")
            parts.append(_img(plot_importances(study["importances"]), "parameter importances"))
        elif study["importance_note"]:
            parts.append(f"<p class=muted>{_e(study['importance_note'])}</p>")

    if data.get("model"):
        parts.append("<h2>Model</h2>" + _definition_list(data["model"]))
    parts.append("<h2>Lineage</h2>" + _definition_list(data.get("lineage", {})))
    parts.append("<p class=muted>Every number on this page is in the report's JSON file.</p></body></html>")
    return "\n".join(parts)


def write_report(out_dir: Path, result: EvaluationResult, *, title: str, lineage: dict, study=None,
                 model: dict | None = None, decision: dict | None = None, summary_text: str = "",
                 paired: tuple[str, list[str]] | None = None, min_gain_db: float | None = None,
                 clip_methods: list[str] | None = None) -> ReportFiles:
    """Write `report.html` and `report.json` into `out_dir` (atomically); returns their paths.

    `study` is an optuna.Study (or None); `lineage` says what the numbers rest on (noise snippet digests,
    clean corpus, base model version, recipe); `model` and `decision` describe the registered version
    and whether it was promoted. `paired` = (method, rivals) adds the paired ΔSNR differences of that
    method over each rival (checked against `min_gain_db` when given); `clip_methods` chooses the methods
    heard in the listening clips (default: all).
    """
    out_dir = Path(out_dir)
    study_data = study_summary(study) if study is not None else None
    data = {
        "title": title,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary_text": summary_text,
        "decision": decision or {},
        "model": model or {},
        "evaluation": result.to_dict(),
        "paired": {"method": paired[0], "min_gain_db": min_gain_db,
                   "interval": "95 % t-interval of the per-fragment differences (paired t-test)",
                   "rows": result.paired_table(paired[0], paired[1])} if paired else None,
        "clip_methods": clip_methods,
        "study": study_data,
        "lineage": lineage,
    }
    data = _finite(data)
    page = render_html(data, result, data["study"])
    atomic_write_json(out_dir / REPORT_JSON, data)
    atomic_write_text(out_dir / REPORT_HTML, page)
    return ReportFiles(out_dir / REPORT_HTML, out_dir / REPORT_JSON)


def pooled_paired(report: dict) -> dict[str, dict[str, dict]]:
    """From a report.json's data: rival -> str(input SNR) -> the paired gain over it (fragments pooled over
    the sets; the one set when there is only one)."""
    single = len(report.get("evaluation", {}).get("fragment_sets", [])) == 1
    paired: dict[str, dict[str, dict]] = {}
    for row in (report.get("paired") or {}).get("rows", []):
        if row["set"] == POOLED or single:
            paired.setdefault(row["rival"], {})[f"{row['input_snr_db']:g}"] = {
                k: row[k] for k in ("mean", "ci_low", "ci_high", "half_width", "n")}
    return paired


def _finite(data):
    """JSON has no NaN or infinity: non-finite numbers (a diverged trial) become null."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data
