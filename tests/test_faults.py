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
def tiny_model_file(tmp_path_factory) -> Path:
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import SIZES, TwoStageUNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("faults-model") / "tiny.safetensors"
    save_checkpoint(path, TwoStageUNet(SIZES["tiny"]).eval(), lineage={"source": "test: random weights, seed 0"})
    return path


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
def test_denoise_refuses_nan_and_inf_input_naming_the_time(tmp_path, cli, tiny_model_file, value):
    audio = hiss(3.0, 44_100)
    audio[50_000, 1] = value  # one sample, 1.134 s in, right channel
    source = tmp_path / "nan.wav"
    sf.write(source, audio, 44_100, subtype="FLOAT")
    before = sha256_file(source)
    result = cli("denoise", "--model", tiny_model_file, source, "--out", tmp_path / "out")
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
    from workbench.evaluate.evaluate import evaluate_methods
    from workbench.evaluate.fragments import FragmentSet
    from workbench.train.data import read_crop

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

def test_a_full_disk_while_writing_is_one_line_and_leaves_no_partial_file(tmp_path, tiny_model_file):
    source = tmp_path / "long.wav"
    sf.write(source, hiss(12.0), 48_000, subtype="PCM_24")  # 3.5 MB: past the 1 MB limit
    out = tmp_path / "out"
    code, _, stderr = finished(workbench_process("denoise", "--model", tiny_model_file, source, "--out", out,
                                                 limit_file_kb=1024))
    assert code == 2, stderr[-3000:]
    line = error_line(stderr)
    assert "long.denoised.wav" in line and "nothing was written" in line, line
    assert not out.exists() or not any(out.iterdir())


# --- kills --------------------------------------------------------------------------------------------------

def test_a_killed_denoise_of_a_folder_is_finished_by_a_rerun_without_partial_files(tmp_path, tiny_model_file):
    transfers = tmp_path / "transfers"
    transfers.mkdir()
    for number in range(3):
        sf.write(transfers / f"reel-{number}.wav", hiss(6.0, seed=number), 48_000, subtype="PCM_16")
    sources = {path: sha256_file(path) for path in transfers.iterdir()}
    out = tmp_path / "restored"
    command = ("denoise", "--model", tiny_model_file, transfers, "--out", out, "--chunk-seconds", "1")

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
