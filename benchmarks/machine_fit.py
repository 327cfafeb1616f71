"""Benchmark: how much CAN fitting the general model to one machine gain, with a given recipe and network?

`benchmarks/finetune.py` measures what `workbench finetune` gains over the general model. When that gain is
small, two explanations are possible: the fine-tuning falls short, or there is nothing to gain. This
script separates them with a ceiling: a SPECIALIST, a model pretrained with the same recipe on that
machine's noise alone. For the demo's target machine and variants of it that add a machine-specific noise
the general model never heard, each registered as its own machine in the benchmark workspace:

    as-is              the demo's machine
    noisy-preamp       the same deck with a noisy playback preamplifier (electronics_dbfs -60: a roar
                       below ~1.3 kHz, shaped by the cassette playback EQ)
    ground-loop-buzz   the same deck transferred with a ground loop (60 Hz hum at -62 dBFS, strong harmonics)

it renders and ingests blank tape (the variants copy every simulator parameter of the deck, with clicks and
dropouts off), runs a fresh `finetune_device` study, pretrains the specialist, and prints ΔSNR on the
machine's test fragments (the finetune protocol) side by side:

    machine    base model    fine-tuned    specialist    spectral gating    fine-tuned − base    specialist − base

    .venv/bin/python benchmarks/machine_fit.py [--folder /tmp/workbench-bench-finetune] [--recipe quickstart]
                                               [--variants as-is,noisy-preamp,ground-loop-buzz] [--json]

It shares its workspace (and so the archive and general model) with benchmarks/finetune.py. Each
specialist is registered there as a new version of tape-denoiser-general; the @base alias, which
`finetune` starts from, stays where it was. With the quickstart recipe the three variants took 14 minutes
on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune import build_up_to_general_model  # noqa: E402  (benchmarks/finetune.py)

BLANK_TAPE_SECONDS = 120.0  # as the demo archive's
VARIANTS = {
    "as-is": {},
    "noisy-preamp": {"electronics_dbfs": -60.0},
    "ground-loop-buzz": {"hum_dbfs": -62.0, "hum_harmonics_db": [-3.0, -2.0, -6.0, -4.0, -8.0, -9.0, -12.0]},
}
SPECIALIST = "specialist"


def variant_machine(workspace, target: str, name: str, speed: float) -> str:
    """Register the target deck with one added fault as machine `<target>-<name>`, its blank tape ingested."""
    from workbench.demo import INGEST_BY_SCALE
    from workbench.devices import get_device, write_device
    from workbench.noise.ingest import capture_noise
    from workbench.synth.tape_noise import SIMULATION_KEYS, device_signature, render_blank_tape

    if not VARIANTS[name]:
        return target
    deck = get_device(workspace, target)
    # Every parameter of the deck's own signature, so that only the fault differs (a new id alone would
    # draw new derived values).
    signature = device_signature(deck).to_json()
    simulation = {key: signature[key] for key in SIMULATION_KEYS if key in signature}
    simulation |= {"clicks_per_minute": 0.0, "dropouts_per_minute": 0.0, **VARIANTS[name]}
    machine = dataclasses.replace(deck, id=f"{target}-{name}", notes=f"benchmark variant of {target}: {name}",
                                  simulation=simulation)
    write_device(workspace, machine, replace=True)
    tape = workspace.root / "machine-fit" / f"{machine.id}.wav"
    if not tape.is_file():
        render_blank_tape(machine, speed, BLANK_TAPE_SECONDS, tape, seed=1)
    snippet_seconds, split = INGEST_BY_SCALE["demo"]
    capture_noise(workspace, [tape], machine.id, speed, tape="synthetic", snippet_seconds=snippet_seconds, split=split)
    return machine.id


def measure(workspace, machine: str, recipe: str) -> dict:
    """Fine-tune (a fresh study), pretrain the specialist, score both with the base and spectral gating."""
    from workbench.finetune import BASE_MODEL, FINE_TUNED, SPECTRAL_GATING, evaluate_models, finetune_device, make_plan
    from workbench.model.checkpoint import load_checkpoint
    from workbench.train.pretrain import pretrain

    timings = {}
    started = time.perf_counter()
    journal = workspace.registry / f"bench-fit-{machine}-{time.strftime('%Y%m%d-%H%M%S')}.journal"
    fitted = finetune_device(workspace, machine, recipe=recipe, storage=f"journal:{journal}")
    timings["finetune"] = time.perf_counter() - started
    started = time.perf_counter()
    specialist = pretrain(workspace, recipe, noise_devices=[machine])
    timings["specialist"] = time.perf_counter() - started
    model, _ = load_checkpoint(specialist.checkpoint)
    scored = evaluate_models(make_plan(workspace, machine, recipe=recipe), {SPECIALIST: model})
    snrs = fitted.snrs_db
    table = fitted.table()
    delta = {method: [cell[0] for cell in table[method]] for method in (BASE_MODEL, FINE_TUNED, SPECTRAL_GATING)}
    delta[SPECIALIST] = [scored.summary(SPECIALIST, snr).mean for snr in snrs]
    return {"machine": machine, "snrs_db": snrs, "delta_snr_db": delta, "timings_s": timings,
            "fine_tuned_minus_base_db": [f - b for f, b in zip(delta[FINE_TUNED], delta[BASE_MODEL])],
            "specialist_minus_base_db": [s - b for s, b in zip(delta[SPECIALIST], delta[BASE_MODEL])]}


def main() -> int:
    from workbench.model.allocator import tune_allocator

    tune_allocator()  # as the CLI does: see workbench.model.allocator
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "workbench-bench-finetune",
                        help="workspace for the benchmark (shared with benchmarks/finetune.py; reused)")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    from workbench.demo import fine_tuned_device
    from workbench.finetune import BASE_MODEL, FINE_TUNED, SPECTRAL_GATING

    workspace, manifest, _ = build_up_to_general_model(args.folder, args.recipe)
    target = fine_tuned_device(manifest)
    speed = next(t["speed_ips"] for t in manifest["blank_tapes"] if t["device"] == target)
    results = []
    for name in names:
        machine = variant_machine(workspace, target, name, speed)
        print(f"{name}: {machine} ...", file=sys.stderr, flush=True)
        results.append({"variant": name, **measure(workspace, machine, args.recipe)})
    if args.json:
        print(json.dumps({"recipe": args.recipe, "results": results}, indent=2))
        return 0
    snrs = results[0]["snrs_db"]
    columns = (BASE_MODEL, FINE_TUNED, SPECIALIST, SPECTRAL_GATING)
    print(f"ΔSNR (dB) on each machine's test fragments at {' / '.join(f'{s:g}' for s in snrs)} dB input, "
          f"recipe {args.recipe}")
    print(f"{'variant':18s}" + "".join(f"{c:>18s}" for c in columns) + f"{'fine-tuned − base':>20s}"
          + f"{'specialist − base':>20s}")
    for result in results:
        cells = "".join(" / ".join(f"{v:+.2f}" for v in result["delta_snr_db"][c]).rjust(18) for c in columns)
        gains = "".join(" / ".join(f"{v:+.2f}" for v in result[key]).rjust(20)
                        for key in ("fine_tuned_minus_base_db", "specialist_minus_base_db"))
        print(f"{result['variant']:18s}{cells}{gains}")
    print("time: " + "; ".join(f"{r['variant']} " + ", ".join(f"{k} {v:.0f} s" for k, v in r["timings_s"].items())
                               for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
