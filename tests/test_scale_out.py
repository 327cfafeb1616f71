"""Scale-out for real: `workbench finetune` workers sharing one Optuna study in PostgreSQL, tracked in an
MLflow tracking server (PostgreSQL backend store, artifacts proxied by the server).

The services are real and started by this run (tests/services.py, the `postgres` fixture in conftest.py);
the workers are real `workbench` processes training the tiny network. One module-scoped archive carries
the scenarios, each on its own replay machine (so each registers its own model):

- technics-tr575-a: pretrain over HTTP, then two workers started together on one study; then `models
  list/show` and `denoise --device` from another working folder that has only the tracking URI.
- uher-4000-l: two workers, one SIGKILLed mid-trial; the heartbeat fails its trial, the other retries it.
- revox-a77: the tracking server goes away mid-study: one error line naming its URI; a rerun when it is
  back finishes the study.

The commands are the README's "Scaling out" commands; heartbeats beat every second with a 3 s grace here
(WORKBENCH_HEARTBEAT_S, WORKBENCH_HEARTBEAT_GRACE_S) so a dead worker is noticed within the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import soundfile as sf

from conftest import tiny_finetune_recipe, tiny_recipe
from services import mlflow_server, port_is_bound, stop_process_group
from workbench.workspace import Workspace, init_workspace

pytestmark = pytest.mark.slow

TRIALS = 4
WORKER_TIMEOUT_S = 300
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """An MLflow tracking server with a PostgreSQL backend store and proxied artifacts."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(postgres.database("mlflow"), folder) as running:
        yield running
    assert not port_is_bound(running.port), f"the MLflow server still holds port {running.port}"


@pytest.fixture(scope="module")
def archive(tiny_archive_template, tmp_path_factory, server) -> Workspace:
    """A private tiny archive whose MLflow store is the server, with the scale-out recipes."""
    import shutil

    root = tmp_path_factory.mktemp("scale-out") / "archive"
    shutil.copytree(tiny_archive_template, root)
    (root / "registry" / "mlflow.db").unlink(missing_ok=True)  # nothing may fall back to a local store
    ws = Workspace(root)
    ws.recipes_dir.mkdir(exist_ok=True)
    # The general model: the tiny network "pretrained" with a learning rate too small to move it, so any
    # fine-tuning beats it and the gate promotes the machine's model (`denoise --device` needs a champion).
    (ws.recipes_dir / "pt-scale.toml").write_text(tiny_recipe("pt-scale", steps=2, batch_size=2, validate_every=2,
                                                              schedule_extra="learning_rate = 1e-12"))
    (ws.recipes_dir / "ft-scale.toml").write_text(
        tiny_finetune_recipe("ft-scale", trials=TRIALS, steps=3, validate_every=1, segment_seconds=0.25))
    return ws


def environment(ws: Workspace, server_uri: str) -> dict[str, str]:
    """What every worker gets: the workspace, the tracking server, fast heartbeats, one torch thread, and
    MLflow's HTTP retries cut short (its defaults keep retrying a dead server for minutes)."""
    env = {**os.environ, "WORKBENCH_HOME": str(ws.root), "MLFLOW_TRACKING_URI": server_uri,
           "WORKBENCH_HEARTBEAT_S": "1", "WORKBENCH_HEARTBEAT_GRACE_S": "3", "OMP_NUM_THREADS": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "PYTHONUNBUFFERED": "1"}
    return env


def workbench(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workbench", *map(str, args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout_s: float = WORKER_TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for a worker; a worker that hangs is killed with its group (no process outlives the test)."""
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process_group(process)
        out, err = process.communicate()
        pytest.fail(f"worker {process.args} did not finish in {timeout_s} s: {err[-2000:]}")
    return process.returncode, out, err


def finetune_command(device: str, storage: str) -> list[str]:
    return ["finetune", "--device", device, "--recipe", "ft-scale", "--storage", storage, "--trials", str(TRIALS),
            "--accelerator", "cpu", "--json"]


def study_trials(storage: str, device: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of the one study of `device` in `storage` (its name ends in the digest of what it answers);
    KeyError while there is none yet."""
    from workbench.train.tuning import open_storage

    opened = open_storage(storage)
    names = [name for name in optuna.get_all_study_names(opened) if name.startswith(f"finetune-{device}-")]
    if not names:
        raise KeyError(f"no study of {device} yet")
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=opened).get_trials(deepcopy=False)


def mlflow_client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def study_runs(client, device: str) -> tuple[list, list]:
    """(the study's parent runs, its trial runs) in the device's experiment."""
    experiment = client.get_experiment_by_name(f"finetune-{device}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    kinds = lambda kind: [r for r in runs if r.data.tags.get("workbench.kind") == kind]  # noqa: E731
    return kinds("finetune-study"), kinds("finetune-trial")


# ------------------------------------------------------------------------------------- two workers, one study

@pytest.fixture(scope="module")
def general_model(archive, server) -> dict:
    """`workbench pretrain` over HTTP: the general model every scenario fine-tunes (@base)."""
    pretrain = workbench(environment(archive, server.uri), "pretrain", "--recipe", "pt-scale", "--noise-from",
                         "uher-4000-l", "--alias", "base", "--accelerator", "cpu", "--workers", "0", "--json")
    code, out, err = finish(pretrain)
    assert code == 0, err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def two_workers(archive, server, postgres, general_model):
    """Two `workbench finetune` workers started together on one study."""
    env = environment(archive, server.uri)
    storage = postgres.database("optuna_two")
    workers = [workbench(env, *finetune_command("technics-tr575-a", storage)) for _ in range(2)]
    results = [finish(worker) for worker in workers]
    return {"storage": storage, "results": results, "pids": [w.pid for w in workers]}


def test_two_workers_share_one_study_each_trial_once_one_version(two_workers, server):
    for code, _, err in two_workers["results"]:
        assert code == 0, err[-3000:]
    trials = study_trials(two_workers["storage"], "technics-tr575-a")
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # no number twice, none missing
    assert all(t.state in FINISHED for t in trials), [(t.number, t.state) for t in trials]  # none lost
    # The target, reached between them (a trial both decide to start in the same instant may add one).
    assert TRIALS <= len(trials) <= TRIALS + 1
    by_worker = {t.user_attrs["worker"]["pid"] for t in trials}
    assert by_worker == set(two_workers["pids"]), "both workers ran trials"

    client = mlflow_client(server.uri)
    parents, trial_runs = study_runs(client, "technics-tr575-a")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trial_runs) == numbers  # each trial once in MLflow
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    for trial in trials:
        assert trial.user_attrs["mlflow_run_id"] in {r.info.run_id for r in trial_runs}

    versions = client.search_model_versions("name = 'tape-denoiser-technics-tr575-a'")
    assert [v.version for v in versions] == ["1"]
    reported = [json.loads(out) for _, out, _ in two_workers["results"]]
    assert sorted(r["registered_now"] for r in reported) == [False, True]
    assert {r["version"] for r in reported} == {1}


def test_artifacts_go_through_the_server_and_the_model_loads_from_another_folder(two_workers, archive, server,
                                                                                  cli, monkeypatch, tmp_path):
    client = mlflow_client(server.uri)
    version = client.get_model_version("tape-denoiser-technics-tr575-a", "1")
    run = client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    assert list(server.artifacts.rglob("*.safetensors")), "the checkpoint is in the server's artifact store"
    assert not (archive.root / "registry" / "artifacts").exists()  # nothing written beside the client
    assert not (archive.root / "registry" / "mlflow.db").exists()

    # In this process (a worker's start costs seconds of imports), as the CLI: the workspace and the URI.
    monkeypatch.setenv("WORKBENCH_HOME", str(archive.root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    listed = cli("models", "list", "--json")
    assert listed.code == 0, listed.stderr
    models = {m["name"]: m for m in listed.json()}
    promoted = version.tags["promoted"] == "true"
    assert models["tape-denoiser-technics-tr575-a"]["aliases"] == ({"champion": 1} if promoted else {})
    if not promoted:  # the gate refuses a tiny model trained for seconds; `denoise --device` below wants a champion
        client.set_registered_model_alias("tape-denoiser-technics-tr575-a", "champion", "1")
    assert models["tape-denoiser-general"]["aliases"] == {"base": 1}
    shown = cli("models", "show", "technics-tr575-a", "--json")
    assert shown.code == 0, shown.stderr
    assert shown.json()["champion"] == 1

    # Another working folder: a fresh workspace (the device registry only) and the tracking URI.
    other = init_workspace(tmp_path / "elsewhere", with_research_devices=True)
    monkeypatch.setenv("WORKBENCH_HOME", str(other.root))
    transfer = tmp_path / "transfer.wav"
    audio = (0.05 * np.random.default_rng(1).standard_normal((44_100, 2))).astype(np.float32)
    sf.write(transfer, audio, 44_100, subtype="PCM_24")
    restored = cli("denoise", "--device", "technics-tr575-a", transfer, "--out", tmp_path / "restored",
                   "--accelerator", "cpu", "--json")
    assert restored.code == 0, restored.stderr
    record = restored.json()[0]
    assert record["model"]["uri"] == "models:/tape-denoiser-technics-tr575-a/1"
    output, rate = sf.read(record["output"]["path"])
    assert rate == 44_100 and output.shape == audio.shape
    assert list((other.root / "registry" / "models-cache").rglob("*.safetensors"))  # fetched over HTTP


# ------------------------------------------------------------------------------------- a worker killed

def test_a_killed_workers_trial_is_failed_by_the_heartbeat_and_retried_by_the_other(archive, server, postgres,
                                                                                   general_model):
    env = environment(archive, server.uri)
    storage = postgres.database("optuna_kill")
    study = "uher-4000-l"  # the device whose study the trials are read from
    workers = [workbench(env, *finetune_command("uher-4000-l", storage)) for _ in range(2)]
    killed_trial = victim = None
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while killed_trial is None and time.monotonic() < deadline and all(w.poll() is None for w in workers):
            time.sleep(0.3)
            try:
                trials = study_trials(storage, study)
            except KeyError:  # not created yet
                continue
            for trial in trials:
                run_dir = Path(trial.user_attrs.get("run_dir", "/nonexistent"))
                if trial.state == optuna.trial.TrialState.RUNNING and (run_dir / "state.json").is_file():
                    # Mid-trial (it has saved a training step): freeze the worker, make sure the trial is
                    # still running (it may have ended since we looked), then kill it.
                    victim = next(w for w in workers if w.pid == trial.user_attrs["worker"]["pid"])
                    os.killpg(victim.pid, signal.SIGSTOP)
                    if study_trials(storage, study)[trial.number].state == optuna.trial.TrialState.RUNNING:
                        os.killpg(victim.pid, signal.SIGKILL)
                        killed_trial = trial.number
                    else:
                        os.killpg(victim.pid, signal.SIGCONT)
                    break
        assert killed_trial is not None, "no worker was caught mid-trial"
        survivor = next(w for w in workers if w is not victim)
        code, out, err = finish(survivor)
    finally:
        for worker in workers:
            stop_process_group(worker)
    assert code == 0, err[-3000:]

    trials = study_trials(storage, study)
    killed = trials[killed_trial]
    assert killed.state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retries) == 1, "the heartbeat enqueued exactly one retry"
    retry = retries[0]
    assert retry.state in FINISHED and retry.params == killed.params
    assert retry.user_attrs["worker"]["pid"] == survivor.pid
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]  # continued from the saved steps
    assert sum(t.state in FINISHED for t in trials) >= TRIALS
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    client = mlflow_client(server.uri)
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert [v.version for v in client.search_model_versions("name = 'tape-denoiser-uher-4000-l'")] == ["1"]
    assert json.loads(out)["version"] == 1


# ------------------------------------------------------------------------------------- the server goes away

def test_the_server_going_away_is_one_line_naming_it_and_a_rerun_finishes(archive, server, postgres, general_model):
    env = environment(archive, server.uri)
    storage = postgres.database("optuna_away")
    study = "revox-a77"
    worker = workbench(env, *finetune_command("revox-a77", storage))
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.3)
            try:
                trials = study_trials(storage, study)
            except KeyError:
                continue
            if any(t.state in FINISHED for t in trials):
                server.stop()  # mid-study: one trial done, the others not
                break
        code, out, err = finish(worker)
    finally:
        stop_process_group(worker)
        if server.process.poll() is not None:
            server.start()
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and server.uri in lines[0], err[-3000:]

    before = study_trials(storage, study)
    assert not [t for t in before if t.state == optuna.trial.TrialState.RUNNING]  # nothing left hanging
    assert 1 <= sum(t.state in FINISHED for t in before) < TRIALS
    # The trial the outage broke is not the trial's fault: marked so, and the rerun retries it.
    broken = [t for t in before if t.user_attrs.get("interrupted") == "tracking server unreachable"]
    assert len(broken) == 1 and broken[0].state == optuna.trial.TrialState.FAIL
    rerun = workbench(env, *finetune_command("revox-a77", storage))
    code, out, err = finish(rerun)
    assert code == 0, err[-3000:]
    after = study_trials(storage, study)
    assert sum(t.state in FINISHED for t in after) >= TRIALS
    for old in before:  # the finished trials were kept, not run again
        if old.state in FINISHED:
            assert after[old.number].state == old.state and after[old.number].datetime_complete == old.datetime_complete
    assert [t.state in FINISHED for t in after if t.user_attrs.get("retry_of") == broken[0].number] == [True]
    parents, _ = study_runs(mlflow_client(server.uri), "revox-a77")
    assert len(parents) == 1  # the rerun continued the study's run
    assert json.loads(out)["version"] == 1
