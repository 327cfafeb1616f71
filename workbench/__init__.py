"""workbench: fine-tune a tape-noise denoiser to each replay machine of a sound archive."""

import os

__version__ = "0.1.0"

# Nothing talks to the network at run time: MLflow's telemetry is off whatever the caller's shell says,
# and saving a model never shells out to pip to infer requirements.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")

# MLflow's own tqdm bars ("Downloading artifacts") would interleave with the workbench's progress bars.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
