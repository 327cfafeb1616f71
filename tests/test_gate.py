"""The evaluation that can tell: paired statistics, the promotion gate, residual hum, listening clips and
`denoise --device` before a machine has a champion.

The gate is tested on constructed per-fragment scores (an EvaluationResult built from known numbers), so
each case says exactly what it refuses or promotes; the statistics are checked against scipy.stats.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import soundfile as sf
from scipy import stats

from workbench.evaluate.baselines import NOISY_INPUT, noisy_input
from workbench.evaluate.device_eval import promotion_decision
from workbench.model_registry.names import BASE_MODEL, CHAMPION_METHOD, FINE_TUNED
from workbench.evaluate.evaluate import POOLED, EvaluationResult, evaluate_methods
from workbench.evaluate.fragments import FragmentSet, evaluation_settings
from workbench.evaluate.metrics import hum_residual, mean_ci, paired_ci
from workbench.evaluate.report import pooled_paired, write_report

SR = 44100
SNRS = [10.0, 16.0]


# ------------------------------------------------------------------------------------ paired statistics

def test_paired_interval_is_scipys_paired_t_interval():
    rng = np.random.default_rng(4)
    base = rng.normal(1.0, 2.0, 40)  # fragments differ a lot from one another ...
    tuned = base + rng.normal(0.4, 0.3, 40)  # ... the two methods on the same fragment much less
    paired = paired_ci(tuned, base)
    reference = stats.ttest_rel(tuned, base).confidence_interval(0.95)
    assert paired.mean == pytest.approx(np.mean(tuned - base))
    assert (paired.ci_low, paired.ci_high) == pytest.approx((reference.low, reference.high))
    assert paired.n == 40 and paired.half_width == pytest.approx((reference.high - reference.low) / 2)
    # Unpaired, the same data cannot tell: each method's own interval is far wider than the difference.
    assert mean_ci(tuned).ci_low < mean_ci(base).ci_high
    assert paired.lies_above(0.0) and not paired.lies_above(1.0)
    with pytest.raises(AssertionError):
        paired_ci(tuned, base[:-1])


def result_from_scores(delta_snr: dict[str, dict[float, np.ndarray]], labels=("deck@1.875",)) -> EvaluationResult:
    """An EvaluationResult holding the given per-fragment ΔSNR (method -> snr -> values), split evenly
    over `labels` in order; the other metrics mirror ΔSNR."""
    scores = {}
    for method, per_snr in delta_snr.items():
        for snr, values in per_snr.items():
            for label, part in zip(labels, np.array_split(np.asarray(values, dtype=np.float64), len(labels))):
                scores[(method, label, float(snr))] = {"snr": part + 10, "delta_snr": part, "si_sdr": part + 10,
                                                       "delta_si_sdr": part}
    sets = [{"label": label, "device": "deck", "speed": 1.875, "digest": "0" * 64, "count": 0, "seconds": 2.0,
             "path": None} for label in labels]
    return EvaluationResult(list(delta_snr), SNRS, sets, scores, np.zeros(0), {}, {})


def test_evaluation_result_pairs_the_same_fragments_pooled_over_sets():
    rng = np.random.default_rng(1)
    base = {snr: rng.normal(2.0, 1.5, 12) for snr in SNRS}
    tuned = {snr: base[snr] + rng.normal(0.5, 0.2, 12) for snr in SNRS}
    result = result_from_scores({BASE_MODEL: base, FINE_TUNED: tuned}, labels=("deck@1.875", "deck@3.75"))
    pooled = result.paired(FINE_TUNED, BASE_MODEL, 10.0)
    reference = stats.ttest_rel(tuned[10.0], base[10.0]).confidence_interval(0.95)
    assert (pooled.ci_low, pooled.ci_high) == pytest.approx((reference.low, reference.high))
    first = result.paired(FINE_TUNED, BASE_MODEL, 16.0, label="deck@1.875")
    assert first.n == 6 and first.mean == pytest.approx(np.mean(tuned[16.0][:6] - base[16.0][:6]))
    rows = result.paired_table(FINE_TUNED, [BASE_MODEL, "no such rival"])
    assert {(r["set"], r["input_snr_db"]) for r in rows} == {(s, snr) for s in ("deck@1.875", "deck@3.75", POOLED)
                                                             for snr in SNRS}
    assert all(r["rival"] == BASE_MODEL for r in rows)


# ------------------------------------------------------------------------------------ the gate

def scores_with(gain: dict[float, tuple[float, float] | list[float]], base_mean: dict[float, float], n: int = 40,
                seed: int = 0, champion: dict[float, tuple[float, float]] | None = None) -> EvaluationResult:
    """Base model ΔSNR per SNR (spread 1.5 dB over fragments) and the fine-tuned model = base + a paired
    gain per SNR: (mean, spread) drawn at random, or the list of per-fragment gains; a champion likewise
    as base + (mean, spread)."""
    rng = np.random.default_rng(seed)
    base = {snr: rng.normal(base_mean[snr], 1.5, n) for snr in SNRS}
    methods = {NOISY_INPUT: {snr: np.zeros(n) for snr in SNRS}, BASE_MODEL: base}
    if champion:
        methods[CHAMPION_METHOD] = {snr: base[snr] + rng.normal(*champion[snr], n) for snr in SNRS}
    methods[FINE_TUNED] = {snr: base[snr] + (np.asarray(gain[snr]) if isinstance(gain[snr], list) else rng.normal(*gain[snr], n))
                           for snr in SNRS}
    return result_from_scores(methods)


def test_gate_promotes_a_clear_gain_and_says_by_how_much():
    result = scores_with({10.0: (1.2, 0.3), 16.0: (0.8, 0.3)}, {10.0: 5.0, 16.0: 2.0})
    promoted, reason = promotion_decision(result, SNRS, None)
    assert promoted, reason
    gain = result.paired(FINE_TUNED, BASE_MODEL, 10.0)
    assert f"the base model by {gain.interval_text()} at 10 dB input" in reason


def test_gate_refuses_a_model_that_harms_the_recording_even_when_it_beats_the_base():
    """The issue's unseen reel deck: the base makes 16 dB recordings worse, and so (less) does the fine-tuned."""
    result = scores_with({10.0: (0.5, 0.2), 16.0: (0.4, 0.2)}, {10.0: 1.3, 16.0: -2.5})
    assert result.paired(FINE_TUNED, BASE_MODEL, 16.0).lies_above(0.0)  # a resolved gain over the base ...
    own = result.summary(FINE_TUNED, 16.0)
    assert own.ci_high < 0  # ... by a model that still harms
    promoted, reason = promotion_decision(result, SNRS, None)
    assert not promoted
    assert f"may make recordings worse at 16 dB input: its own ΔSNR {own.interval_text()} does not lie above 0 dB" in reason
    assert "10 dB input" not in reason  # what passed is not listed as a failure


def test_gate_refuses_a_gain_it_cannot_resolve_and_names_rival_snr_and_interval():
    """+0.5 dB on average, but fragment to fragment the difference swings by ±2.5 dB over 6 fragments."""
    swings = [3.0, -2.0, 2.5, -1.5, 1.0, 0.0]
    result = scores_with({10.0: swings, 16.0: (1.5, 0.2)}, {10.0: 5.0, 16.0: 2.0}, n=6, seed=3)
    gain = result.paired(FINE_TUNED, BASE_MODEL, 10.0)
    assert gain.mean == pytest.approx(0.5) and gain.ci_low < 0 < gain.ci_high
    promoted, reason = promotion_decision(result, SNRS, None)
    assert not promoted
    assert reason == (f"does not beat the base model at 10 dB input: paired ΔSNR gain {gain.interval_text()} "
                      "does not lie above +0 dB")


def test_gate_refuses_what_loses_to_the_champion_though_it_beats_the_base():
    result = scores_with({10.0: (1.0, 0.3), 16.0: (1.0, 0.3)}, {10.0: 5.0, 16.0: 2.0},
                         champion={10.0: (2.0, 0.3), 16.0: (0.5, 0.3)})
    promoted, reason = promotion_decision(result, SNRS, 3)
    assert not promoted
    lost = result.paired(FINE_TUNED, CHAMPION_METHOD, 10.0)
    assert lost.ci_high < 0
    assert f"does not beat champion v3 at 10 dB input: paired ΔSNR gain {lost.interval_text()} (worse)" in reason
    assert "16 dB" not in reason and "base model" not in reason
    # The same scores with a champion it clearly beats: promoted, and both rivals are named.
    result = scores_with({10.0: (1.0, 0.3), 16.0: (1.0, 0.3)}, {10.0: 5.0, 16.0: 2.0},
                         champion={10.0: (0.2, 0.3), 16.0: (0.3, 0.3)})
    promoted, reason = promotion_decision(result, SNRS, 3)
    assert promoted and "champion v3 by" in reason and "the base model by" in reason


def test_gate_asks_the_interval_to_clear_the_recipes_min_gain():
    result = scores_with({10.0: (0.6, 0.2), 16.0: (0.6, 0.2)}, {10.0: 5.0, 16.0: 2.0})
    assert promotion_decision(result, SNRS, None, min_gain_db=0.0)[0]
    promoted, reason = promotion_decision(result, SNRS, None, min_gain_db=1.0)
    assert not promoted and reason.count("does not lie above +1 dB") == 2


def test_gate_never_counts_a_single_fragment():
    """One fragment has no interval (its zero width is not certainty)."""
    result = scores_with({10.0: (3.0, 0.1), 16.0: (3.0, 0.1)}, {10.0: 5.0, 16.0: 2.0}, n=1)
    promoted, reason = promotion_decision(result, SNRS, None)
    assert not promoted and "does not beat the base model at 10 dB input" in reason


def test_min_gain_db_is_a_recipe_key_checked_like_the_others():
    from workbench.errors import WorkbenchError

    assert evaluation_settings({}).min_gain_db == 0.0
    assert evaluation_settings({"evaluation": {"min_gain_db": 0.5}}).min_gain_db == 0.5
    for bad in (-1.0, "1", float("nan")):
        with pytest.raises(WorkbenchError, match=r"r\.toml: \[evaluation\] min_gain_db"):
            evaluation_settings({"source": "r.toml", "evaluation": {"min_gain_db": bad}})


# ------------------------------------------------------------------------------------ residual hum

def hum_family(seconds: float, fundamental: float, level: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return sum(level / k * np.sin(2 * np.pi * k * fundamental * t + rng.uniform(0, 6)) for k in range(1, 5))


def test_hum_residual_measures_what_is_left_at_the_mains_harmonics():
    rng = np.random.default_rng(0)
    hiss = 0.003 * rng.standard_normal((3, 2 * SR))
    hum = np.stack([hum_family(2.0, 60.0, 0.02, seed) for seed in range(3)])
    noise = hiss + hum
    kept = hum_residual(noise, noise, SR, 60.0)
    assert kept.total_db == pytest.approx(0.0, abs=1e-9) and kept.frequencies_hz == (60.0, 120.0, 180.0, 240.0)
    tenth = hum_residual(noise, hiss + 0.1 * hum, SR, 60.0)  # a tenth of the hum's amplitude: -20 dB of power
    assert tenth.total_db == pytest.approx(-20.0, abs=1.5)
    assert all(-21.5 < r < -17.0 for r in tenth.relative_db), tenth.relative_db
    # The hum's bands, not the hiss beside them: at 50 Hz there is only hiss and it is all left.
    assert hum_residual(noise, hiss + 0.1 * hum, SR, 50.0).total_db == pytest.approx(0.0, abs=1.0)
    assert hum_residual(noise, hiss, SR, 60.0).input_db[0] > hum_residual(noise, hiss, SR, 60.0).residual_db[0] + 20


# ------------------------------------------------------------------------------------ the report

def hum_fragments() -> FragmentSet:
    rng = np.random.default_rng(7)
    t = np.arange(3 * SR) / SR
    clean = np.stack([0.2 * np.sin(2 * np.pi * (330 + 40 * i) * t) for i in range(4)]).astype(np.float32)
    noise = np.stack([0.004 * rng.standard_normal(t.size) + hum_family(3.0, 60.0, 0.01, i) for i in range(4)])
    return FragmentSet("deck", 1.875, (10.0, 16.0), clean, noise.astype(np.float32), {"digest": "1" * 64, "sample_rate": SR})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    fragments = hum_fragments()
    methods = {NOISY_INPUT: noisy_input, "base model": lambda x: 0.8 * x, "fine-tuned": lambda x: 0.5 * x}
    result = evaluate_methods(fragments, methods, hum_hz={fragments.label: 60.0}, clip_seconds=2.0)
    files = write_report(tmp_path_factory.mktemp("report"), result, title="deck v1", lineage={},
                         paired=("fine-tuned", ["base model"]), min_gain_db=0.0,
                         clip_methods=["base model", "fine-tuned"])
    return result, files


def test_report_embeds_listening_clips_of_two_fragments(report):
    result, files = report
    page = files.html.read_text()
    clips = re.findall(r'<audio controls preload=none src="data:audio/flac;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(clips) == 2 * 4  # two fragments x (noisy, base model, fine-tuned, clean)
    decoded = [sf.read(io.BytesIO(base64.b64decode(clip))) for clip in clips]
    assert all(rate == SR and audio.shape == (2 * SR,) for audio, rate in decoded)
    noisy, base, tuned, clean = (audio for audio, _ in decoded[:4])
    # One gain for all versions of a fragment: the fine-tuned clip is the noisy one at half the level.
    assert np.allclose(tuned, 0.5 * noisy, atol=2e-4) and np.allclose(base, 0.8 * noisy, atol=2e-4)
    assert np.max(np.abs(noisy)) == pytest.approx(10 ** (-1 / 20), abs=1e-3)
    assert not np.allclose(clean, noisy, atol=1e-3)
    assert [(c["set"], c["index"]) for c in result.clips] == [("deck@1.875", 0), ("deck@1.875", 1)]
    data = json.loads(files.json.read_text())
    assert data["evaluation"]["clips"] == [{"set": "deck@1.875", "fragment": i, "input_snr_db": 10.0, "seconds": 2.0}
                                           for i in (0, 1)]


def test_report_shows_paired_intervals_and_residual_hum(report):
    result, files = report
    page = files.html.read_text()
    data = json.loads(files.json.read_text())
    for snr in SNRS:
        gain = result.paired("fine-tuned", "base model", snr)
        assert f"<td>[{gain.ci_low:+.2f}, {gain.ci_high:+.2f}]</td>" in page
        row = pooled_paired(data)["base model"][f"{snr:g}"]
        assert (row["mean"], row["ci_low"], row["n"]) == pytest.approx((gain.mean, gain.ci_low, 4))
    assert "Paired gains" in page and "paired t-test" in page
    # Scaling by 0.5 leaves the hum at -6 dB; the report shows it per model and harmonic.
    hum = {(r["method"], r["input_snr_db"]): r for r in data["evaluation"]["hum"]}
    assert hum[("fine-tuned", 10.0)]["total_db"] == pytest.approx(20 * np.log10(0.5), abs=0.2)
    assert hum[("base model", 16.0)]["total_db"] == pytest.approx(20 * np.log10(0.8), abs=0.2)
    assert "Mains hum left behind" in page and "240.0 Hz" in page and "<b>-6.0</b>" in page


# ------------------------------------------------------------------------------------ denoise --device

def test_denoise_device_without_a_champion_uses_the_base_model_and_says_so(tmp_path, cli, workspace):
    import torch

    from workbench import model_registry
    from workbench.audio.io import write_audio
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import TwoStageUNet, get_config

    torch.manual_seed(0)
    checkpoint = tmp_path / "general.safetensors"
    save_checkpoint(checkpoint, TwoStageUNet(get_config("tiny")), {"kind": "test general model"})
    version = model_registry.register_checkpoint(checkpoint, model_registry.GENERAL_MODEL, workspace=workspace)
    model_registry.set_alias(model_registry.GENERAL_MODEL, "base", version, workspace)
    source = tmp_path / "reel.wav"
    t = np.arange(22_050) / 44_100
    write_audio(source, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], 44_100)

    result = cli("denoise", "--device", "revox-a77", source, "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    [record] = result.json()
    said = [line for line in result.stderr.splitlines() if "no champion" in line]
    assert len(said) == 1 and "revox-a77" in said[0] and "tape-denoiser-general" in said[0], result.stderr
    assert record["model"]["note"] == said[0] and record["model"]["fallback_for_device"] == "revox-a77"
    assert record["model"]["uri"] == f"models:/{model_registry.GENERAL_MODEL}/{version}"
    sidecar = json.loads((tmp_path / "out" / "reel.denoised.wav.json").read_text())
    assert sidecar["model"]["note"] == said[0]
    # With a champion, no note: the champion is used.
    model_registry.register_checkpoint(checkpoint, "tape-denoiser-revox-a77", workspace=workspace)
    model_registry.set_alias("tape-denoiser-revox-a77", "champion", 1, workspace)
    result = cli("denoise", "--device", "revox-a77", source, "--out", tmp_path / "out2", "--json")
    assert result.code == 0 and "no champion" not in result.stderr and "note" not in result.json()[0]["model"]
