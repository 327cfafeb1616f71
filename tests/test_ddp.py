"""Data-parallel pretraining: `torchrun --nproc-per-node 2 -m workbench pretrain` on CPU with gloo.

Two processes each take half of every global batch and average their gradients, so the run must match a
single process training on the whole batch (to float rounding), while only rank 0 writes and registers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_recipe
from workbench import tracking


@pytest.mark.slow  # end to end: two torchrun-style pretrain processes
def test_two_gloo_processes_train_like_one_and_register_once(tiny_archive, tmp_path):
    recipe = tmp_path / "ddp-tiny.toml"
    recipe.write_text(tiny_recipe("ddp-tiny", seed=8, schedule_extra="learning_rate = 3e-3"))
    env = {**os.environ, "WORKBENCH_HOME": str(tiny_archive.root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "workbench", "pretrain", "--recipe", str(recipe), "--accelerator", "cpu", "--json"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    distributed = json.loads(finished.stdout)  # only rank 0 prints
    assert distributed["step"] == 4 and distributed["version"] == 1

    from workbench.train.pretrain import pretrain

    single = pretrain(tiny_archive, recipe, accelerator="cpu", num_workers=0)
    assert single.version == 2
    assert distributed["initial"]["val_loss"] == pytest.approx(single.initial["val_loss"], rel=1e-6)
    assert distributed["last"]["val_loss"] == pytest.approx(single.history[-1]["val_loss"], rel=1e-4)

    client = tracking.client(tiny_archive)
    run = client.get_run(distributed["run_id"])
    assert run.data.tags["system.world_size"] == "2" and run.info.status == "FINISHED"
    assert run.data.tags["training.autocast"] == "none"  # tiny trains in float32 whatever the CPU
    losses = {name: [m.value for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)]
              for name, run_id in (("ddp", distributed["run_id"]), ("single", single.run_id))}
    assert len(losses["ddp"]) == 4 and losses["ddp"] == pytest.approx(losses["single"], rel=1e-4)
    versions = client.search_model_versions("name = 'tape-denoiser-general'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    runs_of_recipe = list(tiny_archive.runs_dir.glob("pretrain-ddp-tiny-*"))
    assert len(runs_of_recipe) == 2  # one directory per run, not one per process
