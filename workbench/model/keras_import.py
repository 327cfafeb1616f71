"""Import the published TensorFlow/Keras checkpoint of the two-stage U-Net, without TensorFlow.

The reference (eloimoliner/denoising-historical-recordings, `unet.py`) saves with Keras `save_weights`:
one variable per kernel and bias, keyed by its object-graph path under the model's only weighted layer,
e.g. `layer_with_weights-0/decoder_s1/dblocks/0/i_block/tfc/H/0/kernel/.ATTRIBUTES/VARIABLE_VALUE`.
`keras_variable_map(config)` generates those keys from our network's structure (the same for any size),
paired with our parameter names and the layout change each needs:

- Conv2D kernels are (h, w, in, out) -> PyTorch Conv2d (out, in, h, w);
- Conv2DTranspose kernels are (h, w, out, in) -> PyTorch ConvTranspose2d (in, out, h, w). Both frameworks
  define the transposed convolution as the gradient of their (cross-correlation) convolution, so no
  spatial flip: output[s·i + k] += input[i] · kernel[k] in both (checked numerically against TF);
- biases are copied.
The paper network has 284 such variables (142 layers); the decoder's unused `conv2d_3` and the
projections of levels whose channel count does not change were never built, so they hold no variables.

`import_keras_checkpoint` refuses, with one line listing them, any variable that is missing, left over
or mis-shaped; optimizer state (`optimizer/...`, `.OPTIMIZER_SLOT`) and the save counter are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.audio.io import same_file, sha256_file
from workbench.errors import WorkbenchError
from workbench.model.checkpoint import config_path_for, mismatch_message, save_checkpoint
from workbench.model.tf_checkpoint import FLOAT_DTYPES, TensorBundle
from workbench.model.unet import SIZES, ModelConfig, TwoStageUNet
from workbench.progress import Progress, no_progress

ROOT = "layer_with_weights-0"
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
PAPER_VARIABLES = 284


@dataclass(frozen=True)
class KerasVariable:
    key: str  # the checkpoint key
    parameter: str  # our state-dict name
    kind: str  # "conv" (HWIO kernel), "tconv" (HW-out-in kernel) or "bias"


def _layer(torch_name: str, keras_path: str, kind: str = "conv") -> list[KerasVariable]:
    return [KerasVariable(f"{ROOT}/{keras_path}/kernel{SUFFIX}", f"{torch_name}.weight", kind),
            KerasVariable(f"{ROOT}/{keras_path}/bias{SUFFIX}", f"{torch_name}.bias", "bias")]


def _iblock(torch_name: str, keras_path: str, config: ModelConfig) -> list[KerasVariable]:
    variables = []
    for j in range(config.dense_layers):
        variables += _layer(f"{torch_name}.dense.convs.{j}", f"{keras_path}/tfc/H/{j}")
    return variables + _layer(f"{torch_name}.skip", f"{keras_path}/conv2d_res")


def keras_variable_map(config: ModelConfig) -> list[KerasVariable]:
    """Every variable the reference's `save_weights` writes for this configuration, with our names."""
    ch = config.channels
    variables = _layer("input_conv1", "conv2d_1") + _layer("input_conv2", "conv2d_2")
    variables += _layer("sam.feature_conv", "sam_1/conv1") + _layer("sam.residual_conv", "sam_1/conv2")
    variables += _layer("sam.mask_conv", "sam_1/conv3") + _layer("output_conv", "finalblock/conv2")
    for stage in (1, 2):
        encoder, decoder = f"encoder_s{stage}", f"decoder_s{stage}"
        for i in range(config.depth):
            variables += _iblock(f"encoder{stage}.blocks.{i}.iblock", f"{encoder}/eblocks/{i}/i_block", config)
            variables += _layer(f"encoder{stage}.blocks.{i}.down", f"{encoder}/eblocks/{i}/conv2d_2")
            variables += _layer(f"decoder{stage}.blocks.{i}.up_conv", f"{decoder}/dblocks/{i}/tconv_1", "tconv")
            if ch[i + 1] != ch[i]:
                variables += _layer(f"decoder{stage}.blocks.{i}.up_projection", f"{decoder}/dblocks/{i}/projection")
            variables += _iblock(f"decoder{stage}.blocks.{i}.iblock", f"{decoder}/dblocks/{i}/i_block", config)
        variables += _iblock(f"encoder{stage}.bottleneck", f"{encoder}/i_block", config)
    return variables


def keras_shape(kind: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a variable has in the Keras checkpoint, given our parameter's shape."""
    if kind == "bias":
        return tuple(torch_shape)
    a, b, h, w = torch_shape  # conv (out, in, h, w) -> (h, w, in, out); tconv (in, out, h, w) -> (h, w, out, in)
    return (h, w, b, a)


def to_torch(kind: str, array: np.ndarray) -> torch.Tensor:
    """A Keras variable's array in our parameter's layout (both kernel kinds permute the same way)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor if kind == "bias" else tensor.permute(3, 2, 0, 1).contiguous()


def to_keras(kind: str, tensor: torch.Tensor) -> np.ndarray:
    """Our parameter in the Keras checkpoint's layout (the inverse of `to_torch`)."""
    array = tensor.detach().cpu().float()
    return np.ascontiguousarray((array if kind == "bias" else array.permute(2, 3, 1, 0)).numpy())


def is_skipped_key(key: str) -> bool:
    """Checkpoint entries that are not network weights: the object graph, optimizer state, counters."""
    return (key == OBJECT_GRAPH_KEY or key.startswith("optimizer/") or "/.OPTIMIZER_SLOT/" in key
            or key.startswith("save_counter/") or key.startswith("step/"))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Keras key -> shape for a configuration (computed on the meta device)."""
    with torch.device("meta"):
        state = TwoStageUNet(config).state_dict()
    mapping = keras_variable_map(config)
    assert sorted(v.parameter for v in mapping) == sorted(state), "the Keras map must cover every parameter"
    return {v.key: keras_shape(v.kind, tuple(state[v.parameter].shape)) for v in mapping}


def state_from_keras(config: ModelConfig, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Our state dict from Keras-keyed arrays; the caller has checked names and shapes."""
    return {v.parameter: to_torch(v.kind, arrays[v.key]) for v in keras_variable_map(config)}


def keras_from_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Keras-keyed arrays from our state dict, in the checkpoint's layouts (used to write test bundles)."""
    return {v.key: to_keras(v.kind, state[v.parameter]) for v in keras_variable_map(config)}



def import_keras_checkpoint(index_path: Path, out: Path, config: ModelConfig | None = None,
                            progress: Progress = no_progress) -> dict:
    """Convert a Keras `save_weights` checkpoint of the reference network into our checkpoint at `out`.

    `index_path` is `PREFIX.index`, the prefix, or the folder holding it; `config` defaults to the `paper`
    size (the published model). Refuses (WorkbenchError, nothing written) if any variable is missing,
    left over or mis-shaped, or if a file is corrupt. Returns a summary for the CLI.
    """
    config = config or SIZES["paper"]
    out = Path(out)
    if out.suffix != ".safetensors":
        raise WorkbenchError(f"{out}: the imported checkpoint must be a .safetensors file")
    bundle = TensorBundle(index_path)
    sources = [bundle.index_path, *bundle.shard_paths()]
    for target in (out, config_path_for(out)):
        if any(target.exists() and same_file(target, source) for source in sources):
            raise WorkbenchError(f"{target}: output would overwrite the checkpoint being imported")

    weights = {name: entry for name, entry in bundle.entries.items() if not is_skipped_key(name)}
    skipped = sorted(set(bundle.entries) - set(weights))
    problem = mismatch_message(expected_shapes(config), {name: e.shape for name, e in weights.items()})
    if problem:
        raise WorkbenchError(f"{bundle.index_path} does not match the {config.size!r} two-stage U-Net: {problem}")
    not_float = sorted(f"{name} ({e.dtype_name})" for name, e in weights.items() if e.dtype not in FLOAT_DTYPES)
    if not_float:
        raise WorkbenchError(f"{bundle.index_path}: non-float weights: {', '.join(not_float)}")

    arrays = {}
    for done, name in enumerate(sorted(weights), start=1):
        arrays[name] = bundle.read(name)
        progress("import", done, len(weights))
    bad = sorted(name for name, array in arrays.items() if not np.isfinite(array).all())
    if bad:
        raise WorkbenchError(f"{bundle.index_path}: non-finite values in {', '.join(bad)}")

    model = TwoStageUNet.from_state_dict(config, state_from_keras(config, arrays))
    lineage = {
        "source": "keras-checkpoint",
        "reference": "eloimoliner/denoising-historical-recordings unet.py (Keras save_weights)",
        "index": str(bundle.index_path.resolve()),
        "files_sha256": {path.name: sha256_file(path) for path in sources},
        "variables": len(weights),
        "skipped_entries": skipped,
    }
    save_checkpoint(out, model, lineage=lineage)
    return {"out": str(out), "config": str(config_path_for(out)), "size": config.size,
            "variables": len(weights), "skipped_entries": skipped,
            "parameters": sum(p.numel() for p in model.parameters()), "source": str(bundle.index_path)}
