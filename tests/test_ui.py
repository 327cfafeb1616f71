"""`workbench ui`: the MLflow server for the workspace's store answers over HTTP on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

MODEL = "tape-denoiser-revox-a77"
REPORT = "<!DOCTYPE html><html><body><h1>report of tape-denoiser-revox-a77</h1></body></html>"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def registered(workspace):
    """A workspace whose registry holds one device model (a tiny random checkpoint, registered for real)."""
    import torch

    from workbench import model_registry, tracking
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import TwoStageUNet, get_config

    import mlflow

    torch.manual_seed(0)
    path = workspace.root / "model.safetensors"
    save_checkpoint(path, TwoStageUNet(get_config("tiny")), {"kind": "test"})
    with tracking.start_run("finetune-revox-a77", run_name="register", workspace=workspace):
        mlflow.log_text(REPORT, "report/report.html")  # as `finetune` logs its report beside the model
        version = model_registry.register_checkpoint(path, MODEL, tags={"device": "revox-a77"}, workspace=workspace)
    model_registry.set_alias(MODEL, "champion", version, workspace)
    return workspace


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port`, from the kernel's tables (no `ss` needed)."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):  # tcp6 is absent where IPv6 is off
        for line in (table.read_text().splitlines()[1:] if table.exists() else []):
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.slow  # end to end: a real MLflow server process
def test_ui_serves_the_registry_over_http_on_localhost(registered):
    port = free_port()
    env = {**os.environ, "WORKBENCH_HOME": str(registered.root)}
    server = subprocess.Popen([sys.executable, "-m", "workbench", "ui", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name={MODEL}"
    answer, deadline = None, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = get_json(url)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert answer is not None, f"no answer from {url}: {server.stdout.read1().decode() if server.poll() is not None else 'still starting'}"
        model = answer["registered_model"]
        assert model["name"] == MODEL
        assert {a["alias"]: a["version"] for a in model["aliases"]} == {"champion": "1"}
        versions = get_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/model-versions/search?filter=name%3D%27{MODEL}%27")
        assert [v["version"] for v in versions["model_versions"]] == ["1"]
        # The UI serves the version's run artifacts (the report) from the workspace's artifact folder.
        run_id = versions["model_versions"][0]["run_id"]
        listed = get_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=report")
        assert [f["path"] for f in listed["files"]] == ["report/report.html"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/get-artifact?path=report/report.html&run_uuid={run_id}",
                                    timeout=5) as response:
            assert response.read().decode() == REPORT
        # It listens on the loopback interface only.
        listening = listening_addresses(port)
        assert listening == {"127.0.0.1"}, listening
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    # Our SIGTERM stopped it cleanly (not the SIGKILL fallback, not a crash), and nothing listens on the port any more.
    assert server.returncode == 0, (server.returncode, server.stdout.read().decode(errors="replace")[-2000:])
    deadline = time.monotonic() + 10
    while listening_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening_addresses(port), listening_addresses(port)


def test_ui_refuses_a_tracking_server_uri_and_a_bad_port(workspace, cli, monkeypatch):
    result = cli("ui", "--port", "70000")
    assert result.code == 2 and "--port 70000" in result.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    result = cli("ui")
    assert result.code == 2 and "already a tracking server" in result.stderr
