"""Checkpoints: safetensors + JSON sidecar round trip, shape checks, and refusals of bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from workbench.audio.io import sha256_file
from workbench.errors import WorkbenchError
from workbench.model.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from workbench.model.stft import FREQ_BINS
from workbench.model.unet import SIZES, ModelConfig, TwoStageUNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TwoStageUNet(SIZES["tiny"]).eval()
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model, lineage={"source": "test", "parent": None})
    return path, model


def test_round_trip_gives_the_same_weights_and_outputs(tiny_checkpoint):
    path, model = tiny_checkpoint
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    spec = torch.randn(1, 2, 9, FREQ_BINS)
    with torch.no_grad():
        assert torch.equal(loaded(spec)[1], model(spec)[1])
    assert info["size"] == "tiny" and info["lineage"] == {"source": "test", "parent": None}


def test_sidecar_describes_the_weights(tiny_checkpoint):
    path, model = tiny_checkpoint
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["architecture"] == "two-stage-unet"
    assert info["config"] == SIZES["tiny"].to_dict()
    assert info["sample_rate"] == 44_100
    assert info["stft"]["n_fft"] == 2048 and info["stft"]["hop_length"] == 512 and info["stft"]["center"] is False
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["weights_sha256"] == sha256_file(path)
    assert not list(path.parent.glob("*.partial*")), "no temporary files left behind"


def test_weights_without_sidecar_load_from_the_header(tiny_checkpoint):
    path, model = tiny_checkpoint
    assert read_checkpoint_info(path)["weights_sha256"] == sha256_file(path)
    path.with_suffix(".json").unlink()
    assert read_checkpoint_info(path)["size"] == "tiny"
    loaded, info = load_checkpoint(path)
    assert info["config"] == SIZES["tiny"].to_dict()
    assert torch.equal(loaded.output_conv.weight, model.output_conv.weight)


def test_mismatched_weights_are_refused_with_the_exact_list(tiny_checkpoint, tmp_path):
    path, model = tiny_checkpoint
    state = {name: t.clone() for name, t in model.state_dict().items()}
    del state["sam.mask_conv.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["output_conv.weight"] = torch.zeros(2, 4, 5, 5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    bad.with_suffix(".json").write_text(json.dumps({"format": "workbench-checkpoint",
                                                   "config": SIZES["tiny"].to_dict(), "size": "tiny"}))
    with pytest.raises(WorkbenchError) as caught:
        load_checkpoint(bad)
    message = str(caught.value)
    assert "1 missing: sam.mask_conv.bias" in message
    assert "1 unexpected: extra.weight" in message
    assert "1 mis-shaped: output_conv.weight (2, 4, 5, 5) (expected (2, 4, 3, 3))" in message


def test_a_checkpoint_of_another_size_is_refused(tiny_checkpoint):
    path, _ = tiny_checkpoint
    info = json.loads(path.with_suffix(".json").read_text())
    info["config"] = SIZES["small"].to_dict()
    info.pop("weights_sha256")
    path.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(WorkbenchError, match="does not fit the 'small' network: .*mis-shaped"):
        load_checkpoint(path)


def test_corrupt_and_missing_files_are_one_clear_line(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkbenchError, match="do not match the sha256"):
        load_checkpoint(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(WorkbenchError, match="not a readable safetensors checkpoint"):
        load_checkpoint(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(WorkbenchError, match="garbage.safetensors: not a readable safetensors checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(WorkbenchError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(WorkbenchError, match="garbage.safetensors: not a readable safetensors checkpoint"):
        read_checkpoint_info(garbage)


def test_custom_configs_round_trip(tmp_path):
    config = ModelConfig("custom", (4, 6, 8), dense_layers=1)
    model = TwoStageUNet(config)
    save_checkpoint(tmp_path / "c.safetensors", model)
    loaded, info = load_checkpoint(tmp_path / "c.json")  # either file of the pair names the checkpoint
    assert loaded.config == config and info["size"] == "custom"
