"""Many chunks per forward call (`OverlapAdd(batch=...)`, `denoise --batch`): the same output as chunk by
chunk, within 1e-5 of its peak, for any file length and any batch size; the batch comes from a memory budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.audio.io import read_audio, write_audio
from workbench.model.overlap_add import ChunkPlan, OverlapAdd, chunk_batch, denoise_samples, model_grid_frames, model_process
from workbench.model.checkpoint import save_checkpoint
from workbench.model.unet import SIZES, TwoStageUNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return TwoStageUNet(SIZES["tiny"]).eval()


def _overlap_add(process, samples: np.ndarray, plan: ChunkPlan, batch: int, block: int) -> tuple[np.ndarray, int]:
    """Push `samples` in blocks of `block` frames; the output and the number of process calls."""
    calls = []

    def counted(chunk):
        calls.append(chunk.shape)
        return process(chunk)

    chunker, outputs = OverlapAdd(counted, samples.shape[0], plan, batch=batch), []
    for start in range(0, samples.shape[1], block):
        outputs.append(chunker.push(samples[:, start:start + block]))
    outputs.append(chunker.flush())
    return np.concatenate(outputs, axis=1), len(calls)


@pytest.mark.parametrize("frames", [1, 999, 1000, 4321, 12_345])
@pytest.mark.parametrize("batch", [2, 3, 16])
def test_batched_overlap_add_equals_chunk_by_chunk_for_a_linear_process(frames, batch):
    rng = np.random.default_rng(frames)
    samples = rng.normal(size=(2, frames)).astype(np.float32)
    plan = ChunkPlan(chunk_frames=1000, overlap_frames=400, context_frames=64)
    kernel = torch.tensor(rng.normal(size=63), dtype=torch.float32)[None, None]

    def fir(chunk):  # row by row, as a model process treats its rows
        return torch.nn.functional.conv1d(chunk[:, None], kernel, padding=31)[:, 0]

    single, single_calls = _overlap_add(fir, samples, plan, batch=1, block=777)
    batched, batched_calls = _overlap_add(fir, samples, plan, batch=batch, block=777)
    assert batched.shape == single.shape == samples.shape
    assert np.max(np.abs(batched - single)) <= 1e-5 * max(1.0, float(np.abs(single).max()))
    if single_calls > 2:  # full batches of equal chunks (the shorter last chunk goes on its own)
        assert batched_calls < single_calls


def test_batched_unet_equals_chunk_by_chunk(tiny_model, batch=3):
    rng = np.random.default_rng(3)
    samples = (0.3 * np.sin(np.arange(44_100 + 517) * 0.05) + 0.05 * rng.normal(size=44_100 + 517))
    samples = np.stack([samples, samples[::-1]]).astype(np.float32)  # two channels
    grid = model_grid_frames(tiny_model)
    plan = ChunkPlan.from_seconds(0.25, overlap_seconds=0.05, context_seconds=0.1, grid_frames=grid)
    process = model_process(tiny_model, torch.device("cpu"))
    single, single_calls = _overlap_add(process, samples, plan, batch=1, block=10_000)
    batched, batched_calls = _overlap_add(process, samples, plan, batch=batch, block=10_000)
    assert single_calls >= 4 and batched_calls < single_calls
    assert np.max(np.abs(batched - single)) <= 1e-5 * float(np.abs(single).max())
    # denoise_samples (pyfunc, evaluation) batches by default: the same result.
    in_memory = denoise_samples(tiny_model, samples, plan=plan)
    assert np.max(np.abs(in_memory - single)) <= 1e-5 * float(np.abs(single).max())


def test_batch_follows_the_memory_budget(tiny_model):
    plan = ChunkPlan.from_seconds(grid_frames=model_grid_frames(tiny_model))
    cpu = torch.device("cpu")
    default = chunk_batch(tiny_model, plan, cpu)
    assert default >= 2  # the tiny network's 5 s chunks are small
    assert chunk_batch(tiny_model, plan, cpu, budget_bytes=1) == 1  # never below one chunk
    assert chunk_batch(tiny_model, plan, cpu, budget_bytes=4 << 30) > default
    assert chunk_batch(tiny_model, plan, cpu, channels=2) <= default // 2 + 1
    with torch.device("meta"):
        paper = TwoStageUNet(SIZES["paper"])
    assert chunk_batch(paper, plan, cpu) < default  # wider network, fewer chunks per call


def test_cli_batch_gives_the_same_file_and_is_recorded(tmp_path, cli, tiny_model):
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(checkpoint, tiny_model, lineage={"source": "test: random weights, seed 0"})
    rng = np.random.default_rng(5)
    source = tmp_path / "reel.wav"
    write_audio(source, (0.1 * rng.normal(size=(1, 44_100 + 999))).astype(np.float32), 44_100, subtype="FLOAT")
    outputs = {}
    for batch in ("1", "4"):
        target = tmp_path / f"out-{batch}.wav"
        result = cli("denoise", "--model", checkpoint, source, "-o", target, "--chunk-seconds", "0.5",
                     "--batch", batch, "--json")
        assert result.code == 0, result.stderr
        assert json.loads(target.with_name(target.name + ".json").read_text())["chunks_per_forward"] == int(batch)
        outputs[batch] = read_audio(target)[0]
    assert np.max(np.abs(outputs["4"] - outputs["1"])) <= 1e-5 * float(np.abs(outputs["1"]).max())
    refused = cli("denoise", "--model", checkpoint, source, "-o", tmp_path / "x.wav", "--batch", "0")
    assert refused.code == 2 and not (tmp_path / "x.wav").exists()
