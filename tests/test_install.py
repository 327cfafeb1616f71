"""The installed set-up: the lock's torch/torchaudio pair loads together, the heavy packages come compiled,
and the lock answers pyproject.toml (the same check `make lock-check` runs in CI)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import torchaudio.functional

from conftest import torchaudio_problem

ROOT = Path(__file__).resolve().parent.parent


def test_torchaudio_compiled_part_resamples_beside_this_torch():
    assert torchaudio_problem() is None
    tone = torch.sin(torch.arange(44_100) * (2 * torch.pi * 1000 / 44_100)).unsqueeze(0)
    resampled = torchaudio.functional.resample(tone, 44_100, 48_000)
    assert resampled.shape == (1, 48_000)
    # The tone's level survives the resampler (a broken kernel gives zeros or garbage).
    assert abs(resampled[0, 1000:-1000].pow(2).mean().sqrt().item() - 2 ** -0.5) < 1e-2


def test_installed_versions_are_the_locked_ones():
    lock = (ROOT / "requirements.lock").read_text()
    for package in ("torch", "torchaudio", "mlflow", "optuna"):
        assert f"\n{package}=={version(package)} " in lock, f"{package} {version(package)} is not the locked one"


def run_lock_check(pyproject: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "lock_check.py"), str(pyproject),
                           str(ROOT / "requirements.lock")], capture_output=True, text=True)


def test_the_heavy_packages_are_installed_with_their_bytecode_compiled():
    # Without the .pyc files (uv leaves them to the first import, and PYTHONDONTWRITEBYTECODE forbids that)
    # every workbench process compiles torch and mlflow again: 4.4 s to import torch instead of 2.2 s on two
    # cores, and the suite's dozens of worker processes took 10.8 min instead of 7.7 (Makefile).
    import importlib.util

    import mlflow

    for module in (torch, mlflow, torch.nn.functional):
        compiled = Path(importlib.util.cache_from_source(module.__file__))
        assert compiled.is_file(), f"{module.__name__} has no compiled bytecode ({compiled}): rm -rf .venv && make test"


def test_lock_check_passes_on_the_committed_pair():
    result = run_lock_check(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stderr


def test_lock_check_names_a_pin_the_lock_does_not_hold(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torchaudio==2.11.0"' in text
    pyproject.write_text(text.replace('"torchaudio==2.11.0"', '"torchaudio==2.11.1"'))
    result = run_lock_check(pyproject)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "torchaudio==2.11.1 but the lock has torchaudio==2.11.0" in lines[0]
    assert "make lock" in lines[0]


def test_lock_check_names_a_dependency_missing_from_the_lock(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    pyproject.write_text(text.replace('"numpy>=1.26",', '"numpy>=1.26",\n    "librosa>=0.10",'))
    result = run_lock_check(pyproject)
    assert result.returncode == 1
    assert "librosa>=0.10 is not in the lock" in result.stderr
