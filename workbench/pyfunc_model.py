"""The MLflow pyfunc flavour of a workbench denoiser, logged as an MLflow "model from code".

MLflow copies this file into the logged model and runs it on `mlflow.pyfunc.load_model(...)`; it needs
the workbench package installed. Nothing is pickled: the weights are the checkpoint's own safetensors
file and JSON sidecar, logged as the model's artifacts "weights" and "config".

    model = mlflow.pyfunc.load_model("models:/tape-denoiser-general/3")
    restored = model.predict(waveform)   # (T,) or (C, T) float numpy at 44.1 kHz -> same shape

Each channel is denoised on its own, in crossfaded chunks (`workbench.denoise.OverlapAdd`), so any
length works in bounded memory and the output has exactly the input's shape.
"""

from __future__ import annotations

import warnings

import mlflow
import numpy as np

# The waveform is a numpy array, which MLflow's type-hint validation does not cover; it would only nag.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


class TapeDenoiserModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `predict(waveform)` returns the denoised waveform (44.1 kHz, same shape)."""

    def load_context(self, context):
        import torch

        from workbench.model.checkpoint import load_checkpoint

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.info = load_checkpoint(context.artifacts["weights"], device=device)

    def predict(self, context, model_input, params=None):
        import torch

        from workbench.denoise import ChunkPlan, OverlapAdd
        from workbench.model.stft import HOP
        from workbench.model.unet import denoise_waveform

        samples = np.asarray(model_input, dtype=np.float32)
        if samples.ndim not in (1, 2) or samples.shape[-1] == 0:
            raise ValueError(f"expected a (frames,) or (channels, frames) waveform, got shape {samples.shape}")
        as_channels = samples[None, :] if samples.ndim == 1 else samples
        grid = HOP * 2 ** self.model.config.depth  # chunk starts on the network's own frame grid
        plan = ChunkPlan.from_seconds(grid_frames=grid)

        def process(chunk: torch.Tensor) -> torch.Tensor:  # (channels, n): channels go through as a batch
            return denoise_waveform(self.model, chunk)

        overlap = OverlapAdd(process, as_channels.shape[0], plan)
        restored = np.concatenate([overlap.push(as_channels), overlap.flush()], axis=1)
        return restored[0] if samples.ndim == 1 else restored


mlflow.models.set_model(TapeDenoiserModel())
