"""Shared fixtures: a fresh workspace per test and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass

import pytest
import torch

from workbench.workspace import Workspace, init_workspace

# Property-based tests (hypothesis): `ci` is the default and what `make test` runs; HYPOTHESIS_PROFILE=dev
# is a quick pass while editing. No example database: nothing is written into the repository, and every
# run draws afresh from the fixed seed (derandomize), so a failure reproduces on any machine.
HYPOTHESIS_EXAMPLES = {"ci": 60, "dev": 10}


def _register_hypothesis_profiles() -> None:
    from hypothesis import HealthCheck, settings

    for name, examples in HYPOTHESIS_EXAMPLES.items():
        settings.register_profile(name, max_examples=examples, deadline=None, database=None, derandomize=True,
                                  print_blob=True, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_register_hypothesis_profiles()


def pytest_sessionstart(session):
    """Stop the whole run in its first seconds when torch and torchaudio do not load together (a broken
    pair fails every test that touches DSP, with a traceback far from the cause)."""
    problem = torchaudio_problem()
    if problem:
        pytest.exit(problem, returncode=3)


def torchaudio_problem() -> str | None:
    """None when torchaudio's compiled part loads beside this torch and resamples; else one line that
    names both versions."""
    try:
        import torchaudio.functional

        torchaudio.functional.resample(torch.zeros(1, 441), 44_100, 48_000)
    except (ImportError, OSError, RuntimeError) as error:
        from importlib.metadata import version

        return (f"torch {version('torch')} and torchaudio {version('torchaudio')} do not load together "
                f"({error}); reinstall from the lock: rm -rf .venv && make test")
    return None


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Workspace:
    """A fresh workspace with the research data set's devices, made current through WORKBENCH_HOME."""
    ws = init_workspace(tmp_path / "archive", with_research_devices=True)
    monkeypatch.setenv("WORKBENCH_HOME", str(ws.root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return ws


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def cli(capsys):
    """Run `workbench ARGS...` in-process; returns exit code, stdout and stderr."""
    from workbench.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


# --- a tiny synthetic archive, built once per session (training, fine-tuning and demo tests share it) ---

# (device, speed) pairs with blank tape in the tiny archive, and how much of everything it holds.
TINY_ARCHIVE_DEVICES = (("revox-a77", 7.5), ("uher-4000-l", 3.75), ("technics-tr575-a", 1.875))
TINY_BLANK_TAPE_SECONDS = 20.0
TINY_MUSIC_SECONDS = {"train": 40.0, "validation": 10.0, "test": 10.0}


@pytest.fixture(scope="session")
def tiny_archive_template(tmp_path_factory):
    """A workspace with a tiny ingested noise library (3 devices, 1 s snippets in all three splits), a
    registered clean corpus `tiny-music` (synthetic music in train/validation/test folders) and an empty
    MLflow store, built once.
    Use `tiny_archive` for a private copy; never write into this one."""
    from workbench.corpus import add_corpus
    from workbench.devices import get_device
    from workbench.noise.ingest import capture_noise
    from workbench.synth.music import render_music
    from workbench.synth.tape_noise import render_blank_tape

    root = tmp_path_factory.mktemp("tiny-archive")
    ws = init_workspace(root / "archive", with_research_devices=True)
    for number, (device_id, speed) in enumerate(TINY_ARCHIVE_DEVICES):
        tape = root / "tapes" / f"{device_id}.wav"
        render_blank_tape(get_device(ws, device_id), speed, TINY_BLANK_TAPE_SECONDS, tape, seed=number)
        capture_noise(ws, [tape], device_id, speed, snippet_seconds=1.0, split=(60.0, 20.0, 20.0))
    for number, (split, seconds) in enumerate(TINY_MUSIC_SECONDS.items()):
        render_music(root / "music" / split, seconds / 60, seed=100 + number, piece_seconds=min(seconds, 20.0))
    add_corpus(ws, root / "music", name="tiny-music")
    from workbench import tracking

    tracking.configure(ws)  # the MLflow tables, created once here rather than in every copy
    return ws.root


@pytest.fixture
def tiny_archive(tiny_archive_template, tmp_path, monkeypatch) -> Workspace:
    """A private copy of the tiny archive (noise library + corpus), current through WORKBENCH_HOME, with
    its own empty MLflow store."""
    import shutil

    root = tmp_path / "archive"
    shutil.copytree(tiny_archive_template, root)
    monkeypatch.setenv("WORKBENCH_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Workspace(root)


# --- tiny recipes: the smallest settings that still train, tune and evaluate for real ------------------

@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory):
    """A tiny network with random weights (seed 0) saved as a checkpoint: a model that runs, not a good one."""
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import SIZES, TwoStageUNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-tiny-model") / "tiny.safetensors"
    save_checkpoint(path, TwoStageUNet(SIZES["tiny"]).eval(), lineage={"source": "test: random weights, seed 0"})
    return path


@contextlib.contextmanager
def archive_with_random_base(tiny_archive_template, tmp_path_factory, name: str):
    """A private copy of the tiny archive, made current, with a random tiny network registered as the
    general model @base (fine-tuning tests need a base, not a good one)."""
    from workbench import model_registry
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import TwoStageUNet, get_config

    root = tmp_path_factory.mktemp(name) / "archive"
    shutil.copytree(tiny_archive_template, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_HOME", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        ws = Workspace(root)
        torch.manual_seed(0)
        base = root / "base.safetensors"
        save_checkpoint(base, TwoStageUNet(get_config("tiny")), {"kind": "test base: random weights"})
        model_registry.set_alias(model_registry.GENERAL_MODEL, "base",
                                 model_registry.register_checkpoint(base, model_registry.GENERAL_MODEL, workspace=ws), ws)
        ws.recipes_dir.mkdir(exist_ok=True)
        yield ws


def tiny_recipe(name: str, *, steps: int = 4, batch_size: int = 4, segment_seconds: float = 0.25,
                validation_mixtures: int = 4, validation_seconds: float = 0.5, validate_every: int = 2,
                checkpoint_every: int = 100, seed: int = 5, schedule_extra: str = "") -> str:
    """A training recipe (TOML) with the tiny network and quarter-second segments."""
    return f"""
name = "{name}"
[model]
size = "tiny"
[data]
segment_seconds = {segment_seconds}
validation_mixtures = {validation_mixtures}
validation_seconds = {validation_seconds}
num_workers = 0
seed = {seed}
[schedule]
steps = {steps}
batch_size = {batch_size}
validate_every = {validate_every}
checkpoint_every = {checkpoint_every}
{schedule_extra}
"""


def tiny_finetune_recipe(name: str, *, trials: int, steps: int, validate_every: int, segment_seconds: float,
                         validation_mixtures: int = 2, validation_seconds: float | None = None) -> str:
    """`tiny_recipe` plus a two-parameter study (median pruning from the second trial) and a 2-fragment evaluation.
    Validation is on `validation_mixtures` mixtures of `validation_seconds` (default: the segment length)."""
    return tiny_recipe(name, steps=steps, batch_size=2, segment_seconds=segment_seconds,
                       validation_mixtures=validation_mixtures,
                       validation_seconds=validation_seconds or segment_seconds, validate_every=validate_every,
                       checkpoint_every=validate_every, seed=7,
                       schedule_extra='learning_rate = 3e-3\nshape = "constant"') + f"""
[finetune]
trials = {trials}
seed = 0
[finetune.search]
"schedule.learning_rate" = {{ type = "float", low = 2e-3, high = 1e-2, log = true }}
"schedule.steps" = {{ type = "int", low = 2, high = 3 }}
[finetune.pruner]
type = "median"
n_startup_trials = 1
n_warmup_steps = 0
[evaluation]
fragments = 2
seconds = 0.5
seed = 3
batch_size = 2
"""


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a shared 2-core machine OpenMP threads spin against other
    processes, and one thread is far faster for these small models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- real services for the scale-out tests (tests/services.py): PostgreSQL, an MLflow tracking server ---

@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session on a free loopback port, stopped at the end (also on failure).
    Skips with the reason only where PostgreSQL is not installed; `.ci/run` installs it."""
    from services import port_is_bound, postgres_absent, postgres_server

    reason = postgres_absent()
    if reason:
        pytest.skip(reason)
    with postgres_server() as server:
        yield server
    assert not port_is_bound(server.port), f"PostgreSQL still holds port {server.port}"
    assert not server.folder.exists(), f"{server.folder} was left behind"
