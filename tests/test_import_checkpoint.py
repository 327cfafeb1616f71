"""Importing Keras `save_weights` checkpoints without TensorFlow: the bundle reader, the variable map,
layer conventions, refusals, and the `checkpoint import` / `checkpoint info` commands.

Checkpoints are written by tests/tf_bundle.py (TF's tensor-bundle format, from a model's state with the
reference's key names and layouts), mostly for reduced sizes: the key structure is the same for any size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tf_bundle import _field, encode_entry, write_bundle
from workbench.errors import WorkbenchError
from workbench.model.checkpoint import load_checkpoint
from workbench.model.crc32c import _update_scalar, crc32c, mask, unmask
from workbench.model.keras_import import (PAPER_VARIABLES, expected_shapes, import_keras_checkpoint,
                                          keras_from_state, keras_variable_map, to_torch)
from workbench.model.stft import FREQ_BINS
from workbench.model.tf_checkpoint import TensorBundle, protobuf_fields, read_varint, snappy_decompress
from workbench.model.unet import SIZES, TwoStageUNet

EXAMPLE_KEY = "layer_with_weights-0/decoder_s1/dblocks/0/i_block/tfc/H/0/kernel/.ATTRIBUTES/VARIABLE_VALUE"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _key(path: str) -> str:
    return f"layer_with_weights-0/{path}/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture
def tiny_bundle(tmp_path):
    """A Keras-format checkpoint of a random tiny model: (index path, model, Keras-keyed arrays)."""
    torch.manual_seed(5)
    model = TwoStageUNet(SIZES["tiny"]).eval()
    arrays = keras_from_state(model.config, model.state_dict())
    (tmp_path / "keras").mkdir()
    write_bundle(tmp_path / "keras" / "checkpoint", arrays)
    return tmp_path / "keras" / "checkpoint.index", model, arrays


# ------------------------------------------------------------------------------------- the variable map

def test_paper_map_has_exactly_the_reference_284_variables():
    shapes = expected_shapes(SIZES["paper"])
    assert len(shapes) == PAPER_VARIABLES == 284
    assert EXAMPLE_KEY in shapes
    assert shapes[_key("conv2d_1/kernel")] == (7, 7, 12, 32)
    assert shapes[_key("encoder_s2/eblocks/0/i_block/tfc/H/0/kernel")] == (3, 3, 64, 32)  # [conv2d_2, Fout]
    assert shapes[_key("encoder_s1/eblocks/5/conv2d_2/kernel")] == (4, 4, 256, 512)
    assert shapes[_key("encoder_s1/i_block/tfc/H/2/kernel")] == (3, 3, 1536, 512)
    assert shapes[_key("decoder_s1/dblocks/5/tconv_1/kernel")] == (4, 4, 256, 512)  # (h, w, out, in)
    assert shapes[_key("decoder_s2/dblocks/0/i_block/tfc/H/0/kernel")] == (3, 3, 64, 32)
    assert shapes[_key("sam_1/conv3/kernel")] == (3, 3, 2, 32)
    assert shapes[_key("finalblock/conv2/kernel")] == (3, 3, 32, 2)
    # Projections exist only where the decoder changes the channel count (levels 5, 4, 2, 0).
    projections = sorted(k.split("/")[3] for k in shapes if "/projection/kernel" in k and "decoder_s1" in k)
    assert projections == ["0", "2", "4", "5"]
    assert not any("conv2d_3" in k for k in shapes), "the decoder's unused conv2d_3 was never built"


def test_tiny_map_covers_every_parameter_once():
    model = TwoStageUNet(SIZES["tiny"])
    mapping = keras_variable_map(SIZES["tiny"])
    assert sorted(v.parameter for v in mapping) == sorted(model.state_dict())
    assert len({v.key for v in mapping}) == len(mapping)


def test_conv_layout_matches_tf_conv2d_valid_by_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 6, 3)).astype(np.float32)  # (H, W, C) as TF holds it
    kernel = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)  # HWIO
    expected = np.zeros((3, 5, 4), dtype=np.float64)
    for i in range(3):
        for j in range(5):
            expected[i, j] = np.einsum("abc,abco->o", x[i:i + 3, j:j + 2], kernel)
    ours = F.conv2d(torch.from_numpy(x).permute(2, 0, 1)[None], to_torch("conv", kernel))[0].permute(1, 2, 0)
    assert np.allclose(ours.numpy(), expected, atol=1e-5)


def test_transposed_conv_layout_matches_tf_conv2d_transpose_by_definition():
    # TF's conv2d_transpose (VALID, stride 2) scatters: out[2i + a, 2j + b, o] += x[i, j, c] · k[a, b, o, c],
    # with no kernel flip (checked against TensorFlow 2.15 while writing the importer).
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 2)).astype(np.float32)
    kernel = rng.standard_normal((4, 4, 3, 2)).astype(np.float32)  # (h, w, out, in)
    expected = np.zeros((2 * 2 + 4, 4 * 2 + 4, 3), dtype=np.float64)
    for i in range(3):
        for j in range(5):
            expected[2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum("c,abOc->abO", x[i, j], kernel)
    ours = F.conv_transpose2d(torch.from_numpy(x).permute(2, 0, 1)[None], to_torch("tconv", kernel), stride=2)
    assert np.allclose(ours[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ the import

def test_round_trip_import_gives_the_original_weights_and_outputs(tiny_bundle, tmp_path):
    index, model, _ = tiny_bundle
    out = tmp_path / "imported.safetensors"
    summary = import_keras_checkpoint(index, out, config=SIZES["tiny"])
    assert summary["variables"] == len(keras_variable_map(SIZES["tiny"]))
    assert summary["skipped_entries"] == ["_CHECKPOINTABLE_OBJECT_GRAPH"]
    imported, info = load_checkpoint(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(imported.state_dict()[name], tensor), name
    spec = torch.randn(1, 2, 11, FREQ_BINS)
    with torch.no_grad():
        assert torch.equal(imported(spec)[1], model(spec)[1])
    assert info["lineage"]["source"] == "keras-checkpoint"
    assert set(info["lineage"]["files_sha256"]) == {"checkpoint.index", "checkpoint.data-00000-of-00001"}


def test_the_prefix_or_folder_names_the_checkpoint_too(tiny_bundle, tmp_path):
    index, _, _ = tiny_bundle
    for i, source in enumerate((index.with_suffix(""), index.parent)):
        summary = import_keras_checkpoint(source, tmp_path / f"m{i}.safetensors", config=SIZES["tiny"])
        assert summary["source"] == str(index)


def test_optimizer_state_is_skipped(tmp_path):
    model = TwoStageUNet(SIZES["tiny"])
    arrays = keras_from_state(model.config, model.state_dict())
    slot = EXAMPLE_KEY.replace("/.ATTRIBUTES/VARIABLE_VALUE", "/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE")
    arrays[slot] = np.zeros((3, 3, 8, 4), np.float32)
    arrays["optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros((), np.float32)
    write_bundle(tmp_path / "ckpt", arrays)
    summary = import_keras_checkpoint(tmp_path / "ckpt.index", tmp_path / "m.safetensors", config=SIZES["tiny"])
    assert len(summary["skipped_entries"]) == 3


def test_missing_extra_and_misshaped_variables_are_refused_with_the_list(tiny_bundle, tmp_path):
    _, model, arrays = tiny_bundle
    arrays = dict(arrays)
    del arrays[_key("sam_1/conv1/bias")]
    arrays[_key("decoder_s1/conv2d_3/kernel")] = np.zeros((3, 3, 16, 16), np.float32)
    arrays[_key("finalblock/conv2/kernel")] = np.zeros((3, 3, 4, 3), np.float32)
    write_bundle(tmp_path / "bad", arrays)
    out = tmp_path / "never.safetensors"
    with pytest.raises(WorkbenchError) as caught:
        import_keras_checkpoint(tmp_path / "bad.index", out, config=SIZES["tiny"])
    message = str(caught.value)
    assert f"1 missing: {_key('sam_1/conv1/bias')}" in message
    assert f"1 unexpected: {_key('decoder_s1/conv2d_3/kernel')}" in message
    assert f"1 mis-shaped: {_key('finalblock/conv2/kernel')} (3, 3, 4, 3) (expected (3, 3, 4, 2))" in message
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_a_checkpoint_of_another_size_is_refused_as_paper(tiny_bundle, tmp_path):
    index, _, _ = tiny_bundle
    with pytest.raises(WorkbenchError, match=r"does not match the 'paper' two-stage U-Net: \d+ missing: .*mis-shaped"):
        import_keras_checkpoint(index, tmp_path / "m.safetensors")


def test_corrupt_index_is_one_line(tiny_bundle, tmp_path):
    index, _, _ = tiny_bundle
    data = index.read_bytes()
    index.write_bytes(data[:-10])
    with pytest.raises(WorkbenchError, match="checkpoint.index: not a readable TensorFlow checkpoint index "
                                             r"\(no table magic number"):
        TensorBundle(index)
    flipped = bytearray(data)
    flipped[40] ^= 0xFF
    index.write_bytes(bytes(flipped))
    with pytest.raises(WorkbenchError, match="checksum mismatch in the block at byte 0"):
        TensorBundle(index)
    index.write_bytes(b"not a checkpoint")
    with pytest.raises(WorkbenchError) as caught:
        import_keras_checkpoint(index, tmp_path / "m.safetensors", config=SIZES["tiny"])
    assert "\n" not in str(caught.value) and "too short for a table footer" in str(caught.value)


def test_corrupt_or_missing_data_is_refused(tiny_bundle, tmp_path):
    index, _, _ = tiny_bundle
    data_file = index.with_name("checkpoint.data-00000-of-00001")
    original = data_file.read_bytes()
    corrupted = bytearray(original)
    corrupted[100] ^= 0x01
    data_file.write_bytes(bytes(corrupted))
    with pytest.raises(WorkbenchError, match="checksum mismatch in tensor"):
        import_keras_checkpoint(index, tmp_path / "m.safetensors", config=SIZES["tiny"])
    data_file.write_bytes(original[: len(original) // 2])
    with pytest.raises(WorkbenchError, match="truncated"):
        import_keras_checkpoint(index, tmp_path / "m.safetensors", config=SIZES["tiny"])
    data_file.unlink()
    with pytest.raises(WorkbenchError, match="checkpoint data file is missing"):
        import_keras_checkpoint(index, tmp_path / "m.safetensors", config=SIZES["tiny"])
    assert not (tmp_path / "m.safetensors").exists()


def test_output_must_not_overwrite_the_source_and_must_be_safetensors(tiny_bundle):
    index, _, _ = tiny_bundle
    with pytest.raises(WorkbenchError, match="must be a .safetensors file"):
        import_keras_checkpoint(index, index.with_name("out.pt"), config=SIZES["tiny"])


# ------------------------------------------------------------------------------------ format primitives

def test_crc32c_matches_the_standard_and_the_bytewise_loop():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    rng = np.random.default_rng(2)
    for length in (1, 1023, 1024, 1025, 3 * 1024 + 17, 40_000):
        data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        assert crc32c(data) == _update_scalar(0xFFFFFFFF, data) ^ 0xFFFFFFFF, length
    assert unmask(mask(0xE3069283)) == 0xE3069283 and mask(0) == 0xA282EAD8


def test_protobuf_and_varint_decoding():
    assert read_varint(bytes([0xAC, 0x02]), 0) == (300, 2)
    entry = encode_entry(1, (3, 3, 12, 32), 0, 1234, 13824, 0xDEADBEEF)
    fields = {number: value for number, _, value in protobuf_fields(entry)}
    assert fields[1] == 1 and fields[4] == 1234 and fields[5] == 13824 and fields[6] == 0xDEADBEEF
    from workbench.model.tf_checkpoint import parse_entry
    parsed = parse_entry("x", entry)
    assert parsed.shape == (3, 3, 12, 32) and parsed.offset == 1234 and parsed.masked_crc32c == 0xDEADBEEF
    assert parse_entry("y", _field(2, 2, _field(2, 2, _field(1, 0, -1)))).shape == (-1,)


def test_snappy_blocks_decode():
    # "abc" literal, a 6-byte overlapping copy at offset 3, then literal "X".
    stream = bytes([10, 0x08]) + b"abc" + bytes([0x09, 3, 0x00]) + b"X"
    assert snappy_decompress(stream) == b"abcabcabcX"


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_imports_and_shows_a_checkpoint(tiny_bundle, tmp_path, cli):
    index, _, _ = tiny_bundle
    out = tmp_path / "models" / "general.safetensors"
    result = cli("checkpoint", "import", index, "--out", out, "--size", "tiny", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["variables"] == len(keras_variable_map(SIZES["tiny"]))
    shown = cli("checkpoint", "info", out, "--json")
    assert shown.code == 0 and shown.json()["size"] == "tiny"
    assert shown.json()["lineage"]["source"] == "keras-checkpoint"
    table = cli("checkpoint", "info", out)
    assert table.code == 0 and "keras-checkpoint" in table.stdout


def test_cli_refusal_is_one_line_and_writes_nothing(tiny_bundle, tmp_path, cli):
    index, _, _ = tiny_bundle
    out = tmp_path / "paper.safetensors"
    result = cli("checkpoint", "import", index, "--out", out)  # a tiny checkpoint is not the paper network
    assert result.code == 2
    assert result.stderr.strip().startswith("error:") and "does not match the 'paper'" in result.stderr
    assert not out.exists()
