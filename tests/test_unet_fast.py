"""The U-Net's fast path (one-allocation padding, in-place ELU, the frequency embedding's convolution once
per bin, 1×1 projections before upsampling, and dense blocks either in one preallocated channels-first buffer
or as per-part convolutions channels-last) computes the same function as the plain reference code
(`reference_path()`), forward and backward, in either layout."""

from __future__ import annotations

import pytest
import torch

from workbench.model.stft import FREQ_BINS
from workbench.model.unet import SIZES, ModelConfig, TwoStageUNet, mirror_pad, reference_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = {
    "tiny": SIZES["tiny"],
    "small": SIZES["small"],
    # Three dense layers at every level, odd channel counts: every slice of the buffer is exercised.
    "odd": ModelConfig("odd", (5, 7, 9), dense_layers=3),
}


def _model(name: str) -> TwoStageUNet:
    torch.manual_seed(0)
    return TwoStageUNet(CONFIGS[name])


@pytest.mark.parametrize("kernel", [1, 3, 4, 7])
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 2, 2, 5), (1, 1, 1, 1)])
def test_mirror_pad_fast_equals_reference(kernel, shape):
    x = torch.randn(shape)
    with reference_path():
        expected = mirror_pad(x, kernel)
    assert torch.equal(mirror_pad(x, kernel), expected)
    assert torch.equal(mirror_pad(x.contiguous(memory_format=torch.channels_last), kernel), expected)


@pytest.mark.parametrize(("name", "frames"), [("tiny", 1), ("tiny", 37), ("small", 40), ("odd", 23)])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_fast_path_equals_reference_path(name, frames, grad):
    """Inference (no padding at all, sums inside oneDNN) and a forward pass under autograd (parts padded once)."""
    model = _model(name).train(grad)
    spec = 3 * torch.randn(2, 2, frames, FREQ_BINS)
    with torch.set_grad_enabled(grad):
        with reference_path():
            reference = model(spec)
        fast = model(spec)
        channels_last = model.to(memory_format=torch.channels_last)(spec.contiguous(memory_format=torch.channels_last))
    for got in (fast, channels_last):
        for output, expected in zip(got, reference):
            assert output.shape == expected.shape
            assert (output - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize(("name", "frames"), [("tiny", 19), ("odd", 23)])
def test_training_gradients_fast_path_equal_reference_path(name, frames):
    model = _model(name).train()
    spec, clean = torch.randn(2, 2, frames, FREQ_BINS), torch.randn(2, 2, frames, FREQ_BINS)

    def gradients():
        model.zero_grad()
        s1, s2 = model(spec)
        ((s2 - clean).abs().mean() + (s1 - clean).abs().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    with reference_path():
        expected = gradients()
    got = gradients()
    assert got.keys() == expected.keys()
    for key, grad in got.items():
        scale = expected[key].abs().max().item()
        assert (grad - expected[key]).abs().max().item() <= 1e-5 * max(scale, 1e-3), key


def test_reference_path_switch_is_restored_after_an_error():
    from workbench.model import unet

    with pytest.raises(RuntimeError), reference_path():
        assert not unet._fast_path
        raise RuntimeError("inside")
    assert unet._fast_path


@pytest.mark.parametrize("grad", [False, True])
def test_channels_last_holds_through_the_whole_network(grad):
    """Once the input is channels-last, every convolution reads channels-last: a layer that fell back to
    channels-first (a cropped view once did, and all the decoder after it) costs a reorder per call."""
    from torch.overrides import TorchFunctionMode

    convolutions = {torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d}
    seen = []

    class RecordConvolutionInputs(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in convolutions:
                seen.append((tuple(args[0].shape), args[0].stride()))
            return func(*args, **(kwargs or {}))

    model = _model("tiny").train(grad)
    spec = torch.randn(1, 2, 37, FREQ_BINS)
    with torch.set_grad_enabled(grad), RecordConvolutionInputs():
        s1, s2 = model(spec)
    assert s1.is_contiguous() and s2.is_contiguous(), "whatever the layout inside, the outputs come back channels-first"
    assert len(seen) >= 30, "the network's convolutions were recorded"
    # Channels innermost (stride 1) wherever there is more than one channel; the frequency embedding's
    # once-per-bin convolution reads a single row, where the layouts coincide.
    flipped = [shape for shape, stride in seen if shape[1] > 1 and shape[2] > 1 and stride[1] != 1]
    assert not flipped, f"convolution inputs not channels-last: {flipped}"


def test_bf16_training_keeps_every_feature_map_in_bf16():
    """Under CPU bf16 autocast (how `auto` trains the wider networks on a CPU with bf16 in hardware) a training
    step casts only the 2-channel spectra in and out. CPU autocast runs replication padding in float32, and a
    padded map that came back float32 was cast to bf16 again by every convolution reading it, and its gradient
    back: 127 casts of feature maps in this step before `_replicate_pad` kept the padding in bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    casts = []

    class RecordCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype", args[0].dtype) != args[0].dtype:
                casts.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    model = _model("tiny").train().to(memory_format=torch.channels_last)
    spec, clean = torch.randn(2, 2, 24, FREQ_BINS), torch.randn(2, 2, 24, FREQ_BINS)
    with RecordCasts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s1, s2 = model(spec)
        assert s2.dtype == torch.bfloat16  # (S1 adds the float32 input spectrum: float32)
        ((s1.float() - clean).abs().mean() + (s2.float() - clean).abs().mean()).backward()
    # Full-size maps only, not the frequency embedding's single row.
    full_size = [shape for shape in casts if len(shape) == 4 and shape[-2] > 1 and shape[-1] >= FREQ_BINS // 2]
    assert full_size, "the spectra are cast: the recording saw the step"
    assert all(shape[1] == 2 for shape in full_size), f"feature maps cast: {[s for s in full_size if s[1] != 2]}"
    assert all(parameter.grad is not None and parameter.grad.dtype == torch.float32 for parameter in model.parameters())


def test_cpu_inference_pads_no_dense_block_input(monkeypatch):
    """Channels-last inference convolves with oneDNN's zero padding and adds the mirrored border back
    (`_replicate_conv3x3`): the only 3×3 paddings left are the attention module's two and the output
    convolution's, however deep the network. Under autograd every dense-block part is padded once."""
    from workbench.model import unet

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    padded = []
    original = unet.mirror_pad
    monkeypatch.setattr(unet, "mirror_pad", lambda x, kernel: padded.append(kernel) or original(x, kernel))
    model, spec = _model("small"), torch.randn(1, 2, 21, FREQ_BINS)
    with torch.inference_mode():
        model(spec)
    assert padded.count(3) == 3, padded
    padded.clear()
    model(spec)  # training: parts padded, each once
    assert padded.count(3) > 3 * len(model.config.channels)


def test_for_inference_lays_weights_out_channels_last_and_computes_the_same(tmp_path):
    from workbench.model.checkpoint import load_checkpoint, save_checkpoint
    from workbench.model.unet import for_inference

    model, spec = _model("odd").eval(), torch.randn(1, 2, 9, FREQ_BINS)
    with torch.inference_mode():
        expected = model(spec)[1]
        prepared = for_inference(model)
        assert prepared.input_conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert not prepared.input_conv1.weight.is_contiguous()
        assert torch.equal(prepared(spec)[1], expected)
    save_checkpoint(tmp_path / "m.safetensors", prepared)  # safetensors wants dense tensors: saved as such
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    with torch.inference_mode():
        assert torch.equal(loaded(spec)[1], expected)
