"""Faults and poisoned input: what is refused, what survives (the README's table, case by case).

Real processes of `python -m workbench ...` (this checkout on PYTHONPATH) killed with SIGKILL at a moment
found by watching their files, a file-size limit (`ulimit -f`) for a full disk, an SQLite store held by
another process, NaN and infinity in the audio and in a damaged model's output.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from workbench.audio.io import sha256_file
from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parents[1]


def workbench_process(*args, workspace: Path | None = None, limit_file_kb: int | None = None,
                      **popen) -> subprocess.Popen:
    """`python -m workbench ARGS` in a process of its own (this checkout's code, one torch thread)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if workspace is not None:
        env["WORKBENCH_HOME"] = str(workspace)
    command = [sys.executable, "-m", "workbench", *map(str, args)]
    if limit_file_kb is not None:  # the shell's file-size limit: a disk that fills up at that size
        command = ["bash", "-c", f'ulimit -f {limit_file_kb}; exec "$@"', "workbench", *command]
    return subprocess.Popen(command, env=env, stdout=popen.pop("stdout", subprocess.PIPE),
                            stderr=subprocess.PIPE, start_new_session=True, **popen)


def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, (out or b"").decode(), err.decode()


def error_line(stderr: str) -> str:
    """The single `error:` line a refusal prints (progress bars aside), and no traceback."""
    assert "Traceback" not in stderr and "╭" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def kill_when(process: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the process (group) as soon as `ready()` holds; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.01)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"the process ended (or stalled) before {what}: {process.stderr.read().decode()[-2000:]}")


def open_files(pid: int) -> set[Path]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            found.add(Path(os.readlink(fd)))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def damaged_model_file(tmp_path_factory) -> Path:
    """Finite weights (the loader accepts them) a million times too large: the output overflows to inf/NaN."""
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import SIZES, TwoStageUNet

    torch.manual_seed(0)
    model = TwoStageUNet(SIZES["tiny"]).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1e6)
    path = tmp_path_factory.mktemp("faults-damaged") / "damaged.safetensors"
    save_checkpoint(path, model, lineage={"source": "test: weights scaled by 1e6"})
    return path


def hiss(seconds: float, rate: int = 48_000, channels: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, (int(seconds * rate), channels))


# --- non-finite samples -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_denoise_refuses_nan_and_inf_input_naming_the_time(tmp_path, cli, random_tiny_checkpoint, value):
    audio = hiss(3.0, 44_100)
    audio[50_000, 1] = value  # one sample, 1.134 s in, right channel
    source = tmp_path / "nan.wav"
    sf.write(source, audio, 44_100, subtype="FLOAT")
    before = sha256_file(source)
    result = cli("denoise", "--model", random_tiny_checkpoint, source, "--out", tmp_path / "out")
    assert result.code == 2
    line = error_line(result.stderr)
    assert "nan.wav" in line and "NaN or inf" in line and "0:00:01.134" in line and "channel 2" in line, line
    assert not (tmp_path / "out").exists() and sha256_file(source) == before


def test_denoise_refuses_a_model_whose_output_is_not_finite_and_removes_the_partial_output(tmp_path, cli,
                                                                                          damaged_model_file):
    source = tmp_path / "take.wav"
    sf.write(source, hiss(2.0), 48_000, subtype="PCM_24")
    out = tmp_path / "out"
    result = cli("denoise", "--model", damaged_model_file, source, "--out", out, "--chunk-seconds", "0.5")
    assert result.code == 2
    line = error_line(result.stderr)
    assert "take.wav" in line and "outputs NaN or inf" in line and "0:00:00" in line, line
    assert not out.exists() or not any(out.iterdir())  # not even the hidden partial file


def test_corpus_add_refuses_a_music_file_with_nan(workspace, cli, tmp_path):
    music = tmp_path / "music"
    for split in ("train", "validation", "test"):
        (music / split).mkdir(parents=True)
        sf.write(music / split / "piece.wav", hiss(1.0, 44_100, 1, seed=len(split)), 44_100, subtype="FLOAT")
    poisoned = hiss(1.0, 44_100, 1)
    poisoned[22_050, 0] = np.nan
    sf.write(music / "train" / "poisoned.wav", poisoned, 44_100, subtype="FLOAT")
    result = cli("corpus", "add", music, "--name", "poisoned")
    assert result.code == 2
    line = error_line(result.stderr)
    assert "poisoned.wav" in line and "0:00:00.500" in line, line
    assert "poisoned" not in cli("corpus", "list", "--json").stdout


def test_training_and_evaluation_never_see_a_non_finite_value(tmp_path):
    from workbench.audio.crops import read_crop
    from workbench.evaluate.evaluate import evaluate_methods
    from workbench.evaluate.fragments import FragmentSet

    class Source:  # what the corpus and the noise library hand the data loader
        path = tmp_path / "snippet.wav"
        sample_rate = 48_000
        frames = 48_000
        sha256 = "x"

    audio = hiss(1.0, 48_000, 1)
    audio[30_000, 0] = np.inf
    sf.write(Source.path, audio, 48_000, subtype="FLOAT")
    with pytest.raises(WorkbenchError, match=r"snippet.wav: NaN or inf samples \(first at 0:00:00.625"):
        read_crop(Source, 0, 44_100)

    clean = np.random.default_rng(0).normal(0, 0.1, (2, 4410)).astype(np.float32)
    fragments = FragmentSet(device="d", speed=None, snrs_db=(10.0,), clean=clean, noise=clean[::-1].copy(), manifest={})

    def diverged(noisy: np.ndarray) -> np.ndarray:
        out = noisy.copy()
        out[1, 441] = np.nan
        return out

    with pytest.raises(WorkbenchError, match=r"'diverged' on .* fragment 1 at 10 dB: .*NaN or inf .*0:00:00.010"):
        evaluate_methods(fragments, {"diverged": diverged})


# --- a full disk --------------------------------------------------------------------------------------------

@pytest.mark.slow  # end to end: a workbench process run under a file-size limit
def test_a_full_disk_while_writing_is_one_line_and_leaves_no_partial_file(tmp_path, random_tiny_checkpoint):
    source = tmp_path / "long.wav"
    sf.write(source, hiss(12.0), 48_000, subtype="PCM_24")  # 3.5 MB: past the 1 MB limit
    out = tmp_path / "out"
    code, _, stderr = finished(workbench_process("denoise", "--model", random_tiny_checkpoint, source, "--out", out,
                                                 limit_file_kb=1024))
    assert code == 2, stderr[-3000:]
    line = error_line(stderr)
    assert "long.denoised.wav" in line and "nothing was written" in line, line
    assert not out.exists() or not any(out.iterdir())


# --- kills --------------------------------------------------------------------------------------------------

@pytest.mark.slow  # end to end: a workbench process killed, then run again
def test_a_killed_denoise_of_a_folder_is_finished_by_a_rerun_without_partial_files(tmp_path, random_tiny_checkpoint):
    transfers = tmp_path / "transfers"
    transfers.mkdir()
    for number in range(3):
        sf.write(transfers / f"reel-{number}.wav", hiss(6.0, seed=number), 48_000, subtype="PCM_16")
    sources = {path: sha256_file(path) for path in transfers.iterdir()}
    out = tmp_path / "restored"
    command = ("denoise", "--model", random_tiny_checkpoint, transfers, "--out", out, "--chunk-seconds", "1")

    def second_file_half_written() -> bool:
        return (out / "reel-0.denoised.wav.json").is_file() and any(out.glob(".reel-1.denoised.*.partial.wav"))

    kill_when(workbench_process(*command, stdout=subprocess.DEVNULL), second_file_half_written,
              "it had finished one file and started the next")
    first = sha256_file(out / "reel-0.denoised.wav")
    code, _, stderr = finished(workbench_process(*command, "--json"))
    assert code == 0, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"reel-{n}.denoised.wav{suffix}" for n in range(3) for suffix in ("", ".json"))  # no partial file left
    assert sha256_file(out / "reel-0.denoised.wav") == first  # finished before the kill: kept, not redone
    assert {path: sha256_file(path) for path in transfers.iterdir()} == sources
    # A rerun with another strength is not the same restoration: refused, not skipped.
    code, _, stderr = finished(workbench_process(*command, "--strength", "0.5"))
    assert code == 2 and "already exists" in error_line(stderr)


@pytest.mark.slow  # end to end: a workbench process killed, then run again
def test_a_killed_corpus_add_leaves_the_registry_as_it_was(workspace, cli, tmp_path):
    from workbench.corpus import registry_path

    music = tmp_path / "music"
    for split, count in (("train", 12), ("validation", 2), ("test", 2)):
        (music / split).mkdir(parents=True)
        for number in range(count):
            sf.write(music / split / f"piece-{number}.wav", hiss(8.0, 44_100, 2, seed=number), 44_100, subtype="FLOAT")
    before = registry_path(workspace).read_bytes() if registry_path(workspace).exists() else None

    process = workbench_process("corpus", "add", music, "--name", "big", workspace=workspace.root,
                                stdout=subprocess.DEVNULL)
    kill_when(process, lambda: any(music in path.parents for path in open_files(process.pid)),
              "it opened a music file")
    after = registry_path(workspace).read_bytes() if registry_path(workspace).exists() else None
    assert after == before
    folder = registry_path(workspace).parent
    assert not folder.exists() or not [p for p in folder.iterdir() if ".partial" in p.name]
    code, _, stderr = finished(workbench_process("corpus", "add", music, "--name", "big", workspace=workspace.root))
    assert code == 0, stderr[-3000:]
    assert "big" in cli("corpus", "list", "--json").stdout


# --- a locked store -------------------------------------------------------------------------------------------

def hold_exclusive_lock(database: Path, seconds: float) -> threading.Event:
    """Another writer holding the SQLite file (an exclusive transaction) for `seconds`, or until the returned
    event is set."""
    connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN EXCLUSIVE")
    release = threading.Event()

    def hold():
        release.wait(seconds)
        connection.execute("COMMIT")
        connection.close()

    threading.Thread(target=hold, daemon=True).start()
    return release


@pytest.mark.slow  # end to end: workbench processes waiting out a held SQLite lock
def test_a_locked_mlflow_store_is_waited_for_then_refused_in_one_line(workspace, cli):
    from workbench import tracking

    tracking.configure(workspace)  # the store exists
    hold_exclusive_lock(workspace.mlflow_db, 3.0)  # shorter than the wait: the command waits, then works
    code, stdout, stderr = finished(workbench_process("models", "list", "--json", workspace=workspace.root))
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    release = hold_exclusive_lock(workspace.mlflow_db, 120.0)  # past the wait: one line
    try:
        code, _, stderr = finished(workbench_process("models", "list", workspace=workspace.root))
    finally:
        release.set()
    assert code == 2, stderr[-3000:]
    line = error_line(stderr)
    assert "mlflow.db" in line and "locked by another process" in line, line


# --- finetune: two workers at once, a kill during registration, a study per question --------------------------

FT_DEVICE = "uher-4000-l"
FT_MODEL = f"tape-denoiser-{FT_DEVICE}"


@pytest.fixture(scope="module")
def ft_archive(tiny_archive_template, tmp_path_factory):
    """A private tiny archive with a random tiny network as the general model @base and two recipes that
    differ only in their seed (two questions, so two studies)."""
    from conftest import archive_with_random_base, tiny_finetune_recipe

    with archive_with_random_base(tiny_archive_template, tmp_path_factory, "faults-finetune") as ws:
        for name, seed in (("ft-a", 7), ("ft-b", 8)):
            text = tiny_finetune_recipe(name, trials=2, steps=2, validate_every=1, segment_seconds=0.25)
            (ws.recipes_dir / f"{name}.toml").write_text(text.replace("seed = 7", f"seed = {seed}", 1))
        yield ws


def registry_state(ws) -> dict:
    """Versions of the device model (with their study and trial) and the status of every MLflow run."""
    with sqlite3.connect(f"file:{ws.mlflow_db}?mode=ro", uri=True) as db:
        versions = db.execute("SELECT v.version, s.value, t.value FROM model_versions v "
                              "JOIN model_version_tags s ON s.name = v.name AND s.version = v.version AND s.key = 'study' "
                              "JOIN model_version_tags t ON t.name = v.name AND t.version = v.version AND t.key = 'best_trial' "
                              "WHERE v.name = ? ORDER BY v.version", (FT_MODEL,)).fetchall()
        runs = db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
    return {"versions": versions, "runs": dict(runs)}


def registering(ws) -> bool:
    """True while a `finetune` process is inside its registration run (the MLflow run that registers a version)."""
    try:
        with sqlite3.connect(f"file:{ws.mlflow_db}?mode=ro", uri=True, timeout=0.1) as db:
            return bool(db.execute("SELECT COUNT(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                   "WHERE r.status = 'RUNNING' AND t.key = 'workbench.kind' "
                                   "AND t.value = 'finetune-model'").fetchone()[0])
    except sqlite3.OperationalError:  # busy for a moment: look again
        return False


def finetune(ws, recipe: str, **popen) -> subprocess.Popen:
    return workbench_process("finetune", "--device", FT_DEVICE, "--recipe", recipe, "--json", workspace=ws.root, **popen)


@pytest.mark.slow  # end to end: whole finetune processes
def test_two_finetune_workers_at_once_share_the_study_and_register_once(ft_archive):
    import json

    first, second = finetune(ft_archive, "ft-a"), finetune(ft_archive, "ft-a")
    results = [finished(first, 900), finished(second, 900)]
    for code, _, stderr in results:
        assert code == 0 and "database is locked" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    answers = [json.loads(stdout) for _, stdout, _ in results]
    assert answers[0]["study"] == answers[1]["study"] and answers[0]["version"] == answers[1]["version"] == 1
    assert sorted(a["registered_now"] for a in answers) == [False, True]  # one registered, the other found it
    registered, found = sorted(answers, key=lambda a: not a["registered_now"])
    assert found["reason"] == registered["reason"] + " (registered earlier for this study's best trial)"
    state = registry_state(ft_archive)
    assert len(state["versions"]) == 1 and state["runs"].get("RUNNING", 0) == 0, state

    # The same question again resumes the study: nothing trained, the same version back.
    code, stdout, stderr = finished(finetune(ft_archive, "ft-a"), 900)
    assert code == 0, stderr[-3000:]
    again = json.loads(stdout)
    assert (again["study"], again["version"], again["registered_now"]) == (answers[0]["study"], 1, False)
    assert registry_state(ft_archive) == state


@pytest.mark.slow  # end to end: whole finetune processes
def test_a_kill_during_registration_is_completed_by_a_rerun_once(ft_archive):
    """Another recipe is another question: its own study (not the ft-a version back). Its first run is killed
    while it registers; the rerun closes the dead run, trains nothing and registers exactly one version."""
    import json

    import optuna

    from workbench.finetune import make_plan
    from workbench.train.tuning import open_storage

    before = registry_state(ft_archive)
    plan = make_plan(ft_archive, FT_DEVICE, recipe="ft-b")
    assert plan.study_name not in {study for _, study, _ in before["versions"]}
    worker = finetune(ft_archive, "ft-b", stdout=subprocess.DEVNULL)
    kill_when(worker, lambda: registering(ft_archive), "it began registering", timeout=900)
    killed = registry_state(ft_archive)
    assert killed["versions"] == before["versions"] and killed["runs"].get("RUNNING", 0) >= 2  # study + registration
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(ft_archive.optuna_storage()))
    trials = [(t.number, t.state, t.datetime_complete) for t in study.get_trials(deepcopy=False)]

    code, stdout, stderr = finished(finetune(ft_archive, "ft-b"), 900)
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert result["study"] == plan.study_name and result["version"] == 2 and result["registered_now"]
    after = registry_state(ft_archive)
    assert after["versions"] == before["versions"] + [(2, plan.study_name, str(result["best_trial"]["number"]))]
    assert after["runs"].get("RUNNING", 0) == 0 and after["runs"].get("KILLED", 0) >= 1, after
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(ft_archive.optuna_storage()))
    assert [(t.number, t.state, t.datetime_complete) for t in study.get_trials(deepcopy=False)] == trials


def test_a_study_refuses_a_run_that_asks_another_question(tmp_path):
    """Names carry the identity, so this takes a study made by hand under a run's name with another identity."""
    from workbench.train.tuning import check_identity, open_study, study_identity

    storage = f"journal:{tmp_path / 'studies.journal'}"
    study = open_study("finetune-x-0123456789", storage, seed=0, pruner=optuna_pruner())
    mine = study_identity(base="tape-denoiser-general v1, sha256 aa", recipe="r1", noise="n1", corpus="c1")
    check_identity(study, mine, storage)  # a new study takes the run's identity
    check_identity(study, mine, storage)  # and the same inputs join it again
    other = dict(mine, base="tape-denoiser-general v2, sha256 bb", recipe="r2")
    with pytest.raises(WorkbenchError) as refused:
        check_identity(study, other, storage)
    line = str(refused.value)
    assert "\n" not in line and "finetune-x-0123456789" in line and "base model (tape-denoiser-general v1" in line
    assert "recipe (r1 there, r2 here)" in line and "noise library" not in line and "another --storage" in line


def optuna_pruner():
    import optuna

    return optuna.pruners.NopPruner()
