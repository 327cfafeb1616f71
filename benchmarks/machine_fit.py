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
dropouts off), runs a fresh `finetune_device` study, pretrains the specialist, and trains the CONTROL: an
equal-compute rival, the base model trained with the best trial's very settings (steps, learning rate,
schedule, frozen layers, the machine's validation noise choosing the kept step) on the general model's
noise mix instead of the machine's, mixed as the base's own last training mixed it (the box's synthetic hum
families included). A gain of the fine-tuned model over the control is specialisation,
not merely more training. When the recipe learns the machine's hum template ([finetune] hum_template),
the base network behind that template is scored too: what the network's own fine-tuning adds. All five models and spectral gating are then scored on the machine's test
fragments (the finetune protocol), and the script prints ΔSNR side by side, the paired gains of the
fine-tuned model over the base and over the control (mean [95 % t-interval of per-fragment
differences]), and the mains hum each model leaves (residual power at the hum's fundamental and first
three harmonics against the input noise's, dB; `workbench.evaluate.metrics.hum_residual`):

    machine  base  fine-tuned  control  specialist  spectral gating  | fine-tuned − base  fine-tuned − control | hum

    .venv/bin/python benchmarks/machine_fit.py [--folder /tmp/workbench-bench-finetune] [--recipe finetune-cpu]
                                               [--variants as-is,noisy-preamp,ground-loop-buzz] [--no-specialist]
                                               [--json]

It shares its workspace (and so the archive and general model) with benchmarks/finetune.py. Each
specialist is registered there as a new version of tape-denoiser-general; the @base alias, which
`finetune` starts from, stays where it was. With the quickstart recipe the three variants took 14 minutes
on two CPU cores before the control was added; with `--no-specialist`, on a 2-core machine shared with
other jobs (load about 12), as-is took 1454 s to fine-tune, 261 s for the control and 216 s to score.
"""

from __future__ import annotations

import argparse
import copy
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
CONTROL = "control (general noise)"
BASE_WITH_HUM = "base + hum template"  # the base network behind the fine-tuned model's hum template: what the network's fine-tuning adds


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
    signature = device_signature(deck).to_dict()
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


def measure(workspace, machine: str, recipe: str, general_devices: list[str], specialist: bool = True) -> dict:
    """Fine-tune (a fresh study), train the equal-compute control, pretrain the specialist (unless told
    not to: it costs a whole pretraining), score them all."""
    from workbench import model_registry
    from workbench.evaluate.baselines import SPECTRAL_GATING
    from workbench.evaluate.device_eval import evaluate_models
    from workbench.finetune import finetune_device, make_plan
    from workbench.model_registry.names import BASE_MODEL, FINE_TUNED
    from workbench.model.checkpoint import load_checkpoint
    from workbench.train.pretrain import pretrain

    timings = {}
    started = time.perf_counter()
    stamp = time.strftime('%Y%m%d-%H%M%S')
    journal = workspace.registry / f"bench-fit-{machine}-{stamp}.journal"
    fitted = finetune_device(workspace, machine, recipe=recipe, storage=f"journal:{journal}")
    timings["finetune"] = time.perf_counter() - started
    plan = make_plan(workspace, machine, recipe=recipe)
    started = time.perf_counter()
    control = train_control(plan, fitted.best_trial["params"], general_devices,
                            workspace.runs_dir / "machine-fit" / f"control-{machine}-{stamp}")
    timings["control"] = time.perf_counter() - started
    scored_models = {BASE_MODEL: plan.base_model, CONTROL: control}
    if specialist:
        started = time.perf_counter()
        scored_models[SPECIALIST] = load_checkpoint(pretrain(workspace, recipe, noise_devices=[machine]).checkpoint)[0]
        timings["specialist"] = time.perf_counter() - started
    uri = model_registry.model_uri(fitted.model_name, fitted.version)
    fine_tuned, _ = load_checkpoint(model_registry.fetch_checkpoint(uri, workspace)[0])
    started = time.perf_counter()
    if fine_tuned.hum_template is not None:
        scored_models[BASE_WITH_HUM] = copy.deepcopy(plan.base_model)
        scored_models[BASE_WITH_HUM].hum_template = fine_tuned.hum_template
    scored = evaluate_models(plan, {**scored_models, FINE_TUNED: fine_tuned})
    timings["evaluate"] = time.perf_counter() - started
    snrs = fitted.snrs_db
    models = [m for m in (BASE_MODEL, FINE_TUNED, CONTROL, BASE_WITH_HUM, SPECIALIST) if m in scored.methods]
    delta = {method: [scored.summary(method, snr).mean for snr in snrs] for method in (*models, SPECTRAL_GATING)}
    paired = {rival: [scored.paired(FINE_TUNED, rival, snr).to_dict() for snr in snrs]
              for rival in models if rival != FINE_TUNED}
    hum = {(h["method"], h["input_snr_db"]): h for h in scored.to_dict()["hum"]}
    return {"machine": machine, "snrs_db": snrs, "delta_snr_db": delta, "paired_gain_db": paired,
            "hum_db": {method: [hum[(method, snr)]["total_db"] if (method, snr) in hum else None for snr in snrs]
                       for method in (*models, SPECTRAL_GATING)},
            "hum_harmonics_db": {method: hum[(method, min(snrs))]["relative_db"] if (method, min(snrs)) in hum else None
                                 for method in (*models, SPECTRAL_GATING)},
            "fine_tuned": {"version": fitted.version, "promoted": fitted.promoted, "reason": fitted.reason,
                           "best_trial": fitted.best_trial},
            "timings_s": timings, "fragments": scored.summary(BASE_MODEL, snrs[0]).n,
            "fine_tuned_minus_base_db": [f - b for f, b in zip(delta[FINE_TUNED], delta[BASE_MODEL])],
            "fine_tuned_minus_control_db": [f - c for f, c in zip(delta[FINE_TUNED], delta[CONTROL])],
            "specialist_minus_base_db": [s - b for s, b in zip(delta[SPECIALIST], delta[BASE_MODEL])]
            if SPECIALIST in delta else None}


def base_training_hum(plan) -> dict | None:
    """The [data] hum of the recipe the base model was last trained with (its checkpoint's lineage), if any:
    the boxed model was continued with synthetic hum families in half its examples (recipes/general-hum.toml)."""
    from workbench.model.checkpoint import read_checkpoint_info
    from workbench.recipes import load_recipe

    recipe = (read_checkpoint_info(plan.base_path).get("lineage") or {}).get("recipe")
    return load_recipe(recipe)["data"].get("hum") if recipe else None


def train_control(plan, params: dict, general_devices: list[str], run_dir: Path):
    """The equal-compute rival: the base trained with the fine-tuned model's best trial settings, on the
    general model's train noise (`general_devices`) instead of the machine's, mixed as the base's own training
    mixed it (its recipe's synthetic hum families included: without them the control forgets the hum the base
    removes, and a gain over it would be partly that forgetting); its best validation step kept."""
    from workbench.train.loop import BEST_FILE, load_weights
    from workbench.train.pretrain import select_noise
    from workbench.train.tuning import train_with_params, validation_mixtures  # the study's own data and loop

    recipe = copy.deepcopy(plan.recipe)
    hum = base_training_hum(plan)
    if hum is not None:
        recipe["data"]["hum"] = hum
    general = dataclasses.replace(plan, recipe=recipe,
                                  noise={**plan.noise, "train": select_noise(plan.workspace, general_devices, [], "train")})
    _, model = train_with_params(general, params, run_dir, base_model=plan.base_model,
                                 validation=validation_mixtures(plan), progress=lambda *a, **k: None, stage="control")
    load_weights(model, run_dir / BEST_FILE)
    return model.eval()


def main() -> int:
    from workbench.model.allocator import tune_allocator

    tune_allocator()  # as the CLI does: see workbench.model.allocator
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "workbench-bench-finetune",
                        help="workspace for the benchmark (shared with benchmarks/finetune.py; reused)")
    parser.add_argument("--recipe", default="finetune-cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--no-specialist", action="store_true", help="skip the specialist (a whole pretraining)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    from workbench.demo import fine_tuned_device, general_model_devices
    from workbench.evaluate.baselines import SPECTRAL_GATING
    from workbench.model_registry.names import BASE_MODEL, FINE_TUNED

    workspace, manifest, _ = build_up_to_general_model(args.folder, args.recipe)
    target = fine_tuned_device(manifest)
    speed = next(t["speed_ips"] for t in manifest["blank_tapes"] if t["device"] == target)
    results = []
    for name in names:
        machine = variant_machine(workspace, target, name, speed)
        print(f"{name}: {machine} ...", file=sys.stderr, flush=True)
        results.append({"variant": name, **measure(workspace, machine, args.recipe, general_model_devices(manifest),
                                                         specialist=not args.no_specialist)})
    if args.json:
        print(json.dumps({"recipe": args.recipe, "results": results}, indent=2))
        return 0
    snrs = results[0]["snrs_db"]
    columns = [c for c in (BASE_MODEL, FINE_TUNED, CONTROL, BASE_WITH_HUM, SPECIALIST, SPECTRAL_GATING)
               if any(c in r["delta_snr_db"] for r in results)]
    both = " / ".join(f"{s:g}" for s in snrs)
    print(f"ΔSNR (dB) on each machine's test fragments at {both} dB input, recipe {args.recipe} "
          f"({results[0]['fragments']} fragments)")
    print(f"{'variant':18s}" + "".join(f"{c[:18]:>18s}" for c in columns))
    for result in results:
        print(f"{result['variant']:18s}" + "".join(
            (" / ".join(f"{v:+.2f}" for v in result["delta_snr_db"][c]) if c in result["delta_snr_db"] else "-").rjust(18)
            for c in columns))
    print(f"\npaired gain of the fine-tuned model (mean [95 % t-interval of per-fragment differences], dB) "
          f"at {both} dB input")
    for result in results:
        cells = []
        for rival, cell in result["paired_gain_db"].items():
            cells.append(f"− {rival}: " + " / ".join(f"{c['mean']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"
                                                    for c in cell))
        print(f"{result['variant']:18s}" + ";  ".join(cells))
    print(f"\nmains hum left behind: residual vs input at the fundamental and first three harmonics, dB "
          f"(all four together, at {both} dB input; per harmonic at {snrs[0]:g} dB)")
    for result in results:
        cells = []
        for method in [c for c in columns if c in result["hum_db"]]:
            total, harmonics = result["hum_db"][method], result["hum_harmonics_db"][method]
            if harmonics is None:
                cells.append(f"{method}: no hum found")
            else:
                cells.append(f"{method} " + " / ".join(f"{v:+.1f}" for v in total)
                             + " (" + ", ".join(f"{v:+.1f}" for v in harmonics) + ")")
        print(f"{result['variant']:18s}" + ";  ".join(cells))
    for result in results:
        fitted = result["fine_tuned"]
        print(f"{result['variant']}: fine-tuned v{fitted['version']} "
              f"{'promoted' if fitted['promoted'] else 'not promoted'}: {fitted['reason']}")
    print("time: " + "; ".join(f"{r['variant']} " + ", ".join(f"{k} {v:.0f} s" for k, v in r["timings_s"].items())
                               for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
