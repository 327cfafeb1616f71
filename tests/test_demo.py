"""The demo pipeline end to end at reduced size, run as `workbench demo --json` itself: every stage's result is
checked, then a rerun through the library (`run_demo`, what the command calls) reuses them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import soundfile as sf

from conftest import tiny_finetune_recipe
from workbench import model_registry
from workbench.demo import DemoSettings, fine_tuned_device, general_model_devices, run_demo
from workbench.noise.library import NoiseLibrary
from workbench.workspace import Workspace

# The quickstart recipe shrunk to seconds: the point is that every stage runs and hands over, not quality.


@pytest.fixture
def demo_run(tmp_path, monkeypatch, cli):
    monkeypatch.delenv("WORKBENCH_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tmp_path / "demo-test.toml"
    recipe.write_text(tiny_finetune_recipe("demo-test", trials=2, steps=4, validate_every=2, segment_seconds=0.5))
    settings = DemoSettings(folder=tmp_path / "demo", scale="small", recipe=str(recipe))
    shown = cli("demo", "--folder", settings.folder, "--scale", "small", "--recipe", recipe, "--json")
    assert shown.code == 0, shown.stderr[-3000:]
    printed = shown.json()
    stages = [SimpleNamespace(**stage) for stage in printed["stages"]]
    # The timings come from the library's run: each stage timed, the total their sum.
    assert all(stage.seconds >= 0 for stage in stages)
    assert printed["seconds"] == pytest.approx(sum(stage.seconds for stage in stages), abs=0.1 * len(stages))
    return settings, stages


@pytest.mark.slow  # end to end: the whole demo through the CLI, then again
def test_demo_runs_every_stage_and_a_rerun_reuses_them(demo_run, cli):
    settings, results = demo_run
    assert [r.name for r in results] == ["archive", "capture-noise", "corpus", "general", "finetune", "denoise",
                                         "registry"]
    workspace = Workspace(settings.folder.resolve())
    manifest = results[0].data
    device = fine_tuned_device(manifest)

    library = NoiseLibrary(workspace)
    for tape in manifest["blank_tapes"]:
        for split in ("train", "validation", "test"):
            assert library.snippets(device=tape["device"], speed=tape["speed_ips"], split=split), (tape, split)

    assert model_registry.latest_version("tape-denoiser-general", workspace) == 1
    assert model_registry.get_alias_version("tape-denoiser-general", "base", workspace) == 1
    # The boxed general model heard every archive machine's noise but the one the demo fine-tunes.
    heard = general_model_devices(manifest)
    assert device not in heard and set(heard) | {device} == {t["device"] for t in manifest["blank_tapes"]}
    assert results[3].data["card"]["data"]["devices"] == heard and results[3].data["version"] == 1
    name = model_registry.device_model_name(device)
    finetune = results[4].data
    assert model_registry.latest_version(name, workspace) == finetune["version"]
    champion = model_registry.get_alias_version(name, "champion", workspace)
    assert champion == (finetune["version"] if finetune["promoted"] else None)
    report = json.loads(open(finetune["report_json"]).read())
    assert report and (settings.folder / "registry").exists()
    # The demo shows the fine-tuned model's paired gain over the base: per fragment, with its interval.
    gains = finetune["paired_gain_vs_base_db"]
    assert set(gains) == {"10", "16"}
    for snr, gain in gains.items():
        rows = {r["method"]: r["delta_snr"] for r in report["evaluation"]["per_fragment"] if r["input_snr_db"] == float(snr)}
        assert abs(gain["mean"] - (sum(rows["fine-tuned"]) - sum(rows["base model"])) / len(rows["fine-tuned"])) < 1e-3
        assert gain["ci_low"] <= gain["mean"] <= gain["ci_high"] and f"{gain['mean']:+.2f}" in results[4].summary
    assert str(finetune["report_html"]).endswith(".html")

    transfer = settings.folder / "archive" / manifest["transfers"][0]["path"]
    restored = results[5].data["records"][0]["output"]["path"]
    # Restored by what `denoise --device` picks: the champion, else the general model @base (never a refused version).
    expected = name if champion else "tape-denoiser-general"
    assert results[5].data["model_uri"].startswith(f"models:/{expected}/"), results[5].data["model_uri"]
    source_info, output_info = sf.info(str(transfer)), sf.info(restored)
    assert (output_info.samplerate, output_info.channels, output_info.frames, output_info.subtype) == \
        (source_info.samplerate, source_info.channels, source_info.frames, source_info.subtype)

    listed = {m["name"] for m in results[6].data["models"]}
    assert listed == {"tape-denoiser-general", name}

    # A rerun for people: a heading and a summary per stage on stderr, the tables on stdout.
    from workbench.demo import demo_stages  # to hoist after the issue-13 merge (apart from slice A's edit up there)

    shown = cli("demo", "--folder", settings.folder, "--scale", "small", "--recipe", settings.recipe)
    assert shown.code == 0, shown.stderr[-3000:]
    assert all(stage.title in shown.stderr for stage in demo_stages(workspace, settings))
    assert shown.stderr.count("(reused)") == 6
    assert "Registered models" in shown.stdout and "Finished in" in shown.stdout

    again = run_demo(settings)
    assert [r.reused for r in again[:-1]] == [True] * 6
    assert model_registry.latest_version(name, workspace) == finetune["version"]
