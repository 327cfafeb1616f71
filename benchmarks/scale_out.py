"""Benchmark scale-out: trials per minute with one and two `workbench finetune` workers on one study, and
what PostgreSQL (the Optuna storage) and an MLflow tracking server each add to a trial.

Starts its own PostgreSQL server and MLflow tracking server (PostgreSQL backend store, proxied artifacts;
the same helpers as the tests, tests/services.py), builds a tiny archive (one machine's blank tape,
synthetic music), and runs fresh studies of the same tiny recipe (the tiny network, 3 steps per trial,
only the learning rate searched, no pruning) as real `workbench finetune` processes:

    storage     tracking           workers
    SQLite      workspace SQLite   1        the baseline: everything local, one process
    PostgreSQL  workspace SQLite   1        -> PostgreSQL's overhead per trial
    SQLite      MLflow server      1        -> the server's overhead per trial
    PostgreSQL  MLflow server      1        the README's scale-out set-up ...
    PostgreSQL  MLflow server      2        ... with a second worker: trials per minute

A study's time runs from its first trial's start to its last trial's end (Optuna's own timestamps), so
process start, evaluation and registration are left out; seconds per trial = that time / trials.
The configurations run in turn, `--rounds` times (so a busy spell of the machine falls on all of them);
each is reported by its median round (the faster middle one for an even count: with 2 rounds, the faster
round), with the spread over rounds. Overheads are differences and
ratios of medians against the baseline measured in the same run.

    .venv/bin/python benchmarks/scale_out.py [--trials 8] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "tests"))  # services.py: the PostgreSQL and MLflow servers the tests use

DEVICE = "uher-4000-l"
SPEED = 3.75
RECIPE = """
name = "bench-scale"
[model]
size = "tiny"
[data]
segment_seconds = 0.25
validation_mixtures = 2
validation_seconds = 0.25
num_workers = 0
seed = 7
[schedule]
steps = 3
batch_size = 2
validate_every = 1
checkpoint_every = 1
learning_rate = 3e-3
shape = "constant"
[finetune]
trials = {trials}
seed = 0
[finetune.search]
"schedule.learning_rate" = {{ type = "float", low = 2e-3, high = 1e-2, log = true }}
[finetune.pruner]
type = "none"
[evaluation]
fragments = 2
seconds = 0.5
seed = 3
batch_size = 2
"""


def build_archive(folder: Path, trials: int) -> tuple[Path, Path]:
    """A workspace with one machine's noise (20 s of blank tape), a tiny corpus and the recipe; and a random
    tiny network as the base checkpoint. Returns (workspace root, base checkpoint)."""
    import torch

    from workbench.corpus import add_corpus
    from workbench.devices import get_device
    from workbench.model.checkpoint import save_checkpoint
    from workbench.model.unet import TwoStageUNet, get_config
    from workbench.noise.ingest import capture_noise
    from workbench.synth.music import render_music
    from workbench.synth.tape_noise import render_blank_tape
    from workbench.workspace import init_workspace

    ws = init_workspace(folder / "archive", with_research_devices=True)
    tape = folder / "tape.wav"
    render_blank_tape(get_device(ws, DEVICE), SPEED, 20.0, tape, seed=0)
    capture_noise(ws, [tape], DEVICE, SPEED, snippet_seconds=1.0, split=(60.0, 20.0, 20.0))
    for number, (split, seconds) in enumerate({"train": 40.0, "validation": 10.0, "test": 10.0}.items()):
        render_music(folder / "music" / split, seconds / 60, seed=100 + number, piece_seconds=min(seconds, 20.0))
    add_corpus(ws, folder / "music", name="tiny-music")
    ws.recipes_dir.mkdir(exist_ok=True)
    (ws.recipes_dir / "bench-scale.toml").write_text(RECIPE.format(trials=trials))
    torch.manual_seed(0)
    base = folder / "base.safetensors"
    save_checkpoint(base, TwoStageUNet(get_config("tiny")), {"kind": "benchmark base: random weights"})
    return ws.root, base


def run_study(template: Path, folder: Path, base: Path, *, storage: str | None, tracking_uri: str | None,
              workers: int, trials: int) -> dict:
    """Fresh copy of the archive, `workers` finetune processes on one study; the study's timing."""
    import optuna

    from workbench.train.tuning import FINISHED, open_storage

    root = folder / "archive"
    shutil.copytree(template, root)
    env = {**os.environ, "WORKBENCH_HOME": str(root), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    storage = storage or f"sqlite:///{root / 'registry' / 'optuna.db'}"
    command = [sys.executable, "-m", "workbench", "finetune", "--device", DEVICE, "--recipe", "bench-scale",
               "--base", str(base), "--storage", storage, "--trials", str(trials), "--accelerator", "cpu", "--json"]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(workers)]
    failures = []
    for process in processes:  # every worker is waited for, so none outlives the servers
        out, err = process.communicate()
        if process.returncode != 0:
            failures.append(f"finetune failed ({process.returncode}): {err[-3000:]}")
    if failures:
        raise SystemExit("\n".join(failures))
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=f"finetune-{DEVICE}", storage=open_storage(storage))
    done = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"trials": len(done), "study_s": span, "s_per_trial": span / len(done),
            "trials_per_min": 60 * len(done) / span, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per study (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="times each configuration runs (default 2)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")

    from services import mlflow_server, postgres_absent, postgres_server

    reason = postgres_absent()
    if reason:
        raise SystemExit(f"cannot benchmark scale-out: {reason}")
    folder = Path(tempfile.mkdtemp(prefix="workbench-bench-scale-"))
    try:
        template, base = build_archive(folder / "template", args.trials)
        configs = [("SQLite", "workspace SQLite", 1), ("PostgreSQL", "workspace SQLite", 1),
                   ("SQLite", "MLflow server", 1), ("PostgreSQL", "MLflow server", 1),
                   ("PostgreSQL", "MLflow server", 2)]
        rounds: list[list[dict]] = [[] for _ in configs]
        with postgres_server() as postgres, mlflow_server(postgres.database("mlflow"), folder / "server") as server:
            for round_number in range(args.rounds):
                for number, (storage, tracking, workers) in enumerate(configs):
                    name = f"optuna_{round_number}_{number}"
                    url = postgres.database(name) if storage == "PostgreSQL" else None
                    uri = server.uri if tracking == "MLflow server" else None
                    result = run_study(template, folder / name, base, storage=url, tracking_uri=uri,
                                       workers=workers, trials=args.trials)
                    rounds[number].append(result)
                    print(f"round {round_number + 1}: {storage:10s} {tracking:16s} {workers} worker(s): "
                          f"{result['trials']} trials in {result['study_s']:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = []
    for (storage, tracking, workers), runs in zip(configs, rounds):
        median = sorted(runs, key=lambda r: r["s_per_trial"])[(len(runs) - 1) // 2]
        results.append({"storage": storage, "tracking": tracking, "workers": workers, **median,
                        "s_per_trial_rounds": [r["s_per_trial"] for r in runs]})

    baseline = results[0]["s_per_trial"]
    for result in results:
        result["overhead_s_per_trial"] = result["s_per_trial"] - baseline
        result["ratio_to_baseline"] = result["s_per_trial"] / baseline
    one, two = results[3]["trials_per_min"], results[4]["trials_per_min"]
    summary = {"trials_per_min_one_worker": one, "trials_per_min_two_workers": two, "speed_up_two_workers": two / one,
               "postgres_overhead_s_per_trial": results[1]["overhead_s_per_trial"],
               "server_overhead_s_per_trial": results[2]["overhead_s_per_trial"]}
    if args.json:
        print(json.dumps({"results": results, "summary": summary}, indent=2))
        return 0
    print(f"{'Optuna storage':15s} {'MLflow store':17s} {'workers':>7s} {'trials':>6s} {'s/trial':>8s} "
          f"{'rounds':>13s} {'trials/min':>10s} {'vs baseline':>12s}")
    for result in results:
        spread = f"{min(result['s_per_trial_rounds']):.2f}-{max(result['s_per_trial_rounds']):.2f}"
        print(f"{result['storage']:15s} {result['tracking']:17s} {result['workers']:7d} {result['trials']:6d} "
              f"{result['s_per_trial']:8.2f} {spread:>13s} {result['trials_per_min']:10.1f} "
              f"{result['ratio_to_baseline']:11.2f}x")
    print(f"PostgreSQL adds {summary['postgres_overhead_s_per_trial']:+.2f} s per trial "
          f"({results[1]['ratio_to_baseline']:.2f}x the baseline), the MLflow server "
          f"{summary['server_overhead_s_per_trial']:+.2f} s ({results[2]['ratio_to_baseline']:.2f}x); "
          f"two workers: {two:.1f} trials/min against {one:.1f} with one ({two / one:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
