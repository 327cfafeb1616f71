"""Benchmark training: steps/s and samples/s of the real loop per model size, next to the data pipeline's own rate.

What it measures, in one process on one synthetic archive (3 devices' blank tape ingested into a noise
library, a minute of synthetic music), all with the same segment length and batch size:

1. The data pipeline alone (the baseline): the DataLoader over `TrainingExamples` (clean crop, noise crop,
   SNR and gain per example) with 0 and with --workers worker processes, then the same plus Eq. 1 mixing
   and the two STFTs on the training device: batches/s and samples/s, the model removed.
2. The training loop (`workbench.train.loop.train`, the one pretrain and finetune use) per size: steps/s
   and samples/s between the first and the last step (the first step, with its one-off costs, is not
   counted). The paper size is slow on a CPU and runs only --paper-steps steps.
3. Side by side: the ratio of the pipeline's samples/s to the loop's. Above 1 the model limits (the
   pipeline has that much headroom); below 1 the data pipeline does, and more workers would help.
4. Before and after the speed work, in the same run: each size's loop runs in child processes, `before`
   (the plain reference network code, `reference_path()`, with glibc's default allocator, in float32:
   landed main), `after float32` (the fast path with the allocator tuned) and `after` (the same at the
   recipes' default precision, "auto": bf16 autocast on a CUDA GPU, and on a CPU with bf16 in hardware (AMX or
   AVX-512 bf16) for networks at least 16 channels wide; `workbench.train.loop.uses_bf16`), interleaved
   --repeats times; the speed-ups are the best samples/s over before's.

    .venv/bin/python benchmarks/train.py [--sizes tiny,small,paper] [--segment 1.0] [--batch 4]
                                          [--steps 12] [--paper-steps 3] [--workers 2] [--accelerator cpu|cuda]
                                          [--repeats 1]

Timings are wall-clock on whatever else the machine is doing; on a shared machine, run it twice.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEVICES = (("revox-a77", 7.5), ("uher-4000-l", 3.75), ("technics-tr575-a", 1.875))


def build_archive(root: Path):
    """A workspace with ingested blank tape of three machines and a registered minute of synthetic music."""
    from workbench.corpus import add_corpus
    from workbench.devices import get_device
    from workbench.noise.ingest import capture_noise
    from workbench.synth.music import render_music
    from workbench.synth.tape_noise import render_blank_tape
    from workbench.workspace import init_workspace

    workspace = init_workspace(root / "archive")
    for seed, (device_id, speed) in enumerate(DEVICES):
        tape = root / "tapes" / f"{device_id}.wav"
        render_blank_tape(get_device(workspace, device_id), speed, 30.0, tape, seed=seed)
        capture_noise(workspace, [tape], device_id, speed, snippet_seconds=2.0, split=(60.0, 20.0, 20.0))
    for seed, (split, seconds) in enumerate((("train", 60.0), ("validation", 10.0), ("test", 10.0))):
        render_music(root / "music" / split, seconds / 60, seed=seed, piece_seconds=min(seconds, 30.0))
    add_corpus(workspace, root / "music", name="bench")
    return workspace


def data_rate(examples, batches: int, batch_size: int, workers: int, device: str, mix: bool) -> float:
    """Samples/s of the DataLoader (optionally with mixing and STFTs on `device`), after one warm-up batch."""
    from workbench.model.stft import analysis
    from workbench.train.data import mix_batch, training_batches

    loader = training_batches(examples, 0, batches + 1, batch_size, num_workers=workers,
                              pin_memory=device.startswith("cuda"))
    started = None
    for number, batch in enumerate(loader):
        if mix:
            noisy, target = mix_batch(batch, device)
            spectra = analysis(noisy), analysis(target)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            del spectra
        if number == 0:
            started = time.perf_counter()
    return batches * batch_size / (time.perf_counter() - started)


def train_rate(size: str, examples, validation, steps: int, batch_size: int, workers: int, device: str,
               folder: Path, precision: str = "auto") -> tuple[float, int]:
    """Steps/s of the real training loop for `size`, from the end of step 1 to the end of the last step."""
    from workbench.model.unet import SIZES, TwoStageUNet, count_parameters
    from workbench.train.loop import Schedule, train

    torch.manual_seed(0)
    model = TwoStageUNet(SIZES[size])
    schedule = Schedule(steps=steps, batch_size=batch_size, learning_rate=1e-4, validate_every=10**9,
                        checkpoint_every=10**9, precision=precision)
    stamps: dict[int, float] = {}
    train(model, schedule, examples, validation, folder / size, device=device, num_workers=workers,
          progress=lambda stage, done, total=None, **fields: stamps.__setitem__(int(done), time.perf_counter()))
    return (steps - 1) / (stamps[steps] - stamps[1]), count_parameters(SIZES[size])


def child_rate(spec: dict) -> dict:
    """One size's training rate in this (child) process, as variant `before`, `after float32` or `after`."""
    import contextlib

    from workbench.corpus import corpus_files
    from workbench.model.allocator import tune_allocator
    from workbench.model.unet import reference_path
    from workbench.noise.library import NoiseLibrary
    from workbench.train.data import MixingSpec, TrainingExamples, stored_mixtures
    from workbench.workspace import Workspace

    if spec["variant"] != "before":
        tune_allocator()
    workspace = Workspace(Path(spec["root"]) / "archive")
    library = NoiseLibrary(workspace)
    examples = TrainingExamples(corpus_files(workspace, "train"), library.snippets(split="train"),
                                round(spec["segment"] * 44_100), MixingSpec(), seed=1)
    validation = stored_mixtures(workspace.mixtures_dir, "validation", corpus_files(workspace, "validation"),
                                 library.snippets(split="validation"), 1, spec["segment"], MixingSpec(), 1)
    with reference_path() if spec["variant"] == "before" else contextlib.nullcontext():
        steps_per_s, _ = train_rate(spec["size"], examples, validation, spec["steps"], spec["batch"],
                                    spec["workers"], spec["device"], Path(spec["root"]) / f"runs-{spec['variant']}",
                                    precision=VARIANT_PRECISION[spec["variant"]])
    return {"steps_per_s": steps_per_s}


VARIANT_PRECISION = {"before": "float32", "after float32": "float32", "after": "auto"}


def compare(root: Path, args, sizes: list[str]) -> None:
    """Before vs after per size, each in its own child process, interleaved."""
    import json
    import subprocess

    from workbench.model.unet import SIZES
    from workbench.train.loop import uses_bf16

    print(f"\nbefore (reference code, glibc default allocator, float32) vs after (fast path, allocator tuned), "
          f"in float32 and at precision auto; children interleaved, {args.repeats} each")
    print(f"  {'size':<6} {'before samples/s':>17} {'after f32':>10} {'speed-up':>9} {'after auto':>11} {'speed-up':>9}"
          f"  auto is")
    for size in sizes:
        steps = args.paper_steps if size == "paper" else args.steps
        best = {}
        for _ in range(args.repeats):
            for variant in VARIANT_PRECISION:
                spec = {"variant": variant, "size": size, "root": str(root), "segment": args.segment,
                        "steps": steps, "batch": args.batch, "workers": args.workers, "device": args.device}
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"child {spec} failed:\n{done.stderr[-3000:]}")
                rate = json.loads(done.stdout.strip().splitlines()[-1])["steps_per_s"] * args.batch
                best[variant] = max(best.get(variant, 0.0), rate)
        print(f"  {size:<6} {best['before']:>17.2f} {best['after float32']:>10.2f} "
              f"{best['after float32'] / best['before']:>8.2f}× {best['after']:>11.2f} "
              f"{best['after'] / best['before']:>8.2f}×  "
              f"{'bf16' if uses_bf16('auto', torch.device(args.device), SIZES[size]) else 'float32'}", flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        import json

        print(json.dumps(child_rate(json.loads(sys.argv[2]))))
        return
    from workbench.model.allocator import tune_allocator

    tune_allocator()  # as the CLI does: see workbench.model.allocator
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small,paper")
    parser.add_argument("--segment", type=float, default=1.0, help="seconds per training example")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="steps timed for tiny and small")
    parser.add_argument("--paper-steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-batches", type=int, default=40)
    parser.add_argument("--accelerator", dest="device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="children per variant in the before/after table")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the before/after table")
    args = parser.parse_args()

    from workbench.corpus import corpus_files
    from workbench.noise.library import NoiseLibrary
    from workbench.train.data import MixingSpec, TrainingExamples, stored_mixtures

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        started = time.perf_counter()
        workspace = build_archive(root)
        library = NoiseLibrary(workspace)
        frames = round(args.segment * 44_100)
        examples = TrainingExamples(corpus_files(workspace, "train"), library.snippets(split="train"), frames,
                                    MixingSpec(), seed=1)
        validation = stored_mixtures(workspace.mixtures_dir, "validation", corpus_files(workspace, "validation"),
                                     library.snippets(split="validation"), 1, args.segment, MixingSpec(), 1)
        print(f"synthetic archive built in {time.perf_counter() - started:.1f} s; device {args.device}, "
              f"torch threads {torch.get_num_threads()}, segment {args.segment:g} s, batch {args.batch}")

        if args.skip_pipeline:
            compare(root, args, args.sizes.split(","))
            return
        print("\ndata pipeline alone (the baseline)")
        pipeline = {}
        for workers in sorted({0, args.workers}):
            for mix in (False, True):
                rate = data_rate(examples, args.data_batches, args.batch, workers, args.device, mix)
                pipeline[(workers, mix)] = rate
                what = "load + mix + STFT" if mix else "load"
                print(f"  {what:<18} workers {workers}: {rate / args.batch:8.2f} batches/s {rate:9.1f} samples/s")
        baseline = pipeline[(args.workers, True)]

        print(f"\ntraining loop (workers {args.workers}) vs the data pipeline's {baseline:.1f} samples/s")
        print(f"  {'size':<6} {'parameters':>11} {'steps/s':>9} {'samples/s':>10} {'pipeline/loop':>14}  limited by")
        for size in args.sizes.split(","):
            steps = args.paper_steps if size == "paper" else args.steps
            steps_per_s, parameters = train_rate(size, examples, validation, steps, args.batch, args.workers,
                                                 args.device, root / "runs")
            samples = steps_per_s * args.batch
            ratio = baseline / samples
            print(f"  {size:<6} {parameters:>11,} {steps_per_s:>9.3f} {samples:>10.2f} {ratio:>13.1f}x  "
                  f"{'the model' if ratio > 1 else 'the data pipeline'}", flush=True)
        compare(root, args, args.sizes.split(","))
        print("\nSeconds of audio per second of training = samples/s × segment; "
              "the paper trained at about 1.85 steps/s × 16 × 5 s = 148 s/s on one RTX 3090.")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
