"""The MLflow pyfunc flavour of a workbench denoiser, logged as an MLflow "model from code".

MLflow copies this file into the logged model and runs it on `mlflow.pyfunc.load_model(...)`; it needs
the workbench package installed. Nothing is pickled: the weights are the checkpoint's own safetensors
file and JSON sidecar, logged as the model's artifacts "weights" and "config".

    model = mlflow.pyfunc.load_model("models:/tape-denoiser-general/3")
    restored = model.predict(waveform)   # (T,) float32 numpy, mono at 44.1 kHz -> the same shape

The logged model's signature (`workbench.model_registry.register.model_signature`) says so, and MLflow
holds callers to it: a stereo transfer goes through one channel at a time. The wrapper itself also takes
(C, T) (`model.unwrap_python_model().predict(None, waveform)`). Each channel is denoised on its own, in
the same crossfaded chunks as `workbench denoise` (`workbench.model.overlap_add.denoise_samples`), so any length
works and the output has exactly the input's shape.
"""

from __future__ import annotations

import mlflow
import numpy as np


class TapeDenoiserModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: `predict(waveform)` returns the denoised waveform (44.1 kHz, same shape)."""

    # A waveform is a numpy array, outside what MLflow's type-hint validation covers: pass it through as is.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from workbench.model.allocator import tune_allocator
        from workbench.model.checkpoint import load_checkpoint

        tune_allocator()  # the serving process runs the network: see workbench.model.allocator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.info = load_checkpoint(context.artifacts["weights"], device=device)

    def predict(self, context, model_input, params=None):
        from workbench.model.overlap_add import denoise_samples

        samples = np.asarray(model_input, dtype=np.float32)
        if samples.ndim not in (1, 2) or samples.shape[-1] == 0:
            raise ValueError(f"expected a (frames,) or (channels, frames) waveform, got shape {samples.shape}")
        return denoise_samples(self.model, samples)  # exactly what `workbench denoise` does, in memory


mlflow.models.set_model(TapeDenoiserModel())
