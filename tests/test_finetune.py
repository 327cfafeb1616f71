"""`workbench finetune`: Optuna study, pruning, resumption after a kill, evaluation, registry gate, browsing.

Everything is real: the tiny synthetic archive (noise library + corpus), a tiny two-stage U-Net trained
for a few steps, the workspace's SQLite Optuna and MLflow stores, a killed `workbench` process.
One module-scoped archive carries the scenarios in order: a study killed mid-trial and resumed (v1, from a
random base: registered, but the gate refuses it because it makes recordings worse), a study built to
prune, and a do-nothing schedule the gate must refuse against the base and a champion set by hand.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from conftest import CliResult, archive_with_random_base, tiny_finetune_recipe
from workbench.workspace import Workspace

DEVICE = "uher-4000-l"
MODEL = f"tape-denoiser-{DEVICE}"
STUDY = f"finetune-{DEVICE}"


def recipe(ws: Workspace, name: str, search: str | None = None, *, validation: tuple[int, float] = (2, 0.25),
           **finetune) -> str:
    """Write a variant of the test recipe into the workspace's recipes/ and return its name; `validation`
    is (mixtures, seconds)."""
    text = tiny_finetune_recipe(name, trials=3, steps=3, validate_every=1, segment_seconds=0.25,
                                validation_mixtures=validation[0], validation_seconds=validation[1])
    if search is not None:
        head, _, tail = text.partition("[finetune.search]")
        text = head + "[finetune.search]\n" + search + "\n[finetune.pruner]" + tail.partition("[finetune.pruner]")[2]
    head, _, rest = text.partition("[finetune]\n")
    body, _, tail = rest.partition("[finetune.search]")
    for key, value in finetune.items():  # [finetune] keys: replace the line, or add it
        line = f"{key} = {json.dumps(value)}"
        body = re.sub(rf"(?m)^{key} = .*$", line, body) if re.search(rf"(?m)^{key} = ", body) else f"{line}\n{body}"
    text = f"{head}[finetune]\n{body}[finetune.search]{tail}"
    (ws.recipes_dir).mkdir(exist_ok=True)
    (ws.recipes_dir / f"{name}.toml").write_text(text)
    return name


@pytest.fixture(scope="module")
def archive(tiny_archive_template, tmp_path_factory):
    """A private tiny archive with a random tiny network registered as the general model (@base)."""
    with archive_with_random_base(tiny_archive_template, tmp_path_factory, "finetune") as ws:
        # `resumed` kills the worker between its second trial's first saved step and that trial's end. Three
        # tiny steps came to take less than its 0.5 s poll once training got faster (issue 14), and the kill
        # missed; a validation of 4 × 3 s after every step keeps the window open whatever the step costs.
        recipe(ws, "ft-test", validation=(4, 3.0), hum_template=True)
        yield ws


@functools.lru_cache
def study_of(ws: Workspace, recipe_name: str = "ft-test", storage: str | None = None) -> str:
    """The study a `finetune --device DEVICE --recipe recipe_name` run uses: STUDY plus its identity digest."""
    from workbench.finetune import make_plan

    name = make_plan(ws, DEVICE, recipe=recipe_name, storage=storage).study_name
    assert name.startswith(STUDY + "-"), name
    return name


def optuna_trials(ws: Workspace, study: str | None = None, storage: str | None = None) -> list:
    from workbench.train.tuning import open_storage  # safe beside a worker creating the store

    study = study or study_of(ws)
    loaded = optuna.load_study(study_name=study, storage=open_storage(storage or ws.optuna_storage()))
    return loaded.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def resumed(archive, cli_module):
    """A `workbench finetune` process killed in the middle of its second trial, then run again to the end."""
    ws = archive
    env = {**os.environ, "WORKBENCH_HOME": str(ws.root), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    worker = subprocess.Popen([sys.executable, "-m", "workbench", "finetune", "--device", DEVICE, "--recipe", "ft-test",
                               "--trials", "2", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    deadline = time.monotonic() + 600
    killed_during = None
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
            if not ws.optuna_db.is_file():
                continue
            try:
                trials = optuna_trials(ws)
            except KeyError:  # the study is not created yet
                continue
            complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            # Kill once a trial is done and the next one has saved at least one training step.
            if complete and running and (Path(running[0].user_attrs.get("run_dir", "/nonexistent")) / "state.json").is_file():
                os.killpg(worker.pid, signal.SIGKILL)
                killed_during = running[0].number
                break
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert killed_during is not None, f"the worker ended before it could be killed: {worker.stderr.read().decode()[-2000:]}"
    before = {t.number: (t.state, t.datetime_complete, t.params) for t in optuna_trials(ws)}
    result = cli_module("finetune", "--device", DEVICE, "--recipe", "ft-test", "--trials", "2", "--json")
    assert result.code == 0, result.stderr
    return {"killed": killed_during, "before": before, "result": result.json(), "stdout": result.stdout}


@pytest.fixture(scope="module")
def cli_module(archive):
    """The in-process CLI runner for module-scoped scenarios (the `cli` fixture is per test)."""
    import contextlib
    import io


    from workbench.cli import main

    def run(*args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WORKBENCH_HOME", str(archive.root))
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            # rich writes to whatever sys.stdout / sys.stderr are at print time
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


# ------------------------------------------------------------------------------------- study and resume

@pytest.mark.slow  # end to end: a finetune process killed, then a whole study run (the `resumed` fixture)
def test_killed_study_resumes_without_redoing_finished_trials(archive, resumed):
    trials = optuna_trials(archive)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 2
    # Trials finished before the kill are untouched: same state, same completion time, same parameters.
    for number, (state, completed, params) in resumed["before"].items():
        if state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            assert trials[number].state == state
            assert trials[number].datetime_complete == completed
            assert trials[number].params == params
    # The trial the kill interrupted is marked failed and retried once with the same parameters, in the
    # same training folder (so it continues from its saved steps).
    killed = trials[resumed["killed"]]
    assert killed.state == optuna.trial.TrialState.FAIL
    assert killed.user_attrs["interrupted"] == "process died"
    retries = [t for t in trials if t.user_attrs.get("retry_of") == resumed["killed"]]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert retries[0].user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    # ... and the retry trained only the steps the killed process had not saved.
    from workbench import tracking

    history = tracking.client(archive).get_metric_history(retries[0].user_attrs["mlflow_run_id"], "train_loss")
    assert history and min(m.step for m in history) > 1
    assert resumed["result"]["trials"].get("COMPLETE", 0) + resumed["result"]["trials"].get("PRUNED", 0) == 2


@pytest.mark.slow  # end to end: a finetune process killed, then a whole study run (the `resumed` fixture)
def test_each_trial_is_a_nested_mlflow_run_under_the_study_run(archive, resumed):
    from workbench import tracking

    client = tracking.client(archive)
    study = optuna.load_study(study_name=study_of(archive), storage=archive.optuna_storage())
    parent = study.user_attrs["mlflow_run_id"]
    experiment = client.get_experiment_by_name(f"finetune-{DEVICE}")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    trial_runs = {r.data.tags["optuna.trial"] for r in children if r.data.tags.get("workbench.kind") == "finetune-trial"}
    assert {str(t.number) for t in study.trials} <= trial_runs
    assert any(r.data.tags.get("workbench.kind") == "finetune-model" for r in children)
    # Each trial run holds its validation ΔSNR curve and its parameters.
    some = next(r for r in children if r.data.tags.get("optuna.state") == "COMPLETE")
    assert "val_delta_snr_db" in some.data.metrics and "schedule.learning_rate" in some.data.params
    assert some.data.tags["training.autocast"] == "none"  # tiny trains in float32 whatever the CPU


# ------------------------------------------------------------------------------------- registration

@pytest.mark.slow  # end to end: a finetune process killed, then a whole study run (the `resumed` fixture)
def test_finetune_registers_a_version_with_tags_description_and_report_but_not_a_harmful_one(archive, resumed):
    import mlflow

    data = resumed["result"]
    assert data["model_name"] == MODEL and data["version"] == 1 and data["registered_now"]
    # A few steps from a random network leave a model far worse than the noisy input: the gate says so.
    own = data["summary"]["fine-tuned"]["16"]
    assert own["ci_high"] < 0 and not data["promoted"]
    assert (f"may make recordings worse at 16 dB input: its own ΔSNR {own['mean']:+.2f} dB "
            f"[{own['ci_low']:+.2f}, {own['ci_high']:+.2f}] does not lie above 0 dB") in data["reason"]
    gain = data["paired"]["base model"]["10"]
    assert gain["n"] == 2 and gain["ci_low"] <= gain["mean"] <= gain["ci_high"] and data["min_gain_db"] == 0.0
    client = mlflow.MlflowClient(tracking_uri=archive.tracking_uri(), registry_uri=archive.tracking_uri())
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = client.get_model_version(MODEL, "1")
    tags = version.tags
    for key in ("device", "speeds", "base_model", "base_version", "study", "delta_snr_10db", "delta_snr_16db",
                "noise_minutes", "promoted", "gate", "gain_vs_base_10db", "gain_vs_base_16db", "ci_delta_snr_16db",
                "min_gain_db"):
        assert key in tags, key
    assert tags["device"] == DEVICE and tags["speeds"] == "3.75" and tags["study"] == study_of(archive)
    assert tags["base_model"] == "tape-denoiser-general" and tags["base_version"] == "1"
    assert float(tags["delta_snr_10db"]) == pytest.approx(data["summary"]["fine-tuned"]["10"]["mean"], abs=1e-3)
    assert float(tags["noise_minutes"]) > 0 and tags["promoted"] == "false"
    assert tags["gain_vs_base_10db"] == f"{gain['mean']:+.3f} [{gain['ci_low']:+.3f}, {gain['ci_high']:+.3f}] n=2"
    assert tags["gate"].startswith("not promoted: it may make recordings worse")
    # The machine's hum template, learnt from its TRAIN noise, travels in the version's checkpoint.
    assert tags["hum_template"] == data["hum_template"] and " Hz hum, harmonics 1" in tags["hum_template"]
    from workbench.model.checkpoint import load_checkpoint
    from workbench.model_registry import fetch_checkpoint, model_uri

    device_model, info = load_checkpoint(fetch_checkpoint(model_uri(MODEL, version=1), archive)[0])
    assert device_model.hum_template is not None and device_model.hum_template.summary() == tags["hum_template"]
    assert info["hum_template"]["harmonics"][0] == 1
    # The trials trained and validated on the machine's noise with that hum cancelled (copies; the library's
    # snippets are untouched): the copies keep the hiss and lose the hum lines.
    from workbench.audio.io import read_audio
    from workbench.evaluate.metrics import hum_residual
    from workbench.noise.library import NoiseLibrary

    copies = sorted((archive.mixtures_dir / "hum-cancelled").rglob("*.wav"))
    snippets = {s.sha256: s for s in NoiseLibrary(archive).snippets(device=DEVICE)}
    assert copies and {c.stem for c in copies} <= set(snippets)
    raw = snippets[copies[0].stem].load()
    cancelled = read_audio(copies[0])[0][0]
    lines = hum_residual(raw, cancelled, 44100, info["hum_template"]["fundamental_hz"], harmonics=1)
    assert lines.relative_db[0] < -10.0 and 0.5 < np.std(cancelled) / np.std(raw) <= 1.0
    assert DEVICE in version.description and "ΔSNR" in version.description and "paired gain" in version.description
    assert client.get_registered_model(MODEL).aliases == {}
    # The report is in the version's run, downloadable with the MLflow client, and on disk.
    downloaded = Path(client.download_artifacts(version.run_id, "report/report.html", str(archive.root / "dl")))
    page = downloaded.read_text()
    assert "spectral gating" in page and "base model" in page and "Optuna study" in page
    assert "Paired gains" in page and page.count("data:audio/flac;base64,") == 2 * 4  # noisy, base, fine-tuned, clean
    report = json.loads(Path(client.download_artifacts(version.run_id, "report/report.json", str(archive.root / "dl"))).read_text())
    methods = {row["method"] for row in report["evaluation"]["summary"]}
    assert methods == {"noisy input", "base model", "fine-tuned", "spectral gating"}  # no champion yet
    # ΔPEAQ (issue 16) beside ΔSNR: in the report's rows, the version's tags and its description
    peaq_rows = {r["input_snr_db"]: r["delta_peaq"]["mean"] for r in report["evaluation"]["summary"] if r["method"] == "fine-tuned"}
    assert float(tags["delta_peaq_10db"]) == pytest.approx(peaq_rows[10.0], abs=1e-3) and "delta_peaq_16db" in tags
    assert "ΔPEAQ" in version.description
    assert report["lineage"]["noise_snippets"]["test"]["sha256"]
    assert report["lineage"]["base_model"]["uri"] == "models:/tape-denoiser-general/1"
    assert [row["rival"] for row in report["paired"]["rows"]] == ["base model", "base model"]
    assert Path(data["report_html"]).is_file() and Path(data["report_html"]).read_text() == page


@pytest.mark.slow  # end to end: a finetune process killed, then a whole study run (the `resumed` fixture)
def test_device_model_loads_with_pyfunc_and_holds_safetensors_weights(archive, resumed):
    import mlflow

    mlflow.set_tracking_uri(archive.tracking_uri())
    mlflow.set_registry_uri(archive.tracking_uri())
    uri = f"models:/{MODEL}/1"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(archive.root / "champion")))
    files = [p.name for p in local.rglob("*") if p.is_file()]
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".pkl", ".pickle", ".pt", ".pth")) for name in files), files
    waveform = (0.1 * np.random.default_rng(0).standard_normal(22050)).astype(np.float32)
    restored = mlflow.pyfunc.load_model(uri).predict(waveform)
    assert restored.shape == waveform.shape and np.all(np.isfinite(restored))
    assert not np.allclose(restored, waveform)


@pytest.mark.slow  # end to end: a finetune process killed, then a whole study run (the `resumed` fixture)
def test_models_list_and_show(archive, resumed, cli_module):
    listed = cli_module("models", "list", "--json")
    assert listed.code == 0, listed.stderr
    by_name = {m["name"]: m for m in listed.json()}
    assert by_name[MODEL]["aliases"] == {} and by_name[MODEL]["versions"] >= 1
    assert set(by_name[MODEL]["delta_snr_db"]) == {"10", "16"}
    assert "tape-denoiser-general" in by_name
    shown = cli_module("models", "show", DEVICE, "--json")
    assert shown.code == 0, shown.stderr
    data = shown.json()
    assert data["champion"] is None and data["report_version"] == 1 and Path(data["report_path"]).is_file()
    assert {row["method"] for row in data["report"]["table"]} >= {"fine-tuned", "base model", "spectral gating"}
    assert all("delta_peaq" in row for row in data["report"]["table"])
    assert set(data["versions"][0]["delta_peaq"]) == {"10", "16"}
    # The paired gain over the base model: in the report's summary and in the version's tags.
    gain = data["report"]["paired"]["base model"]["10"]
    assert gain["n"] == 2 and gain["ci_low"] <= gain["mean"] <= gain["ci_high"]
    assert data["versions"][0]["paired_gain_db"]["gain_vs_base_10db"].startswith(f"{gain['mean']:+.3f} [")
    table = cli_module("models", "show", DEVICE)
    said = " ".join(table.stdout.split())
    assert "full report:" in said and "fine-tuned" in said and "paired gain" in said and "ΔPEAQ" in said
    assert f"{gain['mean']:+.2f} [{gain['ci_low']:+.2f}, {gain['ci_high']:+.2f}]" in said
    assert " Hz hum, harmonics 1" in data["versions"][0]["hum_template"]
    assert f"version 1: hum template (cancelled before the network): {data['versions'][0]['hum_template']}" in said


# ------------------------------------------------------------------------------------- pruning and the gate

@pytest.mark.slow  # end to end: a finetune process killed, then a whole study run (the `resumed` fixture)
def test_a_wild_schedule_is_pruned_and_a_do_nothing_model_is_registered_but_not_promoted(archive, resumed, cli_module,
                                                                                          tmp_path):
    """A study in a journal file with two enqueued schedules: one whose learning rate is too small to move
    any weight (it gives the base model back), then one so large that the first step wrecks the network.
    The median pruner stops the second at once; the first is the best trial, registered, but the gate
    refuses it: against the base it gains exactly nothing (an interval of zero width at 0 is no gain), and
    the champion (version 1, trained from this same base and made champion by hand, as an archivist may
    in MLflow) is a rival it must beat too."""
    from workbench import model_registry, tracking
    from workbench.train.tuning import open_storage

    model_registry.set_alias(MODEL, "champion", 1, archive)
    champion_before = model_registry.get_alias_version(MODEL, "champion", archive)
    name = recipe(archive, "ft-gate", search=(
        '"schedule.learning_rate" = { type = "float", low = 1e-12, high = 1.0, log = true }\n'
        '"schedule.steps" = { type = "int", low = 1, high = 3 }'), trials=2)
    journal = f"journal:{tmp_path / 'study.journal'}"
    study = optuna.create_study(study_name=study_of(archive, name, journal), storage=open_storage(journal),
                                direction="maximize")
    study.enqueue_trial({"schedule.learning_rate": 1e-12, "schedule.steps": 2})
    study.enqueue_trial({"schedule.learning_rate": 0.5, "schedule.steps": 3})
    result = cli_module("finetune", "--device", DEVICE, "--recipe", name, "--storage", journal)
    assert result.code == 0, result.stderr

    trials = optuna_trials(archive, study_of(archive, name, journal), journal)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert max(trials[1].intermediate_values) < 3  # stopped before its last step

    said = " ".join(result.stdout.split())  # rich wraps lines at the terminal width
    assert "registered, not promoted" in said and f"does not beat champion v{champion_before}" in said
    # The same network give or take a 1e-12 step: a gain of zero, its interval about zero too.
    assert re.search(r"does not beat the base model at 10 dB input: paired ΔSNR gain [+-]0\.00 dB "
                     r"\[[+-]0\.00, [+-]0\.00\]", said), said
    newest = model_registry.latest_version(MODEL, archive)
    assert newest > champion_before
    assert tracking.client(archive).get_model_version(MODEL, str(newest)).tags["promoted"] == "false"
    assert model_registry.get_alias_version(MODEL, "champion", archive) == champion_before
    report = json.loads((archive.reports_dir / DEVICE / f"v{newest}" / "report.json").read_text())
    assert report["decision"]["promoted"] is False
    assert {row["method"] for row in report["evaluation"]["summary"]} >= {"champion", "base model", "fine-tuned"}
    assert report["study"]["counts"] == {"COMPLETE": 1, "PRUNED": 1}


# ------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def archive_with_untestable_device(archive):
    """technics-tr575-b gets blank tape that all goes to the train split: it has no test noise."""
    from workbench.devices import get_device
    from workbench.noise.ingest import capture_noise
    from workbench.synth.tape_noise import render_blank_tape

    tape = archive.root.parent / "tr575b.wav"
    render_blank_tape(get_device(archive, "technics-tr575-b"), 1.875, 4.0, tape, seed=5, defects=False)
    capture_noise(archive, [tape], "technics-tr575-b", 1.875, snippet_seconds=1.0, split=(100.0, 0.0, 0.0))
    return archive


@pytest.mark.parametrize("args, message", [
    (("--device", "no-such-machine"), "no-such-machine"),
    (("--device", "technics-tr575-b"), "no test noise"),
    (("--device", DEVICE, "--storage", "sqlite:////nonexistent-folder/optuna.db"), "cannot open Optuna storage"),
    (("--device", DEVICE, "--storage", "postgresql://optuna@127.0.0.1:9/optuna"), "cannot open Optuna storage"),
    (("--device", DEVICE, "--speed", "15"), "no speed 15"),
])
def test_bad_input_gives_one_line_and_changes_nothing(archive_with_untestable_device, cli_module, args, message):
    from workbench import model_registry

    ws = archive_with_untestable_device
    versions_before = model_registry.latest_version(MODEL, ws)
    result = cli_module("finetune", *args, "--recipe", "ft-test")
    assert result.code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert model_registry.latest_version(MODEL, ws) == versions_before


def test_a_storage_that_is_not_a_database_is_refused(archive, cli_module, tmp_path):
    bogus = tmp_path / "not-a-database.db"
    bogus.write_text("this is a text file, not SQLite\n" * 100)
    result = cli_module("finetune", "--device", DEVICE, "--recipe", "ft-test", "--storage", f"sqlite:///{bogus}")
    assert result.code == 2 and "cannot open Optuna storage" in result.stderr


def test_search_space_errors_name_the_key(archive, cli_module):
    name = recipe(archive, "ft-bad", search='"schedule.nonsense" = { type = "float", low = 1, high = 2 }')
    result = cli_module("finetune", "--device", DEVICE, "--recipe", name)
    assert result.code == 2 and "schedule.nonsense" in result.stderr and "ft-bad.toml" in result.stderr


def test_steps_replace_the_recipes_and_make_a_study_of_their_own(archive):
    from workbench.finetune import make_plan

    as_written = make_plan(archive, DEVICE, recipe="ft-test")
    shorter = make_plan(archive, DEVICE, recipe="ft-test", steps=2)
    assert shorter.recipe["schedule"]["steps"] == 2 != as_written.recipe["schedule"]["steps"]
    assert {k: v for k, v in shorter.recipe["schedule"].items() if k != "steps"} == \
        {k: v for k, v in as_written.recipe["schedule"].items() if k != "steps"}
    # A study answers one question: trials of another length must not join the recipe's own.
    assert shorter.study_name != as_written.study_name


# ------------------------------------------------------------------------------------- the recipe's search space

def _space(search: dict, **finetune) -> dict:
    return {"source": "r.toml", "schedule": {"validate_every": 10}, "finetune": {"search": search, **finetune}}


def test_search_space_is_recipe_data_with_one_line_errors():
    from workbench.errors import WorkbenchError
    from workbench.train.tuning import finetune_settings, search_space

    dims = search_space(_space({
        "schedule.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "schedule": {"steps": {"type": "int", "low": 10, "high": 50, "step": 10}},  # nested tables work too
        "finetune.freeze": {"type": "categorical", "choices": ["none", "encoders+bottlenecks"]},
        "data.snr_db.low": {"type": "float", "low": 2.0, "high": 8.0},
    }))
    assert [d.name for d in dims] == ["data.snr_db.low", "finetune.freeze", "schedule.learning_rate", "schedule.steps"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = {d.name: d.suggest(trial) for d in dims}
    assert 1e-5 <= values["schedule.learning_rate"] <= 1e-3 and values["schedule.steps"] in (10, 20, 30, 40, 50)
    bad = [
        ({"schedule.nope": {"type": "float", "low": 1, "high": 2}}, "[schedule] has no key 'nope'"),
        ({"model.size": {"type": "categorical", "choices": ["tiny"]}}, "start with schedule., data. or finetune."),
        ({"schedule.steps": {"type": "int", "low": 5, "high": 1}}, "low (5) is above high (1)"),
        ({"schedule.learning_rate": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log scale needs low > 0"),
        ({"schedule.shape": {"type": "categorical", "choices": []}}, "choices must be a non-empty list"),
        ({"schedule.steps": {"type": "integer", "low": 1, "high": 2}}, "type must be one of"),
        ({"finetune.freeze": {"type": "categorical", "choices": ["gills"]}}, "unknown layer group 'gills'"),
        ({"data.snr_db": {"type": "float", "low": 1, "high": 2}}, "search its entries"),
    ]
    for search, message in bad:
        with pytest.raises(WorkbenchError) as error:
            search_space(_space(search))
        assert message in str(error.value) and "r.toml" in str(error.value), str(error.value)
    with pytest.raises(WorkbenchError, match="not an argument of the median pruner"):
        finetune_settings(_space({}, pruner={"type": "median", "min_resource": 3}))
    with pytest.raises(WorkbenchError, match=r"\[finetune\] trials must be an integer >= 1"):
        finetune_settings(_space({}, trials=0))
    assert finetune_settings(_space({}, pruner={"type": "hyperband", "min_resource": 2})).validate_every == 10


def test_durations_parse_like_people_write_them():
    from workbench.errors import WorkbenchError
    from workbench.train.tuning import parse_duration

    assert parse_duration("90") == parse_duration("90s") == 90
    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("1.5h") == 5400
    assert parse_duration("") is None and parse_duration(None) is None
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(WorkbenchError):
            parse_duration(bad)
