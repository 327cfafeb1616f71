"""The two-stage U-Net denoiser of Moliner & Välimäki (ICASSP 2022), as used for tape noise by Irigaray et al.

Written in PyTorch to match the published TensorFlow/Keras network (eloimoliner/denoising-historical-
recordings, `unet.py`) layer for layer, so that its published weights import exactly:

- input: the complex spectrum as 2 channels (B, 2, frames, 1025); the model itself appends the 10 fixed
  frequency channels cos(2^j·π·k/1024), j = 0..9, after [real, imag] (12 channels in all);
- every convolution is VALID after explicit mirrored padding (TF "SYMMETRIC": the edge sample repeats);
  odd kernels pad k//2 on both sides, the 4×4 stride-2 downsamplers pad 2 before and 1 after;
- dense block: `dense_layers` (3 in the paper) 3×3 conv + ELU layers; layer i sees [output i-1, output i-2, ..., block input]
  (newest first, as the reference concatenates) and the block returns only its last layer's output;
  I-block = dense block + 1×1 projection of the block input (no activation), summed;
- encoder level i: I-block with channels[i] (the skip), then 4×4 stride-2 conv + ELU to channels[i+1];
  bottleneck: I-block with channels[depth];
- decoder level i: 4×4 stride-2 transposed conv + ELU of the UNPADDED input (the reference computes a
  padded copy and then ignores it), plus nearest ×2 upsampling (followed by 1×1 conv + ELU only when
  the channel count changes), the transposed conv's output centre-cropped to the upsampled size and
  added; the sum centre-cropped to the skip and concatenated BEFORE it; then an I-block;
- stage 1: 7×7 conv + ELU (12 -> channels[0]), U-Net, supervised attention module (SAM): 3×3 conv of
  the features gives a residual r, S1 = X + r; M = sigmoid(3×3 conv of S1); Fout = (3×3 conv of the
  features) ⊙ M + features;
- stage 2: its own 7×7 conv + ELU of the 12-channel input, concatenated before Fout, U-Net, then a 3×3
  conv to 2 channels = S2, the clean estimate. No normalisation anywhere. `forward` returns (S1, S2);
  the Keras model's outputs are in the other order, [S2, S1].

Checked against the reference built with TensorFlow 2.15 (random weights imported through
`keras_import`): on a 5 s music-like spectrum (431 frames, values up to 86) the largest difference in
S2 was 9.5e-5 and in S1 6.1e-5, the float32 rounding level (TF's own float32 output differs from a
float64 evaluation of the same network by up to 4.1e-5).

Weights start from PyTorch's default (fan-in scaled) initialisation, not the reference's Keras
TruncatedNormal(σ = 0.05): without normalisation that fixed σ makes the paper-size network's untrained
output ~1e8 times its input, while the fan-in scaled start gives S1 ≈ X and a small S2 at every size.
Any number of frames works: mirrored padding wider than a (tiny) feature map keeps mirroring, and the
decoder crops to the skip shapes as the reference does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.errors import WorkbenchError
from workbench.model.stft import FREQ_BINS, N_FFT, SAMPLE_RATE, analysis, synthesis
from workbench.recipes import LOSSES

FREQ_EMBEDDINGS = 10
INPUT_KERNEL = 7
DOWN_KERNEL = 4  # stride 2 + 2, as the reference sizes its (de)convolutions
DOWN_STRIDE = 2


@dataclass(frozen=True)
class ModelConfig:
    """Plain-data description of one network; `SIZES` names the ones recipes pick."""

    size: str
    channels: tuple[int, ...]  # channels per level: channels[0] at full resolution .. channels[depth]
    dense_layers: int = 3  # conv layers per dense block ("num_tfc")
    freq_bins: int = FREQ_BINS
    freq_embeddings: int = FREQ_EMBEDDINGS

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        assert len(self.channels) >= 2, "a U-Net needs at least one downsampling level"
        assert all(c > 0 for c in self.channels) and self.dense_layers >= 1

    @property
    def depth(self) -> int:
        return len(self.channels) - 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


SIZES: dict[str, ModelConfig] = {
    # The published configuration: exactly 71,408,196 parameters, importable from the Keras checkpoint.
    "paper": ModelConfig("paper", (32, 64, 64, 128, 128, 256, 512)),
    # Half the width and two levels fewer: 2.7 M parameters, for fine-tuning experiments on a CPU.
    "small": ModelConfig("small", (16, 32, 32, 64, 64)),
    # For tests and demos (56 k parameters): trains in seconds on a CPU.
    "tiny": ModelConfig("tiny", (4, 8, 8, 16), dense_layers=2),
}


def get_config(size: str) -> ModelConfig:
    if size not in SIZES:
        raise WorkbenchError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    return SIZES[size]


# ---------------------------------------------------------------------------------------------- fast path
#
# The same function computed with fewer full-size copies (the forward pass spent a quarter of its time in
# `cat`): mirrored padding in one allocation (for 3×3 kernels TF's one-sample SYMMETRIC pad *is* replicate
# padding, one native op), ELU in place on convolution outputs (a convolution does not keep its output for
# the backward pass, so autograd allows it), channels-last activations, dense blocks that never concatenate their
# growing stack (one convolution per part; in training each part padded once, in CPU inference none padded at
# all and the parts' convolutions summed inside oneDNN), the frequency embedding's share of the input
# convolutions computed once per bin (`_input_conv`), and the decoder's 1×1 projections applied before
# upsampling.
# `reference_path()` switches all of it off: the plain layer-for-layer code, kept as the definition the fast
# path is tested against (tests/test_unet_fast.py).

_fast_path = True


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Run the plain reference code (concatenate, pad by copying, out-of-place ELU) inside this block."""
    global _fast_path
    previous, _fast_path = _fast_path, False
    try:
        yield
    finally:
        _fast_path = previous


def _no_grad(*tensors: Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _elu(x: Tensor) -> Tensor:
    """ELU of a fresh convolution output, in place on the fast path."""
    return F.elu(x, inplace=_fast_path)


# The fast path runs channels-last everywhere (oneDNN's NHWC kernels: no reorder per call, no padding of a
# 4-channel map to 16-channel blocks; cuDNN's bf16 kernels want it too). Paper-size inference on a CPU had kept
# channels-first dense blocks in one preallocated buffer while channels-last still copied every padded part;
# since channels-last inference pads nothing (`_replicate_conv3x3`) and sums its per-part convolutions inside
# oneDNN (`_convolve_into`), it is the faster at every size. Measured on 2 cores, the same weights in both
# layouts interleaved in one process, a 5 s chunk of paper size, two runs of 4 passes each: best 3.86 / 3.84 s
# channels-last against 4.28 / 5.43 s, medians 4.26 / 4.30 against 5.49 / 5.70 s.


def _channels_last(x: Tensor) -> bool:
    """Whether `x` is laid out channels-last: channels innermost. Strides, not contiguity, decide: a
    cropped view of a channels-last map is contiguous in neither format but must stay channels-last."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(-1) == x.shape[1] \
        and x.stride(-1) < x.stride(-2)


def _symmetric_pad(x: Tensor, before: int, after: int) -> Tensor:
    """TF SYMMETRIC padding of the last two dimensions in one allocation (needs before, after <= size)."""
    t, f = x.shape[-2:]
    layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
    out = torch.empty((*x.shape[:-2], t + before + after, f + before + after), dtype=x.dtype, device=x.device,
                      memory_format=layout)
    _fill_symmetric(out, x, before, after)
    return out


def _fill_symmetric(out: Tensor, x: Tensor, before: int, after: int) -> None:
    """Write `x` into the middle of `out` and mirror its edges around it (edge sample repeated)."""
    t, f = x.shape[-2:]
    assert before <= min(t, f) and after <= min(t, f) and out.shape[-2:] == (t + before + after, f + before + after)
    out[..., before:before + t, before:before + f] = x
    # Rows first, then whole columns (corners included) from the row-padded middle.
    if before:
        out[..., :before, before:before + f] = x[..., :before, :].flip(-2)
    if after:
        out[..., before + t:, before:before + f] = x[..., t - after:, :].flip(-2)
    if before:
        out[..., :, :before] = out[..., :, before:2 * before].flip(-1)
    if after:
        out[..., :, before + f:] = out[..., :, before + f - after:before + f].flip(-1)


# ---------------------------------------------------------------------------------------------- layers

def _mirror_pad_dim(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    n = x.shape[dim]
    if before == 0 and after == 0:
        return x
    if before <= n and after <= n:  # TF "SYMMETRIC": the edge sample itself is repeated
        parts = [x.narrow(dim, 0, before).flip(dim), x, x.narrow(dim, n - after, after).flip(dim)]
        return torch.cat(parts, dim)
    # Wider than the map (only on tiny inputs, where TF would refuse): keep mirroring periodically.
    index = torch.arange(-before, n + after, device=x.device) % (2 * n)
    index = torch.where(index >= n, 2 * n - 1 - index, index)
    return x.index_select(dim, index)


def _replicate_pad(x: Tensor) -> Tensor:
    """`x` padded by one replicated sample on each side of time and frequency, in `x`'s own dtype.

    CPU autocast runs replication padding in float32 (it is on its list of float32 operations), so a bf16 map
    would come back float32 and be cast to bf16 again by every convolution that reads it, and each gradient
    cast back in the backward pass: 127 casts of feature maps in a tiny training step (tests/test_unet_fast.py),
    13 % of a small one's time.
    Padding copies values, exact in any dtype, so it runs with autocast off. On 2 cores with AVX-512 bf16
    (benchmarks/train.py, bf16, a run before and one after): small 1.44 -> 1.53 samples/s, paper 0.33 -> 0.36."""
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        return F.pad(x, (1, 1, 1, 1), mode="replicate")


def mirror_pad(x: Tensor, kernel: int) -> Tensor:
    """Pad time and frequency as the reference's get_paddings: k//2 before, k//2 - (1 - k%2) after."""
    before, after = kernel // 2, kernel // 2 - (1 - kernel % 2)
    if _fast_path and max(before, after) <= min(x.shape[-2:]):
        # SYMMETRIC by one sample repeats the edge: replicate padding, torch's native op. It is the faster of
        # the two channels-first (0.34 against 0.62 ms for 4 × 427 × 1025) and under autograd (a tiny training
        # step 0.55 against 0.64 s), but 2.7x slower for channels-last inference.
        if before == after == 1 and (not _channels_last(x) or not _no_grad(x)):
            return _replicate_pad(x)
        return _symmetric_pad(x, before, after)
    return _mirror_pad_dim(_mirror_pad_dim(x, -2, before, after), -1, before, after)


def center_crop(x: Tensor, like: Tensor) -> Tensor:
    """Crop time and frequency of `x` to `like`'s, offset (excess // 2) as the reference's crop blocks."""
    (t, f), (tt, ff) = x.shape[-2:], like.shape[-2:]
    assert t >= tt and f >= ff, f"cannot crop {tuple(x.shape)} to {tuple(like.shape)}"
    if (t, f) == (tt, ff):  # no view: under autograd a slice's backward writes a full-size gradient anew
        return x
    dt, df = (t - tt) // 2, (f - ff) // 2
    return x[..., dt:dt + tt, df:df + ff]


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """A VALID convolution (callers pad by mirroring first)."""
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride)


def _split_conv(layer: nn.Conv2d, parts: Sequence[Tensor], padding: int = 0, into: Tensor | None = None) -> Tensor:
    """`layer` applied to the concatenation of `parts` (channel order), as a sum of per-part convolutions
    (zero-padded by `padding`), plus `into` when given (summed into it inside oneDNN where that runs)."""
    weights = layer.weight.split([part.shape[1] for part in parts], dim=1)
    assert sum(w.shape[1] for w in weights) == layer.in_channels, "the parts must be the layer's whole input"
    if into is not None and _onednn_inference(into, *parts, *weights):  # every part summed inside oneDNN
        for i, (part, weight) in enumerate(zip(parts, weights)):
            _convolve_into(into, part, weight, None if i else layer.bias, layer.stride, padding)
        return into
    out = F.conv2d(parts[0], weights[0], layer.bias, layer.stride, padding)
    fused = _onednn_inference(out, *parts, *weights)
    for part, weight in zip(parts[1:], weights[1:]):
        if fused:  # oneDNN adds the convolution into `out` as it writes it: no separate pass over `out`
            _convolve_into(out, part, weight, None, layer.stride, padding)
        else:
            out.add_(F.conv2d(part, weight, None, layer.stride, padding))  # a convolution output: autograd allows it
    return out if into is None else out.add_(into)  # into `out`, a convolution output: autograd may need `into`


def _replicate_conv3x3(layer: nn.Conv2d, parts: Sequence[Tensor]) -> Tensor:
    """`layer` (3×3, stride 1) on the concatenation of `parts` padded by one mirrored sample (TF SYMMETRIC
    by one: the edge repeats), without padding them. The convolution runs with oneDNN's own zero padding;
    replicate and zero padding differ only on the one-sample border, so what the border would have added is
    added back to the output's first and last rows and columns by four thin convolutions of the edges.
    No full-size copy of any part is made."""
    assert layer.kernel_size == (3, 3) and layer.stride == (1, 1), "one-sample padding is for 3×3 convolutions"
    out = _split_conv(layer, parts, padding=1)
    weight = layer.weight

    def edge(dim: int, start: int) -> Tensor:  # one row or column of every part, concatenated as `parts` are
        pieces = [part.narrow(dim, start % part.shape[dim], 1) for part in parts]
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]

    top, bottom, left, right = edge(-2, 0), edge(-2, -1), edge(-1, 0), edge(-1, -1)
    # The padded rows 0 and T+1 (corners included) through the kernel's first and last rows; then the
    # padded columns 0 and F+1 between them (their corner samples are in the rows already).
    out[..., :1, :] += F.conv2d(F.pad(top, (1, 1, 0, 0), mode="replicate"), weight[:, :, :1])
    out[..., -1:, :] += F.conv2d(F.pad(bottom, (1, 1, 0, 0), mode="replicate"), weight[:, :, 2:])
    out[..., :, :1] += F.conv2d(left, weight[:, :, :, :1], padding=(1, 0))
    out[..., :, -1:] += F.conv2d(right, weight[:, :, :, 2:], padding=(1, 0))
    return out


def _onednn_inference(x: Tensor, *tensors: Tensor) -> bool:
    """Whether work on `x` is channels-last float32 inference on a oneDNN CPU: there `_convolve_into` sums
    inside oneDNN and `_replicate_conv3x3` pays. (Under autograd the border's in-place additions into views
    make torch write a full-size gradient for each: a training step took 1.3-1.4× as long.)"""
    return (_fast_path and x.device.type == "cpu" and x.dtype == torch.float32 and _channels_last(x)
            and torch.backends.mkldnn.is_available() and _no_grad(x, *tensors))


def _convolve_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                   padding: int = 0) -> None:
    """out += conv2d(x, weight, bias) (zero-padded by `padding`) in one oneDNN call: the sum is the
    convolution's post-op."""
    assert out.is_contiguous(memory_format=torch.channels_last), "oneDNN writes the sum into a dense buffer"
    torch.ops.mkldnn._convolution_pointwise_.binary(out, x, weight, bias, [padding, padding], list(stride), [1, 1],
                                                   1, "add", 1.0, None, [], None)


class DenseBlock(nn.Module):
    """`layers` 3×3 conv + ELU; each sees all earlier outputs (newest first) and the input."""

    def __init__(self, in_channels: int, channels: int, layers: int):
        super().__init__()
        self.channels = channels
        self.convs = nn.ModuleList(
            conv(in_channels + i * channels, channels, 3) for i in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        out = _elu(self.convs[0](mirror_pad(x, 3)))
        for layer in self.convs[1:]:
            x = torch.cat([out, x], dim=1)
            out = _elu(layer(mirror_pad(x, 3)))
        return out

    def forward_split(self, parts: list[Tensor]) -> Tensor:
        """The block on the input given in parts (channel order), never concatenated: each layer's
        convolution is the sum of one convolution per part (its slice of the weights), and each part, the
        input's and every layer output, is padded once and read by every later layer. Channels-last
        slices of one buffer would not be dense, so this is how channels-last avoids copying the stack.
        Channels-last inference on a oneDNN CPU pads nothing at all (`_replicate_conv3x3`)."""
        unpadded = _onednn_inference(parts[0], *parts, *self.parameters())
        inputs = list(parts) if unpadded else [mirror_pad(part, 3) for part in parts]  # newest first
        for i, layer in enumerate(self.convs):
            if i:
                inputs.insert(0, out if unpadded else mirror_pad(out, 3))
            out = _elu(_replicate_conv3x3(layer, inputs) if unpadded else _split_conv(layer, inputs))
        return out


class IBlock(nn.Module):
    """Dense block plus a 1×1 projection of its input."""

    def __init__(self, in_channels: int, channels: int, dense_layers: int):
        super().__init__()
        self.dense = DenseBlock(in_channels, channels, dense_layers)
        self.skip = conv(in_channels, channels, 1)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """`x` is the input, or its parts in channel order: concatenated on the reference path, convolved part
        by part on the fast path."""
        parts = [x] if isinstance(x, Tensor) else list(x)
        if not _fast_path:
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            return self.dense(x) + self.skip(x)
        return _split_conv(self.skip, parts, into=self.dense.forward_split(parts))


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, out_channels: int, dense_layers: int):
        super().__init__()
        self.iblock = IBlock(in_channels, channels, dense_layers)
        self.down = conv(channels, out_channels, DOWN_KERNEL, stride=DOWN_STRIDE)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.iblock(x)
        return _elu(self.down(mirror_pad(skip, DOWN_KERNEL))), skip


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, dense_layers: int):
        super().__init__()
        self.up_conv = nn.ConvTranspose2d(in_channels, channels, DOWN_KERNEL, stride=DOWN_STRIDE)
        # The reference projects the upsampled input only when the channel count changes.
        self.up_projection = conv(in_channels, channels, 1) if in_channels != channels else None
        self.iblock = IBlock(2 * channels, channels, dense_layers)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        up = _elu(self.up_conv(x))  # (2s + 2): the reference does not pad before it
        if self.up_projection is not None and _fast_path:
            # A 1×1 convolution and ELU act on each pixel alone, so they commute with nearest upsampling:
            # computed before it, on a quarter of the pixels, the same numbers come out.
            nearest = F.interpolate(_elu(self.up_projection(x)), scale_factor=2, mode="nearest")
        else:
            nearest = F.interpolate(x, scale_factor=2, mode="nearest")
            if self.up_projection is not None:
                nearest = _elu(self.up_projection(nearest))
        if _fast_path:  # cropped to the skip before the sum (the same elements): no crop of the sum to copy
            return self.iblock([center_crop(center_crop(up, nearest), skip) + center_crop(nearest, skip), skip])
        up = center_crop(up, nearest) + nearest
        return self.iblock([center_crop(up, skip), skip])


class Encoder(nn.Module):
    def __init__(self, in_channels: int, config: ModelConfig):
        super().__init__()
        ch = config.channels
        self.blocks = nn.ModuleList(
            EncoderBlock(in_channels if i == 0 else ch[i], ch[i], ch[i + 1], config.dense_layers)
            for i in range(config.depth))
        self.bottleneck = IBlock(ch[-1], ch[-1], config.dense_layers)

    def forward(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for block in self.blocks:
            x, skip = block(x)
            skips.append(skip)
        return self.bottleneck(x), skips


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        ch = config.channels
        # blocks[i] produces level i's channels from level i+1's; applied deepest first.
        self.blocks = nn.ModuleList(
            DecoderBlock(ch[i + 1], ch[i], config.dense_layers)
            for i in range(config.depth))

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        for i in reversed(range(len(self.blocks))):
            x = self.blocks[i](x, skips[i])
        return x


class SupervisedAttention(nn.Module):
    """SAM: the stage-1 estimate S1 = X + conv(F1) and attention-weighted features for stage 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.feature_conv = conv(channels, channels, 3)
        self.residual_conv = conv(channels, 2, 3)
        self.mask_conv = conv(2, channels, 3)

    def forward(self, features: Tensor, noisy_spec: Tensor) -> tuple[Tensor, Tensor]:
        padded = mirror_pad(features, 3)
        s1 = self.residual_conv(padded) + noisy_spec
        mask = torch.sigmoid(self.mask_conv(mirror_pad(s1, 3)))
        if _fast_path and _no_grad(features, mask):
            return self.feature_conv(padded).mul_(mask).add_(features), s1
        return self.feature_conv(padded) * mask + features, s1


def frequency_embedding(freq_bins: int, count: int) -> Tensor:
    """(count, freq_bins): cos(2^j·π·k/(freq_bins-1)), computed in float32 exactly as the reference does."""
    # Always on the CPU (also inside a meta-device context, where it would pull in slow decompositions).
    n = (torch.arange(freq_bins, dtype=torch.float64, device="cpu") / (freq_bins - 1)).float()
    pi = torch.tensor(math.pi, dtype=torch.float32, device="cpu")
    return torch.stack([torch.cos((pi * 2 ** j) * n) for j in range(count)])


def _input_conv(layer: nn.Conv2d, padded_spec: Tensor, embedding: Tensor) -> Tensor:
    """The 7×7 input convolution of [spectrum, frequency embedding] from the padded 2-channel spectrum alone.

    The 10 embedding channels are the same in every frame, and mirrored padding in time keeps them so: their
    share of the convolution is one (channels, bins) map, computed on a single frame (time kernel summed)
    and added to every frame. The full-resolution convolution then reads 2 input channels instead of 12
    (on tiny, the two input convolutions had taken 14 % of the forward pass)."""
    spectrum_channels = padded_spec.shape[1]
    pad = INPUT_KERNEL // 2
    embedding_row = _mirror_pad_dim(embedding, -1, pad, pad)  # (1, E, 1, bins + 2·pad)
    embedding_weight = layer.weight[:, spectrum_channels:].sum(dim=-2, keepdim=True)  # (out, E, 1, k)
    embedding_map = F.conv2d(embedding_row, embedding_weight, layer.bias)  # (1, out, 1, bins)
    out = F.conv2d(padded_spec, layer.weight[:, :spectrum_channels])
    if _channels_last(out):  # the broadcast add is then a dense (bins, channels) row added to every frame
        embedding_map = embedding_map.contiguous(memory_format=torch.channels_last)
    return out.add_(embedding_map)


class TwoStageUNet(nn.Module):
    """(B, 2, frames, bins) noisy spectrum -> (S1, S2), the stage-1 and final clean-spectrum estimates."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        ch0, inputs = config.channels[0], 2 + config.freq_embeddings
        self.register_buffer("freq_embedding", frequency_embedding(config.freq_bins, config.freq_embeddings),
                             persistent=False)
        self.input_conv1 = conv(inputs, ch0, INPUT_KERNEL)
        self.encoder1 = Encoder(ch0, config)
        self.decoder1 = Decoder(config)
        self.sam = SupervisedAttention(ch0)
        self.input_conv2 = conv(inputs, ch0, INPUT_KERNEL)
        self.encoder2 = Encoder(2 * ch0, config)
        self.decoder2 = Decoder(config)
        self.output_conv = conv(ch0, 2, 3)
        # A device model's mains hum (workbench.audio.hum.HumTemplate), cancelled before the network runs:
        # not a weight, it travels in the checkpoint's config (workbench.model.checkpoint).
        self.hum_template = None

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Tensor],
                        device: str | torch.device = "cpu") -> "TwoStageUNet":
        """A model in eval mode holding `state` (names and shapes must match), without a random init."""
        with torch.device("meta"):
            model = cls(config)
        # Copies of the loaded tensors become the parameters (`assign`): materialising the meta model first
        # (`to_empty`) would pull in torch's symbolic-shape machinery, 0.2-0.3 s at every start-up.
        expected = model.state_dict()
        state = {name: tensor.to(device=device, dtype=expected[name].dtype if name in expected else tensor.dtype,
                                 copy=True) for name, tensor in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        # The frequency embedding is a non-persistent buffer, never in a state dict: recompute it.
        model.freq_embedding = frequency_embedding(config.freq_bins, config.freq_embeddings).to(device)
        return model.eval()

    def forward(self, noisy_spec: Tensor) -> tuple[Tensor, Tensor]:
        batch, channels, frames, bins = noisy_spec.shape
        assert channels == 2 and bins == self.config.freq_bins, \
            f"expected (batch, 2, frames, {self.config.freq_bins}), got {tuple(noisy_spec.shape)}"
        embedding = self.freq_embedding.to(device=noisy_spec.device, dtype=noisy_spec.dtype)[None, :, None, :]
        if _fast_path:
            x = noisy_spec
            x = x.contiguous(memory_format=torch.channels_last)  # every later activation keeps the layout
            padded = mirror_pad(x, INPUT_KERNEL)
            input1 = _input_conv(self.input_conv1, padded, embedding)
            input2 = _input_conv(self.input_conv2, padded, embedding)
        else:
            padded = mirror_pad(torch.cat([noisy_spec, embedding.expand(batch, -1, frames, -1)], dim=1), INPUT_KERNEL)
            input1, input2 = self.input_conv1(padded), self.input_conv2(padded)

        features1 = self.decoder1(*self.encoder1(_elu(input1)))
        attended, s1 = self.sam(features1, noisy_spec)

        # The encoder's first I-block takes the two parts as they are (concatenated there if need be).
        features2 = self.decoder2(*self.encoder2([_elu(input2), attended]))
        s2 = self.output_conv(mirror_pad(features2, 3))
        return s1.contiguous(), s2.contiguous()


def for_inference(model: TwoStageUNet, device: str | torch.device = "cpu") -> TwoStageUNet:
    """`model` on `device` in eval mode, its convolution weights laid out channels-last like the fast path's
    activations (the values unchanged; the module is changed in place, as `Module.to` does). With channels-first
    weights oneDNN reorders every weight at every call, 285 MB for the paper size. A 5 s chunk of the paper size,
    two runs alternating both layouts in one process: best 4.51 / 3.76 s against 3.52 / 3.53 s with the weights
    channels-last, medians 4.62 / 4.00 against 3.97 / 3.93 s, the output the same bit for bit; tiny, whose
    weights are small, the same either way. Training keeps the weights as they are."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if _fast_path else model


def count_parameters(config: ModelConfig) -> int:
    """Parameter count of a configuration, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = TwoStageUNet(config)
    return sum(p.numel() for p in model.parameters())


SNR_LOSS_FLOOR = 1e-12  # added to the "snr" loss's mean squared error: an exact estimate stays finite


def denoising_loss(s1: Tensor, s2: Tensor, clean_spec: Tensor, bin_weights: Tensor | None = None,
                   loss: str = "l1", stage1_weight: float = 1.0) -> Tensor:
    """The training loss of the final estimate S2, plus `stage1_weight` times that of the stage-1 estimate S1,
    against the clean spectrum Y.

    "l1" is Eq. 2 of the paper (with both stages weighed alike): mean |S − Y| over batch, real/imag, frames
    and bins. "snr" is each example's 10·log10 of its mean squared error, averaged over the batch: its
    negative SNR in dB but for the clean example's own power, a constant no weight changes. By Parseval that
    is the waveform's SNR, the figure the evaluation averages over fragments, each example counting alike
    however loud it is, where L1 weighs a loud example's error more and a large error no more than its size.
    "snr+l1" is the mean of the "snr" term and each example's 20·log10 of its mean |S − Y|, both in dB: the
    squared error chases the SNR, where the largest errors lie; the absolute error counts the small errors in
    the quiet bins too, which a listener (and PEAQ) hears and the snr loss alone leaves (recipes/finetune-cpu.toml).
    Only S2 is ever heard; S1's term asks stage 1 for a clean estimate of its own, which pretraining wants
    and fine-tuning for one machine need not.
    `bin_weights` (FREQ_BINS,), of mean 1 (`low_band_weights`), weighs each frequency bin's error; None
    weighs every bin alike."""
    assert loss in LOSSES and stage1_weight >= 0, (loss, stage1_weight)
    if bin_weights is not None:
        assert bin_weights.shape == (clean_spec.shape[-1],), f"one weight per bin, got {tuple(bin_weights.shape)}"

    def weighed(error: Tensor) -> Tensor:
        return error * bin_weights if bin_weights is not None else error

    def stage_loss(estimate: Tensor) -> Tensor:
        error = estimate - clean_spec
        if loss == "l1":
            return weighed(error.abs()).mean()
        squared_db = 10 * torch.log10(weighed(error.square()).flatten(1).mean(dim=1) + SNR_LOSS_FLOOR)
        if loss == "snr":
            return squared_db.mean()
        absolute_db = 20 * torch.log10(weighed(error.abs()).flatten(1).mean(dim=1) + SNR_LOSS_FLOOR ** 0.5)
        return (0.5 * (squared_db + absolute_db)).mean()

    total = stage_loss(s2)
    return total + stage1_weight * stage_loss(s1) if stage1_weight else total


def low_band_weights(below_hz: float, extra_weight: float) -> Tensor | None:
    """Per-bin loss weights: 1 + `extra_weight` for the bins centred below `below_hz`, 1 elsewhere, scaled
    to mean 1 (so the loss keeps its size); None when there is nothing to weigh.

    Why: in Eq. 2 every one of the 1025 bins counts alike, so a mains-hum family (50/60 Hz and its first
    harmonics: a handful of bins) is a tiny share of the loss and a small network leaves it in place."""
    if below_hz <= 0 or extra_weight <= 0:
        return None
    centres = torch.arange(FREQ_BINS, dtype=torch.float32) * SAMPLE_RATE / N_FFT
    weights = 1.0 + extra_weight * (centres < below_hz).float()
    return weights / weights.mean()


def denoise_waveform(model: TwoStageUNet, wave: Tensor) -> Tensor:
    """(B, T) mono 44.1 kHz waveforms -> (B, T) clean estimates (the S2 output), exactly T samples.

    The whole signal goes through the network at once (see `stft.analysis`: every sample, the first and
    last included, is under four frames). No gradients; long recordings belong to the chunked,
    streaming `workbench denoise`.
    """
    assert wave.dim() == 2, f"denoise_waveform expects (batch, samples), got {tuple(wave.shape)}"
    parameter = next(model.parameters())
    with torch.no_grad():
        spec = analysis(wave.to(device=parameter.device, dtype=torch.float32))
        _, s2 = model(spec.to(parameter.dtype))
        return synthesis(s2.float(), wave.shape[-1]).to(wave.dtype)
