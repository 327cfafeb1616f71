"""The two-stage U-Net, its STFT and loss: shapes, parameter counts, reconstruction and layer semantics."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.model.stft import (EDGE_PAD, FREQ_BINS, HOP, N_FFT, analysis, analysis_frames, istft, stft,
                                  synthesis)
from workbench.model.unet import (SIZES, ModelConfig, TwoStageUNet, center_crop, count_parameters,
                                  denoise_waveform, denoising_loss, frequency_embedding, get_config,
                                  low_band_weights, mirror_pad)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_paper_size_has_exactly_the_reference_parameter_count():
    assert count_parameters(SIZES["paper"]) == 71_408_196


def test_smaller_sizes_are_much_smaller():
    assert 20_000 < count_parameters(SIZES["tiny"]) < 300_000
    assert count_parameters(SIZES["tiny"]) < count_parameters(SIZES["small"]) < count_parameters(SIZES["paper"])


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("frames", [1, 37])
def test_forward_keeps_the_input_shape_for_any_frame_count(size, frames):
    torch.manual_seed(0)
    model = TwoStageUNet(SIZES[size]).eval()
    spec = torch.randn(2, 2, frames, FREQ_BINS)
    with torch.no_grad():
        s1, s2 = model(spec)
    assert s1.shape == s2.shape == spec.shape
    assert torch.isfinite(s1).all() and torch.isfinite(s2).all()


@pytest.mark.parametrize("frames", [5, 64])
def test_paper_size_shapes_on_the_meta_device(frames):
    # The full network's shape flow (all crops and concatenations) without spending CPU on 71 M weights.
    with torch.device("meta"):
        model = TwoStageUNet(SIZES["paper"])
        s1, s2 = model(torch.empty(1, 2, frames, FREQ_BINS))
    assert s1.shape == s2.shape == (1, 2, frames, FREQ_BINS)


def test_config_round_trips_as_plain_data_and_unknown_sizes_are_refused():
    config = SIZES["small"]
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert get_config("tiny") is SIZES["tiny"]
    with pytest.raises(WorkbenchError, match="unknown model size 'huge'"):
        get_config("huge")


def test_mirror_pad_repeats_the_edge_like_tf_symmetric():
    x = torch.arange(1.0, 4.0).reshape(1, 1, 1, 3).expand(1, 1, 3, 3)  # rows [1 2 3]
    padded = mirror_pad(x, 4)  # 2 before, 1 after, as the reference pads a 4×4 stride-2 conv
    assert padded[0, 0, 0].tolist() == [2, 1, 1, 2, 3, 3]
    padded = mirror_pad(x, 7)  # wider than the map: keeps mirroring
    assert padded[0, 0, 0].tolist() == [3, 2, 1, 1, 2, 3, 3, 2, 1]


def test_center_crop_takes_the_reference_offset():
    x = torch.arange(10.0).reshape(1, 1, 1, 10).expand(1, 1, 4, 10)
    like = torch.zeros(1, 1, 2, 7)
    cropped = center_crop(x, like)
    assert cropped.shape[-2:] == (2, 7) and cropped[0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_frequency_embedding_is_the_ten_cosines():
    embedding = frequency_embedding(FREQ_BINS, 10)
    assert embedding.shape == (10, FREQ_BINS)
    k = torch.arange(FREQ_BINS, dtype=torch.float64)
    for j in range(10):
        assert torch.allclose(embedding[j].double(), torch.cos(2 ** j * math.pi * k / 1024), atol=2e-4)


def test_stft_frames_and_layout_match_a_direct_dft():
    torch.manual_seed(1)
    wave = torch.randn(1, N_FFT + 3 * HOP + 100)
    spec = stft(wave)
    assert spec.shape == (1, 2, 4, FREQ_BINS)
    window = torch.hamming_window(N_FFT, periodic=True, dtype=torch.float64)
    frame = wave[0, 2 * HOP:2 * HOP + N_FFT].double() * window
    expected = torch.fft.rfft(frame)
    assert torch.allclose(spec[0, 0, 2].double(), expected.real, atol=1e-3)
    assert torch.allclose(spec[0, 1, 2].double(), expected.imag, atol=1e-3)


@pytest.mark.parametrize("length", [1, 511, 512, 44_100, 3 * 44_100 + 7])
def test_analysis_synthesis_reconstructs_every_sample(length):
    torch.manual_seed(2)
    wave = torch.rand(2, length) * 2 - 1
    spec = analysis(wave)
    assert spec.shape == (2, 2, analysis_frames(length), FREQ_BINS)
    assert (synthesis(spec, length) - wave).abs().max() < 1e-5


def test_istft_inverts_stft_on_covered_samples_and_zero_fills_beyond():
    torch.manual_seed(3)
    wave = torch.randn(1, N_FFT + 5 * HOP)
    back = istft(stft(wave), wave.shape[-1] + 10)
    assert (back[:, :wave.shape[-1]] - wave).abs().max() < 1e-5
    assert back[:, wave.shape[-1]:].abs().max() == 0
    assert EDGE_PAD == N_FFT - HOP


def test_loss_is_equation_2():
    clean = torch.zeros(1, 2, 3, FREQ_BINS)
    s1 = torch.full_like(clean, 0.5)
    s2 = torch.full_like(clean, -0.25)
    assert denoising_loss(s1, s2, clean).item() == pytest.approx(0.75)


def test_the_snr_loss_is_each_examples_squared_error_in_db_averaged_over_the_batch():
    clean = torch.zeros(2, 2, 3, FREQ_BINS)
    clean[1] = 10.0
    s2 = clean.clone()
    s2[0] += 0.1  # the quiet example's error: -20 dB
    s2[1] += 1.0  # the loud one's, ten times the size: +0 dB
    s1 = clean + 1.0
    assert denoising_loss(s1, s2, clean, loss="snr").item() == pytest.approx((-20 + 0) / 2 + 0, abs=1e-4)
    # Each example counts alike: the batch's loss is the mean of the examples' own.
    alone = [denoising_loss(s1[i:i + 1], s2[i:i + 1], clean[i:i + 1], loss="snr").item() for i in range(2)]
    assert denoising_loss(s1, s2, clean, loss="snr").item() == pytest.approx(sum(alone) / 2)
    # Halving an example's error takes 20·log10(2) dB off its term (its stage-2 share), wherever it lies.
    halved = s2.clone()
    halved[1] = clean[1] + 0.5
    gain = denoising_loss(s1, s2, clean, loss="snr") - denoising_loss(s1, halved, clean, loss="snr")
    assert gain.item() == pytest.approx(20 * math.log10(2) / 2, abs=1e-4)
    # An exact estimate stays finite.
    assert math.isfinite(denoising_loss(clean, clean, clean, loss="snr").item())


def test_the_snr_plus_l1_loss_counts_a_spread_error_above_a_concentrated_one_of_the_same_power():
    clean = torch.zeros(1, 2, 4, FREQ_BINS)
    # An error of the same size in every bin: both dB terms equal 20·log10 of it.
    even = clean + 0.1
    assert denoising_loss(even, even, clean, loss="snr+l1", stage1_weight=0.0).item() == pytest.approx(-20.0, abs=1e-4)
    # The same squared error concentrated in one bin: the snr loss cannot tell the two apart; snr+l1 counts
    # the spread one (a hiss left in every quiet bin) as worse, by half the absolute term's difference.
    concentrated = clean.clone()
    concentrated[0, 0, 0, 0] = 0.1 * math.sqrt(clean.numel())
    snr = [denoising_loss(s, s, clean, loss="snr", stage1_weight=0.0).item() for s in (even, concentrated)]
    assert snr[0] == pytest.approx(snr[1], abs=1e-4)
    both = [denoising_loss(s, s, clean, loss="snr+l1", stage1_weight=0.0).item() for s in (even, concentrated)]
    assert both[0] - both[1] == pytest.approx(0.5 * 10 * math.log10(clean.numel()), abs=0.01)  # less the floor
    # Each example counts alike, and an exact estimate stays finite.
    pair = torch.cat([even, 10 * even])
    loss_of = functools.partial(denoising_loss, loss="snr+l1", stage1_weight=0.0)
    alone = [loss_of(pair[i:i + 1], pair[i:i + 1], clean).item() for i in range(2)]
    assert loss_of(pair, pair, torch.cat([clean, clean])).item() == pytest.approx(sum(alone) / 2)
    assert math.isfinite(denoising_loss(clean, clean, clean, loss="snr+l1", stage1_weight=0.0).item())


def test_the_stage_1_estimate_weighs_in_the_loss_as_asked():
    clean = torch.zeros(1, 2, 3, FREQ_BINS)
    s1, s2 = torch.full_like(clean, 0.5), torch.full_like(clean, -0.25)
    assert denoising_loss(s1, s2, clean, stage1_weight=0.0).item() == pytest.approx(0.25)  # S2 alone
    assert denoising_loss(s1, s2, clean, stage1_weight=0.5).item() == pytest.approx(0.5)
    s1.requires_grad_(True), s2.requires_grad_(True)
    denoising_loss(s1, s2, clean, loss="snr", stage1_weight=0.0).backward()
    assert s1.grad is None and s2.grad.abs().min() > 0  # stage 1 then learns only through what S2 needs of it


def test_low_band_weights_keep_the_loss_size_and_weigh_the_hum_bins():
    assert low_band_weights(0.0, 30.0) is None and low_band_weights(350.0, 0.0) is None
    weights = low_band_weights(350.0, 30.0)
    low = int(torch.count_nonzero(weights > 1.0))
    assert low == 17 and weights.shape == (FREQ_BINS,)  # bins 0..16: 0 to 344.5 Hz at 21.5 Hz a bin
    assert weights.mean().item() == pytest.approx(1.0) and weights[0].item() == pytest.approx(31 * weights[-1].item())
    clean = torch.zeros(1, 2, 3, FREQ_BINS)
    everywhere = torch.full_like(clean, 0.5)
    assert denoising_loss(everywhere, everywhere, clean, weights).item() == pytest.approx(1.0)  # = the plain loss
    hum = clean.clone()
    hum[..., 3] = 0.5  # an error at 60 Hz only
    assert denoising_loss(hum, hum, clean, weights).item() == pytest.approx(
        31 * weights[-1].item() * denoising_loss(hum, hum, clean).item())


def test_denoise_waveform_returns_exact_length_and_a_tiny_model_learns():
    torch.manual_seed(4)
    model = TwoStageUNet(SIZES["tiny"])
    clean = torch.sin(torch.arange(8192) * 2 * math.pi * 440 / 44_100)[None] * 0.5
    noisy = clean + 0.05 * torch.randn_like(clean)
    noisy_spec, clean_spec = analysis(noisy), analysis(clean)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(20):
        s1, s2 = model(noisy_spec)
        loss = denoising_loss(s1, s2, clean_spec)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    identity_loss = 2 * (noisy_spec - clean_spec).abs().mean().item()  # what S1 = S2 = X would score
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < identity_loss
    model.eval()
    out = denoise_waveform(model, noisy[:, :5000])
    assert out.shape == (1, 5000) and torch.isfinite(out).all()
