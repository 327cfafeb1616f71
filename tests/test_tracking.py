"""MLflow: the workspace store (created once, safely), lineage inputs, the registry, pyfunc models, fetching."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from workbench import model_registry, tracking
from workbench.errors import WorkbenchError


@pytest.fixture
def checkpoint(tmp_path):
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import SIZES, TwoStageUNet

    torch.manual_seed(0)
    model = TwoStageUNet(SIZES["tiny"])
    path = tmp_path / "ckpt" / "tiny.safetensors"
    save_checkpoint(path, model, {"kind": "test"})
    return path, model


@pytest.mark.slow  # end to end: processes racing to create the store
def test_store_is_the_workspace_sqlite_and_is_created_once_by_concurrent_processes(workspace):
    script = ("import sys; from pathlib import Path; from workbench.workspace import Workspace; from workbench import tracking; "
              "tracking.experiment_id('race', Workspace(Path(sys.argv[1])))")
    racers = [subprocess.Popen([sys.executable, "-c", script, str(workspace.root)], stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    for racer in racers:
        assert racer.wait(timeout=120) == 0, racer.stderr.read()
    assert workspace.mlflow_db.is_file()
    mlflow = tracking.configure(workspace)
    assert mlflow.get_tracking_uri() == f"sqlite:///{workspace.mlflow_db}"
    experiment = mlflow.get_experiment_by_name("race")
    assert experiment.artifact_location == (workspace.mlflow_artifacts / "race").as_uri()
    assert len(mlflow.search_experiments(filter_string="name = 'race'")) == 1


def test_step_metrics_logged_faster_than_the_store_writes_all_arrive_also_from_a_failed_run(workspace):
    # A fast GPU logs thousands of steps a minute: every one must reach the store, in order, including
    # those still held when the run ends, and when it ends with an error.
    with pytest.raises(RuntimeError, match="diverged"):
        with tracking.start_run("fast", run_name="fast") as run:
            for step in range(1, 2501):
                tracking.log_metrics({"train_loss": 1.0 / step, "learning_rate": 1e-3}, step)
            raise RuntimeError("diverged")
    stored = tracking.client().get_run(run.info.run_id)
    assert stored.info.status == "FAILED"
    history = tracking.client().get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 2501))
    assert history[-1].value == pytest.approx(1 / 2500)
    # Nested runs: each step goes to the run that was active when it was logged.
    with tracking.start_run("fast", run_name="parent") as parent:
        tracking.log_metrics({"best": 1.0}, 0)
        with tracking.start_run("fast", run_name="child", nested=True) as child:
            tracking.log_metrics({"train_loss": 0.5}, 1)
        tracking.log_metrics({"best": 2.0}, 1)
    assert [m.value for m in tracking.client().get_metric_history(parent.info.run_id, "best")] == [1.0, 2.0]
    assert [m.value for m in tracking.client().get_metric_history(child.info.run_id, "train_loss")] == [0.5]
    assert tracking.client().get_metric_history(parent.info.run_id, "train_loss") == []


def test_a_run_logs_recipe_metrics_system_and_datasets(tiny_archive):
    from workbench.corpus import corpus_files
    from workbench.noise.library import NoiseLibrary
    from workbench.recipes import load_recipe, recipe_params

    recipe = load_recipe("pretrain-paper")
    snippets = NoiseLibrary(tiny_archive).snippets(split="train")
    clean = corpus_files(tiny_archive, "train")
    with tracking.start_run("lineage-test", run_name="lineage") as run:
        tracking.log_recipe(recipe)
        tracking.log_system_info("cpu")
        tracking.log_metrics({"train_loss": 0.5}, step=1)
        tracking.log_metrics({"train_loss": 0.25}, step=2)
        lineage = tracking.log_lineage(tiny_archive, {"training": snippets}, {"training": clean})
    stored = tracking.client().get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == recipe_params(recipe)
    assert stored.data.tags["system.torch"] == torch.__version__
    history = tracking.client().get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    inputs = {d.dataset.name: d for d in stored.inputs.dataset_inputs}
    assert set(inputs) == {"noise-library-training", "clean-corpus-training"}
    assert inputs["noise-library-training"].dataset.digest == NoiseLibrary.digest(snippets)[:32]
    assert inputs["clean-corpus-training"].dataset.digest == lineage["corpus"]["training"]["digest"]
    assert {t.key: t.value for t in inputs["noise-library-training"].tags}["mlflow.data.context"] == "training"
    assert lineage["noise"]["training"]["devices"] == ["revox-a77", "technics-tr575-a", "uher-4000-l"]


def test_register_alias_fetch_and_pyfunc_predict(tiny_archive, checkpoint, tmp_path, capfd):
    import mlflow

    from workbench.model.overlap_add import ChunkPlan, process_whole
    from workbench.model.stft import HOP
    from workbench.model.unet import denoise_waveform

    path, model = checkpoint
    capfd.readouterr()
    first = model_registry.register_checkpoint(path, model_registry.GENERAL_MODEL, tags={"source": "test"}, description="first")
    second = model_registry.register_checkpoint(path, model_registry.GENERAL_MODEL, description="second")
    # MLflow's own "Successfully registered model ..." / "Created version ..." / "INFO mlflow.pyfunc: Validating
    # input example ..." lines stay out of our output.
    captured = capfd.readouterr()
    printed = captured.err + captured.out
    assert not [word for word in ("registered model", "Created version", "Validating", "INFO mlflow") if word in printed], printed
    assert (first, second) == (1, 2) and model_registry.latest_version(model_registry.GENERAL_MODEL) == 2
    model_registry.set_alias(model_registry.GENERAL_MODEL, "base", first)
    assert model_registry.get_alias_version(model_registry.GENERAL_MODEL, "base") == 1
    assert model_registry.get_alias_version(model_registry.GENERAL_MODEL, "champion") is None
    version = tracking.client().get_model_version(model_registry.GENERAL_MODEL, "1")
    assert version.description == "first" and version.tags["source"] == "test"

    fetched, facts = model_registry.fetch_checkpoint("models:/tape-denoiser-general@base")
    assert fetched.suffix == ".safetensors" and fetched.with_suffix(".json").is_file()
    assert fetched.read_bytes() == path.read_bytes() and fetched.is_relative_to(tiny_archive.registry / model_registry.CACHE_DIR)
    assert facts["version"] == 1 and facts["aliases"] == ["base"] and facts["uri"] == "models:/tape-denoiser-general/1"
    assert model_registry.fetch_checkpoint("models:/tape-denoiser-general/latest")[1]["version"] == 2

    for bad, message in (("models:/tape-denoiser-nothing/1", "no registered model"),
                         ("models:/tape-denoiser-general@champion", "no alias @champion"),
                         ("models:/tape-denoiser-general/7", "no version 7"),
                         ("runs:/abc/model", "not a registered-model URI")):
        with pytest.raises(WorkbenchError, match=message) as error:
            model_registry.fetch_checkpoint(bad)
        assert "\n" not in str(error.value)

    loaded = mlflow.pyfunc.load_model("models:/tape-denoiser-general/1")
    artifacts = mlflow.artifacts.list_artifacts(artifact_uri="models:/tape-denoiser-general/1/artifacts")
    assert sorted(a.path.rsplit("/", 1)[-1] for a in artifacts) == ["tiny.json", "tiny.safetensors"]
    inside = loaded.unwrap_python_model().model.state_dict()
    assert all(torch.equal(inside[k].cpu(), v) for k, v in model.state_dict().items())
    rng = np.random.default_rng(0)
    mono = (0.1 * rng.standard_normal(20_000)).astype(np.float32)
    restored = loaded.predict(mono)
    assert restored.shape == mono.shape and restored.dtype == np.float32
    # One chunk: exactly the network on the signal with mirrored context, as `workbench denoise` does it.
    plan = ChunkPlan.from_seconds(grid_frames=HOP * 2 ** model.config.depth)
    expected = process_whole(lambda chunk: denoise_waveform(model.eval(), chunk), mono[None], plan)[0]
    if torch.cuda.is_available():  # on a GPU the network runs under bfloat16 autocast, as `workbench denoise` does
        error_db = 10 * np.log10(np.sum(expected**2) / np.sum((restored - expected) ** 2))
        assert error_db > 30, f"pyfunc output differs from the CPU float32 path by only {error_db:.1f} dB"
    else:
        assert np.allclose(restored, expected, atol=1e-5)
    # The signature says what it takes: mono float32 audio at 44.1 kHz, any length; MLflow holds callers to it.
    signature = loaded.metadata.signature
    assert signature is not None
    assert signature.inputs.to_dict() == signature.outputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1,)}}]
    example = loaded.input_example
    assert example.dtype == np.float32 and example.ndim == 1 and 100 <= example.shape[0] <= 1000
    assert loaded.predict(example).shape == example.shape
    stereo = np.stack([mono, -mono])
    with pytest.raises(mlflow.exceptions.MlflowException, match="does not match expected shape"):
        loaded.predict(stereo)
    assert np.stack([loaded.predict(channel) for channel in stereo]).shape == stereo.shape


def test_registering_a_missing_checkpoint_is_one_line(workspace, tmp_path):
    with pytest.raises(WorkbenchError, match="no such checkpoint"):
        model_registry.register_checkpoint(tmp_path / "none.safetensors", model_registry.GENERAL_MODEL)


def test_register_checkpoint_command_registers_an_outside_checkpoint_with_its_alias(tiny_archive, checkpoint, cli):
    path, _ = checkpoint
    result = cli("checkpoint", "register", path, "--alias", "base", "--json")
    assert result.code == 0, result.stderr
    assert result.json() == {"name": "tape-denoiser-general", "version": 1, "alias": "base",
                             "model_uri": "models:/tape-denoiser-general/1"}
    version = tracking.client().get_model_version("tape-denoiser-general", "1")
    assert version.tags["size"] == "tiny" and version.tags["lineage.kind"] == "test"
    assert model_registry.get_alias_version("tape-denoiser-general", "base") == 1
    damaged = path.with_name("damaged.safetensors")
    damaged.write_bytes(path.read_bytes()[:-100])
    path.with_suffix(".json").rename(damaged.with_suffix(".json"))
    refused = cli("checkpoint", "register", damaged)
    assert refused.code == 2 and "damaged.safetensors" in refused.stderr
    assert model_registry.latest_version("tape-denoiser-general") == 1
