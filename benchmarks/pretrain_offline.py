"""Pretrain a general model on a machine with torch and a GPU but no MLflow; register it at home.

A rented or lent accelerator often has torch and nothing else. This script runs there what `workbench
pretrain` runs, minus the MLflow run, into a run folder that `workbench pretrain --resume` at home adopts:
it opens the MLflow run, logs the recipe, the data lineage and the validation history, and registers the
best weights. How the boxed general model (models/general/) was trained.

There (the repository, soundfile and torch; nothing else of the lock):
    python benchmarks/pretrain_offline.py --folder WS --out RUNS --budget-s 480 [--size tiny --size small]

1. Unless --folder is a workspace already, build its data as the demo's first three stages do (the
   synthetic archive, scale demo, seed 0; capture-noise; the clean corpus). The same seed gives the same
   archive only with the same numerical libraries: on the H200 (numpy 2.5.2 against the lock's 2.4.6) the
   audio differed in its last bits and screening kept one snippet fewer. The digests printed here and
   recorded in run.json compare with those of the workspace at home (`--digests` prints them).
2. One child process per --size (with its --learning-rate), all sharing the accelerator until the same
   deadline. Each:
   a. prepares the recipe's data exactly as `workbench pretrain` does;
   b. checks the network's fast path against its reference code on this accelerator (a forward and a
      backward pass), and trains on the reference code if they differ;
   c. times a throwaway run and sets the step count that ends the cosine schedule before the deadline
      (or trains --steps);
   d. trains with the shared loop (`loop.train`) into RUNS/SIZE[-LR]/, where run.json records what MLflow
      would have: the recipe as trained, the data digests, the hardware, the seconds, the validations.
At home: copy that folder to WS/registry/runs/pretrain-RECIPE-STAMP/, set the recipe's schedule.steps to the
steps trained, and run `workbench pretrain --recipe RECIPE --resume --alias base`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE_STEPS = 300  # the first 20 (start-up, autotuning) are not timed
UNTIMED_STEPS = 20
RESERVE_S = 25.0  # the last validation, the last state, the process's exit


def build_data(folder: Path) -> None:
    """The demo's stages 1-3: the synthetic archive, its noise in the library, its clean corpus."""
    from workbench.demo import DemoSettings, demo_stages, prepare_workspace

    settings = DemoSettings(folder=folder)
    workspace = prepare_workspace(settings)
    for stage, _ in zip(demo_stages(workspace, settings), range(3)):
        started = time.perf_counter()
        result = stage.run(lambda *args, **fields: None)
        print(f"{stage.name}: {result.summary} ({time.perf_counter() - started:.0f} s)", flush=True)


def data_digests(folder: Path, recipe_name: str) -> dict:
    """Digests of the recipe's noise and clean files per split (the validation mixtures' key digests)."""
    from workbench.corpus import corpus_files
    from workbench.recipes import load_recipe
    from workbench.train.data import _digest
    from workbench.train.pretrain import select_noise
    from workbench.workspace import Workspace

    workspace = Workspace(folder)
    data = load_recipe(recipe_name, workspace)["data"]
    return {split: {"noise": _digest(select_noise(workspace, data["devices"], data["speeds"], split)),
                    "clean": _digest(corpus_files(workspace, split, data["corpora"]))}
            for split in ("train", "validation")}


def check_fast_path(config, device: str) -> dict:
    """The fast path's output and gradients against the reference code's, fp32, on `device`."""
    import torch

    from workbench.model.stft import analysis
    from workbench.model.unet import TwoStageUNet, reference_path

    torch.manual_seed(0)
    model = TwoStageUNet(config).to(device)
    spec = analysis(0.1 * torch.randn(2, 44_100, device=device))
    results = {}
    for name, mode in (("fast", contextlib.nullcontext), ("reference", reference_path)):
        model.zero_grad(set_to_none=True)
        try:
            with mode():
                s1, s2 = model(spec)
                (s1.square().mean() + s2.square().mean()).backward()
        except Exception as error:  # noqa: BLE001 - any failure of the fast path means: train on the reference
            return {"ok": False, "error": f"{name}: {type(error).__name__}: {error}"}
        results[name] = (s2.detach().clone(), [p.grad.detach().clone() for p in model.parameters()])
    (fast, fast_grads), (reference, reference_grads) = results["fast"], results["reference"]
    output_error = float((fast - reference).abs().max() / reference.abs().max())
    gradient_error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-20))
                         for a, b in zip(fast_grads, reference_grads))
    # TF32 convolutions (cuDNN's default) differ from fp32 in the 3rd-4th digit; a wrong fast path by far more.
    return {"ok": output_error < 1e-2 and gradient_error < 5e-2, "output_error": output_error,
            "gradient_error": gradient_error}


def steps_for_budget(args: argparse.Namespace, recipe: dict, data, config, device: str, mode) -> int:
    """Time a throwaway run of the recipe's batches; the step count (a whole number of validations) that
    ends the schedule before the deadline."""
    import torch

    from workbench.model.unet import TwoStageUNet
    from workbench.train.loop import Schedule, train

    times: dict[int, float] = {}

    def clock(stage, done, total=None, **fields):
        times[int(done)] = time.perf_counter()

    torch.manual_seed(recipe["data"]["seed"])
    with mode(), tempfile.TemporaryDirectory(prefix=f"probe-{args.name}-") as scratch:
        train(TwoStageUNet(config), Schedule.from_recipe(recipe, steps=args.probe_steps, validate_every=10**9,
                                                         checkpoint_every=10**9),
              data.examples, data.validation, Path(scratch), device=device, num_workers=args.workers, progress=clock)
    rate = (args.probe_steps - UNTIMED_STEPS) / (times[args.probe_steps] - times[UNTIMED_STEPS])
    every = recipe["schedule"]["validate_every"]
    steps = int(rate * (args.deadline - time.time() - RESERVE_S) * 0.93) // every * every
    assert steps >= every, f"[{args.name}] {rate:.1f} steps/s leaves no time to train"
    print(f"[{args.name}] {rate:.1f} steps/s in the probe: training {steps} steps", flush=True)
    return steps


def train_child(args: argparse.Namespace) -> int:
    """One size: prepare the data, check the fast path, probe the rate, train until the deadline."""
    import torch

    from workbench import tracking
    from workbench.model.unet import TwoStageUNet, get_config, reference_path
    from workbench.recipes import load_recipe, recipe_digest
    from workbench.train.distributed import Distributed
    from workbench.train.loop import Schedule, train
    from workbench.train.pretrain import _prepare_data
    from workbench.workspace import Workspace

    torch.set_num_threads(1)  # the accelerator trains; this process feeds it (several share the cores)
    torch.backends.cudnn.benchmark = True  # every batch has the same shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workspace = Workspace(args.folder)
    size = args.size[0] if args.size else load_recipe(args.recipe, workspace)["model"]["size"]
    overrides = {"model.size": size, **({"schedule.learning_rate": args.learning_rate} if args.learning_rate else {})}
    recipe = load_recipe(args.recipe, workspace, overrides=overrides)
    data = _prepare_data(workspace, recipe, Distributed(), lambda *a, **k: None)
    config = get_config(size)
    check = check_fast_path(config, device)
    print(f"[{args.name}] fast path on {device}: {check}", flush=True)
    mode = contextlib.nullcontext if check["ok"] else reference_path

    steps = args.steps or steps_for_budget(args, recipe, data, config, device, mode)
    recipe = load_recipe(args.recipe, workspace, overrides={**overrides, "schedule.steps": steps})

    # d. Train into RUNS/NAME (the first run; the others in a scratch folder, then their best weights and
    # run record copied there: a machine may hand back only so many files) with the run record MLflow would have kept.
    run_dir = args.out / args.name if args.keep_all else Path(tempfile.gettempdir()) / "pretrain-offline" / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {"recipe": recipe, "recipe_digest": recipe_digest(recipe), "started": started, "finished": False,
              "trained_offline": {"system": tracking.system_info(device, 1), "fast_path_check": check,
                                  "data_digests": data_digests(args.folder, args.recipe)}}
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))
    torch.manual_seed(recipe["data"]["seed"])
    model = TwoStageUNet(config)
    last_print = [0.0]

    def report(stage, done, total=None, **fields):
        if time.perf_counter() - last_print[0] > 30 or done == total:
            last_print[0] = time.perf_counter()
            shown = " ".join(f"{k}={v:.4g}" for k, v in fields.items() if isinstance(v, float))
            print(f"[{args.name}] step {int(done)}/{total} {shown}", flush=True)

    begun = time.perf_counter()
    with mode():
        result = train(model, Schedule.from_recipe(recipe), data.examples, data.validation, run_dir, device=device,
                       num_workers=args.workers, progress=report, validate_at_start=True, stage=f"pretrain {size}")
    seconds = time.perf_counter() - begun
    record["trained_offline"] |= {"seconds": round(seconds, 1), "steps": result.step,
                                  "steps_per_s": round(result.steps_per_s, 3),
                                  "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    record["history"] = result.history
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))
    if not args.keep_all:
        (args.out / args.name).mkdir(parents=True, exist_ok=True)
        for name in ("run.json", "best.safetensors"):
            shutil.copyfile(run_dir / name, args.out / args.name / name)
    print(f"[{args.name}] {result.step} steps in {seconds:.0f} s; best {result.best}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="the workspace (built when it is not one yet)")
    parser.add_argument("--out", type=Path, help="where each run folder is written (required to train)")
    parser.add_argument("--recipe", default="general")
    parser.add_argument("--size", action="append", help="network size (repeat for several; default: the recipe's)")
    parser.add_argument("--learning-rate", type=float, action="append", default=[],
                        help="per --size, in order: its learning rate (default: the recipe's)")
    parser.add_argument("--workers", type=int, default=6, help="DataLoader workers per size")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds from start to the end of training")
    parser.add_argument("--steps", type=int, help="train this many steps (no probe, no budget)")
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="steps of the throwaway run timed")
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--keep-all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--digests", action="store_true", help="print the data digests of --folder and exit")
    args = parser.parse_args()
    from workbench.workspace import is_workspace

    args.folder = args.folder.resolve()
    if args.digests:
        print(json.dumps(data_digests(args.folder, args.recipe), indent=2))
        return 0
    if args.out is None:
        parser.error("--out is required to train")
    if args.deadline:  # a child: one size
        args.learning_rate = args.learning_rate[0] if args.learning_rate else None
        return train_child(args)
    deadline = time.time() + args.budget_s
    if not is_workspace(args.folder):
        build_data(args.folder)
    print(f"data digests: {json.dumps(data_digests(args.folder, args.recipe))}", flush=True)
    sizes = args.size or [None]
    children = []
    for index, size in enumerate(sizes):
        command = [sys.executable, __file__, "--folder", str(args.folder), "--out", str(args.out.resolve()),
                   "--recipe", args.recipe, "--workers", str(args.workers), "--deadline", str(deadline),
                   "--probe-steps", str(args.probe_steps)] + (["--steps", str(args.steps)] if args.steps else [])
        if size:
            command += ["--size", size]
        lr = args.learning_rate[index] if index < len(args.learning_rate) else None
        command += ["--name", "-".join(str(v) for v in (size or "model", lr) if v)] + (["--keep-all"] if index == 0 else [])
        if lr:
            command += ["--learning-rate", str(lr)]
        children.append(subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    return max(child.wait() for child in children)


if __name__ == "__main__":
    sys.exit(main())
