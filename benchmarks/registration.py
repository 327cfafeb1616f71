"""Benchmark what the pyfunc model's signature and input example add to registering a checkpoint.

`mlflow.pyfunc.log_model` loads a logged model and runs `predict` on its input example to check that it
can be served, so logging an example that way costs a checkpoint load and one short forward pass;
`register_checkpoint` logs the same model without that check. This registers the same checkpoint
(random weights, fixed seed) in a fresh workspace, alternating, round after round:

- baseline: `mlflow.pyfunc.log_model` exactly as before the signature (no signature, no example),
  then the version created through the client as `register_checkpoint` does;
- checked: the same with the signature and input example, MLflow's serving check included;
- now: `workbench.model_registry.register_checkpoint` (signature + input example, no serving check).

It prints the median seconds of each and its ratio to the baseline, measured in the same run.

    .venv/bin/python benchmarks/registration.py [--size tiny] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help="network size (tiny, small, paper)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from workbench import tracking
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import SIZES, TwoStageUNet
    from workbench.model_registry import register_checkpoint
    from workbench.model_registry.register import (
        PYFUNC_CODE,
        _ensure_registered_model,
        _pip_requirements,
        input_example,
        model_signature,
    )
    from workbench.workspace import init_workspace

    with tempfile.TemporaryDirectory() as folder:
        workspace = init_workspace(Path(folder) / "archive")
        os.environ["WORKBENCH_HOME"] = str(workspace.root)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        torch.manual_seed(0)
        checkpoint = Path(folder) / f"{args.size}.safetensors"
        save_checkpoint(checkpoint, TwoStageUNet(SIZES[args.size]), {"source": "benchmark: random weights"})
        mlflow = tracking.configure(workspace)

        def logged_by_pyfunc(name: str, **described) -> None:
            with tracking.start_run("benchmark", run_name=name, workspace=workspace):
                info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE), pip_requirements=_pip_requirements(),
                                               artifacts={"weights": str(checkpoint),
                                                          "config": str(checkpoint.with_suffix(".json"))},
                                               **described)
            registry = mlflow.MlflowClient()
            _ensure_registered_model(registry, name)
            registry.create_model_version(name, source=info.model_uri, run_id=info.run_id, model_id=info.model_id)

        def baseline() -> None:
            logged_by_pyfunc("baseline")

        def checked() -> None:
            logged_by_pyfunc("checked", signature=model_signature(), input_example=input_example())

        def now() -> None:
            register_checkpoint(checkpoint, "now", experiment="benchmark", workspace=workspace)

        variants = {"baseline": baseline, "checked": checked, "now": now}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for register in variants.values():  # warm-up: imports, the store's first writes
            register()
        for _ in range(args.rounds):
            for name, register in variants.items():
                started = time.perf_counter()
                register()
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"size {args.size}, {args.rounds} rounds, median seconds per registration:")
    for name, value in medians.items():
        print(f"  {name:9s} {value:6.2f} s   x{value / medians['baseline']:.2f} of baseline   "
              f"(all: {', '.join(f'{v:.2f}' for v in times[name])})")


if __name__ == "__main__":
    main()
