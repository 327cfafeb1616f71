"""PEAQ (workbench.evaluate.peaq): the recommendation's invariants, agreement with an independent
implementation on synthesised items, and what counts as bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.evaluate.peaq import MOV_NAMES, peaq, peaq_odg_rows

from peaq_items import items

SR = 48_000

# ODG of each item from P. Kabal's PQevalAudio (AFsp v9r0, built from its public source; default options:
# no MOV clipping, data boundaries, overlap delay) on the same samples written as 32-bit float WAV.
PQEVALAUDIO_ODG = {
    "tone_identical": 0.174,
    "tone_noise_60db": -2.501,
    "tone_noise_45db": -3.836,
    "music_identical": 0.175,
    "music_noise_60db": -2.204,
    "music_noise_16db": -3.913,
    "music_lowpass_7k": -1.698,
    "music_lowpass_12k": -0.768,
    "music_clipped": 0.104,
    "music_12bit": -2.268,
    "music_echo": -1.421,
    "music_gap_noise_60db": -2.176,
    "stereo_noise_right_30db": -0.336,
    "music_quiet_noise_20db": -2.462,
}
TOLERANCE_ODG = 0.1  # the conformance tolerance


@pytest.fixture(scope="module")
def synthesised():
    return items()


def _tone(seconds: float = 3.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return 0.3 * sum(np.sin(2 * np.pi * 330.0 * k * t) / k for k in range(1, 6))


def _with_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    return x + noise * np.sqrt(np.mean(x ** 2) / 10 ** (snr_db / 10))


def test_identical_signals_grade_near_zero(synthesised):
    for name in ("tone_identical", "music_identical"):
        ref, test = synthesised[name]
        result = peaq(ref, test, SR)
        # with no distortion every distortion MOV is 0 and the network gives its no-impairment grade,
        # +0.17 here (gstpeaq: +0.17 to +0.20); the ODG scale tops out at +0.22
        assert 0.1 < result.odg <= 0.22, (name, result.odg)
        for mov in ("WinModDiff1B", "ADBB", "EHSB", "AvgModDiff1B", "AvgModDiff2B", "RmsNoiseLoudB", "MFPDB",
                    "RelDistFramesB"):
            assert result.movs[mov] == pytest.approx(0.0, abs=1e-9), (name, mov, result.movs[mov])
        assert result.movs["BandwidthRefB"] == result.movs["BandwidthTestB"]


def test_white_noise_at_falling_snr_grades_monotonically_lower():
    x = _tone()
    snrs = [80, 70, 60, 50, 40, 30]
    results = [peaq(x, _with_noise(x, snr), SR) for snr in snrs]
    odgs = [r.odg for r in results]
    assert all(a > b for a, b in zip(odgs, odgs[1:])), dict(zip(snrs, odgs))
    dis = [r.distortion_index for r in results]
    assert all(a > b for a, b in zip(dis, dis[1:])), dict(zip(snrs, dis))
    assert odgs[0] > -2.5 and odgs[-1] < -3.5, dict(zip(snrs, odgs))
    # below 30 dB the grade sits at the bottom of the scale; it never rises again
    low = [peaq(x, _with_noise(x, snr), SR).odg for snr in (20, 10, 0)]
    assert all(a >= b - 1e-9 for a, b in zip([odgs[-1]] + low, low)), low
    assert all(np.isfinite(low)) and min(low) >= -3.98


@pytest.mark.parametrize("name", sorted(PQEVALAUDIO_ODG))
def test_agrees_with_pqevalaudio_on_synthesised_items(synthesised, name):
    ref, test = synthesised[name]
    ours = peaq(ref, test, SR).odg
    assert abs(ours - PQEVALAUDIO_ODG[name]) <= TOLERANCE_ODG, (name, ours, PQEVALAUDIO_ODG[name])


def test_result_carries_all_eleven_movs_and_a_bounded_grade(synthesised):
    ref, test = synthesised["music_noise_60db"]
    result = peaq(ref, test, SR)
    assert tuple(result.movs) == MOV_NAMES and len(MOV_NAMES) == 11
    assert all(np.isfinite(v) for v in result.movs.values())
    assert -3.98 <= result.odg <= 0.22 and result.frames > 100
    assert set(result.to_dict()) == {"odg", "distortion_index", "movs", "frames"}


def test_44k1_input_is_resampled_and_graded_like_48k():
    x48 = _tone(2.0, 48_000)
    x44 = _tone(2.0, 44_100)
    same = peaq(x44, x44, 44_100).odg
    assert 0.1 < same <= 0.22
    noisy48 = peaq(x48, _with_noise(x48, 55.0), 48_000).odg
    noisy44 = peaq(x44, _with_noise(x44, 55.0), 44_100).odg
    assert abs(noisy44 - noisy48) < 0.3, (noisy44, noisy48)


def test_every_valid_input_gets_a_number():
    x = _tone(2.0)
    silent_test = peaq(x, np.zeros_like(x), SR).odg  # the test lost everything
    short = peaq(x[:300], _with_noise(x[:300], 20.0), SR).odg  # shorter than one frame
    gap = x.copy()
    gap[24_000:72_000] = 0.0
    silent_stretch = peaq(gap, _with_noise(gap, 10.0), SR).odg
    clipped = peaq(x, np.clip(3.0 * x, -1.0, 1.0), SR).odg
    for value in (silent_test, short, silent_stretch, clipped):
        assert np.isfinite(value) and -3.98 <= value <= 0.22
    # PEAQ was not trained on a deleted signal; PQevalAudio grades this very pair −1.064
    assert abs(silent_test - (-1.064)) <= TOLERANCE_ODG, silent_test


def test_rows_helper_grades_each_row():
    x = _tone(1.5)
    rows = np.stack([x, x])
    odgs = peaq_odg_rows(rows, np.stack([x, _with_noise(x, 40.0)]), SR)
    assert odgs.shape == (2,) and odgs[0] > 0.1 and odgs[1] < -2.0


@pytest.mark.parametrize("reference, test, message", [
    (np.zeros(4800), np.zeros(4800), "reference is silent"),
    (np.ones(4800) * 0.1, np.ones(4700) * 0.1, "differ in shape"),
    (np.ones((3, 4800)) * 0.1, np.ones((3, 4800)) * 0.1, "mono or stereo"),
    (np.ones((1, 4800)) * 0.1, np.ones((2, 4800)) * 0.1, "differ in shape"),
    (np.full(4800, np.nan), np.zeros(4800), "non-finite"),
    (np.zeros(0), np.zeros(0), "no samples"),
])
def test_bad_input_is_one_clear_error(reference, test, message):
    with pytest.raises(WorkbenchError, match=message) as caught:
        peaq(reference, test, SR)
    assert "\n" not in str(caught.value)


# --- `workbench evaluate` ---------------------------------------------------------------------------------

def _write(path, samples, sr=44_100, subtype="PCM_24"):
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(samples, dtype=np.float32).T, sr, subtype=subtype)
    return path


def test_evaluate_scores_a_file_pair_as_json(cli, tmp_path):
    x = _tone(2.0, 44_100)
    ref = _write(tmp_path / "clean.wav", x)
    test = _write(tmp_path / "noisy.wav", _with_noise(x, 20.0))
    result = cli("evaluate", ref, test, "--json")
    assert result.code == 0, result.stderr
    [row] = result.json()
    assert row["snr_db"] == pytest.approx(20.0, abs=0.3) and row["si_sdr_db"] == pytest.approx(20.0, abs=0.3)
    assert -3.98 <= row["peaq_odg"] < -2.0 and set(row["peaq_movs"]) == set(MOV_NAMES)
    assert row["sample_rate"] == 44_100 and row["channels"] == 1 and row["seconds"] == pytest.approx(2.0)


def test_evaluate_pairs_folders_by_relative_path_and_denoise_names(cli, tmp_path):
    x = _tone(1.5, 44_100)
    stereo = np.stack([x, 0.5 * x])
    _write(tmp_path / "clean" / "a.wav", x)
    _write(tmp_path / "clean" / "sub" / "b.flac", stereo, subtype="PCM_16")
    _write(tmp_path / "out" / "a.denoised.wav", x)  # identical: the best grade
    _write(tmp_path / "out" / "sub" / "b.wav", _with_noise(stereo, 30.0))
    result = cli("evaluate", tmp_path / "clean", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    rows = {Path(r["test"]).name: r for r in result.json()}
    assert set(rows) == {"a.denoised.wav", "b.wav"}
    assert rows["a.denoised.wav"]["peaq_odg"] > 0.1 and rows["b.wav"]["peaq_odg"] < rows["a.denoised.wav"]["peaq_odg"]
    assert rows["b.wav"]["channels"] == 2
    table = cli("evaluate", tmp_path / "clean", tmp_path / "out", "--no-peaq")
    assert table.code == 0 and "b.wav" in table.stdout and "PEAQ" not in table.stdout


@pytest.mark.parametrize("case", ["length", "rate", "channels", "silent reference", "silent test", "unreadable",
                                  "missing counterpart"])
def test_evaluate_bad_input_is_one_line_exit_2(cli, tmp_path, case):
    x = _tone(1.0, 44_100)
    ref = _write(tmp_path / "ref" / "take.wav", x)
    test_path = tmp_path / "test" / "take.wav"
    if case == "length":
        _write(test_path, x[:-10])
    elif case == "rate":
        _write(test_path, _tone(1.0, 48_000), sr=48_000)
    elif case == "channels":
        _write(test_path, np.stack([x, x]))
    elif case == "silent reference":
        _write(ref, np.zeros_like(x))
        _write(test_path, x)
    elif case == "silent test":
        _write(test_path, np.zeros_like(x))
    elif case == "unreadable":
        test_path.parent.mkdir(parents=True)
        test_path.write_bytes(b"RIFF not really a wave file")
    elif case == "missing counterpart":
        _write(tmp_path / "test" / "other.wav", x)
    result = cli("evaluate", tmp_path / "ref", tmp_path / "test")
    assert result.code == 2, (case, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "take" in lines[0], lines[0]
    assert result.stdout == ""


# --- ΔPEAQ in the evaluation, its report, the recipe switch and the registry view ---------------------------

def _fragment_set(speed: float, seed: int):
    from workbench.evaluate.fragments import FragmentSet

    rng = np.random.default_rng(seed)
    t = np.arange(44_100) / 44_100
    clean = np.stack([0.2 * sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 5))
                      for f in (220.0, 277.0, 330.0)]).astype(np.float32)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    return FragmentSet("revox-a77", speed, (10.0, 16.0), clean, noise, {"digest": f"{seed:064x}", "sample_rate": 44_100})


@pytest.fixture(scope="module")
def peaq_evaluation():
    from workbench.evaluate.baselines import NOISY_INPUT, noisy_input
    from workbench.evaluate.evaluate import PerSet, evaluate_methods

    sets = [_fragment_set(7.5, 1), _fragment_set(3.75, 2)]
    oracle = PerSet(lambda fragment_set: (lambda noisy: fragment_set.clean.copy()))  # gives back the clean music
    methods = {NOISY_INPUT: noisy_input, "half the noise": PerSet(
        lambda fs: (lambda noisy: fs.clean + 0.5 * (noisy - fs.clean))), "oracle": oracle}
    return evaluate_methods(sets, methods, batch_size=3, peaq=True), sets


def test_evaluation_scores_delta_peaq_per_fragment(peaq_evaluation):
    from workbench.evaluate.baselines import NOISY_INPUT
    from workbench.evaluate.peaq import peaq_odg_rows

    result, sets = peaq_evaluation
    assert result.metrics[-2:] == ("peaq_odg", "delta_peaq")
    for snr in (10.0, 16.0):
        noisy_delta = result.values(NOISY_INPUT, snr, "delta_peaq")
        assert noisy_delta.shape == (6,) and np.all(noisy_delta == 0.0)
        expected_input = peaq_odg_rows(sets[0].clean, sets[0].noisy(snr), 44_100)
        assert np.allclose(result.values(NOISY_INPUT, snr, "peaq_odg", sets[0].label), expected_input)
        oracle = result.values("oracle", snr, "peaq_odg")
        assert np.all((oracle > 0.1) & (oracle <= 0.22))
        assert result.summary("oracle", snr, "delta_peaq").mean > result.summary("half the noise", snr, "delta_peaq").mean > 0
        summary = result.summary("oracle", snr, "delta_peaq")
        assert summary.n == 6 and summary.ci_low <= summary.mean <= summary.ci_high
    rows = result.to_dict()
    assert all("delta_peaq" in row and "peaq_odg" in row for row in rows["summary"])
    assert all(len(row["delta_peaq"]) == 3 for row in rows["per_fragment"])


def test_report_shows_delta_peaq_and_registry_reads_it(peaq_evaluation, tmp_path):
    import json

    from workbench.evaluate.report import write_report
    from workbench.model_registry import delta_peaq_tag, delta_snr_tag
    from workbench.model_registry.browse import _delta_tags, _report_summary

    result, _ = peaq_evaluation
    files = write_report(tmp_path, result, title="t", lineage={})
    page = files.html.read_text()
    assert "ΔPEAQ (ODG)" in page and 'alt="mean ΔPEAQ per method"' in page
    report = json.loads(files.json.read_text())
    table = _report_summary(report)["table"]
    oracle = [row for row in table if row["method"] == "oracle"]
    assert len(oracle) == 2 and all(row["delta_peaq"] > 0 and len(row["delta_peaq_ci"]) == 2 for row in oracle)
    tags = {delta_snr_tag(10.0): "1.5", delta_peaq_tag(10.0): "0.8", delta_peaq_tag(16.0): "1.1"}
    assert delta_peaq_tag(10.0) == "delta_peaq_10db"
    assert _delta_tags(tags) == {"10": 1.5} and _delta_tags(tags, "delta_peaq_") == {"10": 0.8, "16": 1.1}


def test_recipe_switch_turns_peaq_off_and_is_validated():
    from workbench.evaluate.fragments import evaluation_settings

    assert evaluation_settings({"evaluation": {}}).peaq is True
    assert evaluation_settings({"evaluation": {"peaq": False}}).peaq is False
    with pytest.raises(WorkbenchError, match="peaq must be true or false"):
        evaluation_settings({"source": "r.toml", "evaluation": {"peaq": "yes"}})


def test_evaluation_without_peaq_has_no_peaq_metrics():
    from workbench.evaluate.baselines import NOISY_INPUT, noisy_input
    from workbench.evaluate.evaluate import METRICS, evaluate_methods

    result = evaluate_methods(_fragment_set(7.5, 3), {NOISY_INPUT: noisy_input})
    assert result.metrics == METRICS and "delta_peaq" not in result.to_dict()["summary"][0]
