"""Shared fixtures: a fresh workspace per test and an in-process CLI runner."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from workbench.workspace import Workspace, init_workspace


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
