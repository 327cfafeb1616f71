"""The evaluation report: one self-contained HTML page plus a JSON file with every number."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import optuna
import pytest

from workbench.evaluate.baselines import NOISY_INPUT, noisy_input
from workbench.evaluate.evaluate import evaluate_methods
from workbench.evaluate.fragments import FragmentSet
from workbench.evaluate.report import BASELINE_ATTR, REPORT_HTML, REPORT_JSON, study_summary, write_report

SR = 44100


def small_fragments(speed: float, seed: int) -> FragmentSet:
    rng = np.random.default_rng(seed)
    t = np.arange(SR // 2) / SR
    clean = np.stack([0.2 * np.sin(2 * np.pi * (220 + 50 * i) * t) for i in range(3)]).astype(np.float32)
    noise = (0.01 * rng.standard_normal(clean.shape)).astype(np.float32)
    manifest = {"digest": f"{seed:064x}", "sample_rate": SR}
    return FragmentSet("revox-a77", speed, (10.0, 16.0), clean, noise, manifest)


def a_study() -> optuna.Study:
    """A real (in-memory) study with completed and pruned trials over two parameters."""
    study = optuna.create_study(study_name="finetune-revox-a77", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.ThresholdPruner(lower=-1.0))
    def objective(trial):
        lr = trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)
        steps = trial.suggest_int("steps", 10, 50)
        value = 0.0
        for step in range(10, steps + 1, 10):
            value = -abs(np.log10(lr) + 4) * 3 + step / 50
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value
    study.optimize(objective, n_trials=8)
    study.set_user_attr(BASELINE_ATTR, -0.5)  # the starting model's score: the line to clear
    return study


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    sets = [small_fragments(7.5, 1), small_fragments(3.75, 2)]
    methods = {NOISY_INPUT: noisy_input, "quieter noise": lambda x: 0.5 * x}
    result = evaluate_methods(sets, methods)
    study = a_study()
    lineage = {"noise_snippets": ["ab" * 32, "cd" * 32], "clean_corpus": "synthetic", "base_model": "tape-denoiser-general/3",
               "recipe": {"name": "quickstart"}}
    files = write_report(out, result, title="tape-denoiser-revox-a77 v1", lineage=lineage, study=study,
                         model={"name": "tape-denoiser-revox-a77", "version": "1"},
                         decision={"promoted": False, "message": "not promoted: worse than the base model at 16 dB"},
                         summary_text="Fine-tuned for revox-a77.")
    return files, result, study


def test_report_html_is_self_contained(written):
    files, _, _ = written
    page = files.html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # No external assets: no script, no stylesheet links, no remote or file sources.
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # ΔSNR bars, 2 speeds x 2 SNRs residual spectra, 2 spectrogram sets, history, learning curves, importances.
    assert len(images) == 1 + 4 + 2 + 3
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    for text in ("revox-a77@7.5", "revox-a77@3.75", "input 10 dB", "input 16 dB", "quieter noise",
                 "finetune-revox-a77", "tape-denoiser-general/3", "not promoted", "Parameter importances",
                 "the base model scores -0.500 dB"):
        assert text in page, text


def test_report_json_holds_every_number(written):
    files, result, study = written
    data = json.loads(files.json.read_text())
    assert files.html.name == REPORT_HTML and files.json.name == REPORT_JSON
    rows = data["evaluation"]["summary"]
    assert len(rows) == 3 * 2 * 2  # (2 speeds + pooled) x 2 SNRs x 2 methods
    row = next(r for r in rows if r["set"] == "all" and r["input_snr_db"] == 10.0 and r["method"] == "quieter noise")
    expected = result.summary("quieter noise", 10.0)
    assert row["delta_snr"]["mean"] == pytest.approx(expected.mean)
    assert row["delta_snr"]["ci_low"] == pytest.approx(expected.ci_low)
    per_fragment = data["evaluation"]["per_fragment"]
    assert sum(len(p["delta_snr"]) for p in per_fragment) == 2 * 2 * 2 * 3
    spectra = data["evaluation"]["residual_spectra"]
    assert len(spectra["curves"]) == 4 and len(spectra["curves"][0]["noise added"]) == len(spectra["frequencies_hz"])
    assert len(data["study"]["trials"]) == len(study.trials) == 8
    assert data["study"]["counts"].get("PRUNED", 0) >= 1
    assert data["study"]["best"]["value"] == pytest.approx(study.best_value)
    assert set(data["study"]["importances"]) == {"learning_rate", "steps"}
    assert data["study"]["baseline"] == -0.5
    assert data["lineage"]["clean_corpus"] == "synthetic"
    # Scaling the noisy input by one half never changes SI-SDR: the table says so.
    si = next(r for r in rows if r["set"] == "all" and r["method"] == "quieter noise")["delta_si_sdr"]["mean"]
    assert si == pytest.approx(0.0, abs=1e-3)


def test_study_summary_with_too_few_trials_says_why():
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    summary = study_summary(study)
    assert summary["importances"] == {}
    assert "at least 2 completed trials" in summary["importance_note"]


def test_write_report_leaves_nothing_half_written(tmp_path):
    sets = small_fragments(7.5, 3)
    result = evaluate_methods(sets, {NOISY_INPUT: noisy_input})
    result.examples.clear()
    result.examples["broken"] = {"snr": 10.0}  # no audio: drawing the spectrogram fails
    with pytest.raises(KeyError):
        write_report(tmp_path, result, title="t", lineage={})
    assert list(tmp_path.iterdir()) == []
