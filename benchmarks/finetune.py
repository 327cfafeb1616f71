"""Benchmark `workbench finetune`: does fitting the general model to one machine pay off?

On the embedded synthetic archive (the demo's: blank tape for several machines, synthetic music) with a
fine-tuning recipe (default finetune-cpu), this builds what is missing (archive, noise library, corpus,
the boxed general model as @base: the demo's own stages, so a second run reuses them), then runs a
FRESH Optuna study for the target machine (its own journal file, so nothing from an earlier run is
reused) and prints, side by side on that machine's test noise (the research protocol: fixed fragments at 10 and 16 dB input SNR):

    method            ΔSNR @10 dB          ΔSNR @16 dB
    base model        ...
    fine-tuned        ...
    spectral gating   ...

the same for ΔPEAQ (PEAQ ODG gain over the noisy input, issue 16) when the recipe computes PEAQ, and what
PEAQ costs in that evaluation (one PEAQ pass over the stored fragments, timed here, times the number of
passes the evaluation makes), plus the margins the issue sets as targets: fine-tuned − base at 10 dB (target ≥ 1 dB) and fine-tuned −
spectral gating (target > 0), and the time each stage took. Timings are wall-clock on whatever else
the machine is doing.

    .venv/bin/python benchmarks/finetune.py [--folder /tmp/workbench-bench-finetune] [--recipe finetune-cpu] [--trials N]
                                            [--device ID] [--fresh] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_up_to_general_model(folder: Path, recipe: str, fresh: bool = False):
    """The demo's stages up to the general model (archive, noise library, corpus, the boxed general model),
    reusing what is there: returns (workspace, the archive's manifest, seconds per stage)."""
    from workbench.demo import DemoSettings, demo_stages, prepare_workspace

    settings = DemoSettings(folder=folder, recipe=recipe, fresh=fresh)
    workspace = prepare_workspace(settings)
    timings: dict[str, float] = {}
    manifest = None
    for stage in demo_stages(workspace, settings):
        if stage.name == "finetune":
            break
        started = time.perf_counter()
        result = stage.run(lambda *a, **k: None)
        timings[stage.name] = time.perf_counter() - started
        print(f"{stage.name:14s} {timings[stage.name]:7.1f} s  {result.summary}", file=sys.stderr)
        if stage.name == "archive":
            manifest = result.data.get("manifest", result.data)
    assert manifest is not None, "the demo's first stage renders the archive"
    return workspace, manifest, timings


def pooled_table(report_json: Path, metric: str) -> dict[str, list[tuple[float, float, float]]]:
    """method -> [(mean, ci_low, ci_high) per input SNR] of one metric, pooled over speeds, from report.json."""
    evaluation = json.loads(Path(report_json).read_text())["evaluation"]
    single = len(evaluation["fragment_sets"]) == 1
    table: dict[str, list[tuple[float, float, float]]] = {}
    for row in evaluation["summary"]:
        if (row["set"] == "all" or single) and metric in row:
            cell = row[metric]
            table.setdefault(row["method"], []).append((cell["mean"], cell["ci_low"], cell["ci_high"]))
    return table


def peaq_cost(report_json: Path) -> dict:
    """Seconds one PEAQ pass over the evaluation's stored fragments takes (clean vs noisy, every set and SNR),
    and the number of such passes the evaluation made (one per method; the noisy input's is reused)."""
    from workbench.evaluate.fragments import load_fragments
    from workbench.evaluate.peaq import peaq_odg_rows

    evaluation = json.loads(Path(report_json).read_text())["evaluation"]
    snrs = evaluation["input_snrs_db"]
    started = time.perf_counter()
    fragments = 0
    for described in evaluation["fragment_sets"]:
        fragment_set = load_fragments(Path(described["path"]), snrs)
        for snr in snrs:
            peaq_odg_rows(fragment_set.clean, fragment_set.noisy(snr), fragment_set.sample_rate)
            fragments += fragment_set.count
    one_pass = time.perf_counter() - started
    return {"one_pass_s": one_pass, "fragments_per_pass": fragments, "passes": len(evaluation["methods"]),
            "estimated_s": one_pass * len(evaluation["methods"])}


def main() -> int:
    from workbench.model.allocator import tune_allocator

    tune_allocator()  # as the CLI does: see workbench.model.allocator
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "workbench-bench-finetune",
                        help="workspace for the benchmark (created; reused by later runs)")
    parser.add_argument("--recipe", default="finetune-cpu")
    parser.add_argument("--trials", type=int, default=None, help="trials of the study (default: the recipe's)")
    parser.add_argument("--device", default=None, help="machine to fit (default: the demo's target machine)")
    parser.add_argument("--fresh", action="store_true", help="delete the benchmark workspace first")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()

    from workbench.demo import fine_tuned_device
    from workbench.evaluate.baselines import SPECTRAL_GATING
    from workbench.model_registry.names import BASE_MODEL, FINE_TUNED
    from workbench.finetune import finetune_device

    workspace, manifest, timings = build_up_to_general_model(args.folder, args.recipe, args.fresh)
    device = args.device or fine_tuned_device(manifest)

    journal = workspace.registry / f"bench-study-{time.strftime('%Y%m%d-%H%M%S')}.journal"
    started = time.perf_counter()
    result = finetune_device(workspace, device, recipe=args.recipe, trials=args.trials, storage=f"journal:{journal}")
    timings["finetune"] = time.perf_counter() - started

    table = result.table()
    snrs = result.snrs_db
    low = min(snrs)
    base_gain = table[FINE_TUNED][snrs.index(low)][0] - table[BASE_MODEL][snrs.index(low)][0]
    gating_gain = table[FINE_TUNED][snrs.index(low)][0] - table[SPECTRAL_GATING][snrs.index(low)][0]
    peaq_table = pooled_table(result.report_json, "delta_peaq")
    cost = peaq_cost(result.report_json) if peaq_table else None
    if args.json:
        print(json.dumps({"device": device, "recipe": args.recipe, "delta_snr_db": table, "snrs_db": snrs,
                          "delta_peaq": peaq_table, "peaq_cost": cost,
                          "fine_tuned_minus_base_db": base_gain, "fine_tuned_minus_gating_db": gating_gain,
                          "trials": result.trials, "version": result.version, "promoted": result.promoted,
                          "timings_s": timings, "report": str(result.report_html)}, indent=2))
        return 0
    print(f"\n{device}: {result.trials_summary}")
    print(f"{'method':18s}" + "".join(f"{'ΔSNR @' + format(s, 'g') + ' dB (95% CI)':>30s}" for s in snrs))
    for method in (BASE_MODEL, FINE_TUNED, SPECTRAL_GATING):
        cells = "".join(f"{m:+8.2f} [{lo:+6.2f}, {hi:+6.2f}]".rjust(30) for m, lo, hi in table[method])
        print(f"{method:18s}{cells}")
    if peaq_table:
        print(f"\n{'method':18s}" + "".join(f"{'ΔPEAQ @' + format(s, 'g') + ' dB (95% CI)':>30s}" for s in snrs))
        for method in (BASE_MODEL, FINE_TUNED, SPECTRAL_GATING):
            cells = "".join(f"{m:+8.2f} [{lo:+6.2f}, {hi:+6.2f}]".rjust(30) for m, lo, hi in peaq_table[method])
            print(f"{method:18s}{cells}")
        print(f"PEAQ's cost in this evaluation: {cost['passes']} passes x {cost['one_pass_s']:.1f} s "
              f"({cost['fragments_per_pass']} fragments each, timed here) = {cost['estimated_s']:.0f} s of the "
              f"finetune stage's {timings['finetune']:.0f} s ({100 * cost['estimated_s'] / timings['finetune']:.1f} %)")
    else:
        print("(PEAQ off in this recipe's [evaluation])")
    print(f"\nfine-tuned − base at {low:g} dB:            {base_gain:+.2f} dB  (target ≥ +1 dB: "
          f"{'met' if base_gain >= 1.0 else 'MISSED'})")
    print(f"fine-tuned − spectral gating at {low:g} dB: {gating_gain:+.2f} dB  (target > 0: "
          f"{'met' if gating_gain > 0 else 'MISSED'})")
    print(f"registered {result.model_name} v{result.version} ({'promoted' if result.promoted else 'not promoted'}); "
          f"report {result.report_html}")
    print("time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
