"""Benchmark: how many test fragments does the finetune evaluation need to tell a gain, and what do they cost?

The gate promotes a device model only when the 95 % t-interval of its paired ΔSNR gain over the base model
lies above `min_gain_db` at every input SNR; the interval's half-width is t(n−1) · s / √n, with s the
spread of the per-fragment differences. This script scores a machine's base model and its fine-tuned
model (the champion, else the latest version) on the finetune protocol's fixed test fragments for one or
more fragment lengths, and prints per input SNR: the paired gain and its half-width, the spread s, and
the fragment count that brings the half-width to the target (default 0.3 dB, the issue's for the demo);
then the evaluation's wall time per fragment (building the fragments the first time, noisy input, both
models and spectral gating, as `finetune` runs it) and that time as a multiple of the audio scored (the
baseline measured in the same run), so a fragment count can be weighed against the demo's minutes.

    .venv/bin/python benchmarks/evaluation_power.py --folder /tmp/workbench-bench-finetune \
        [--device ID] [--recipe quickstart] [--fragments 40] [--seconds 2,4] [--target 0.3] [--json]

It needs a workspace where `benchmarks/finetune.py` (or the demo) has fine-tuned the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fragments_for(spread: float, target: float, confidence: float = 0.95) -> int:
    """The smallest n with t(n−1) · spread / √n ≤ target."""
    from scipy import stats

    n = 2
    while stats.t.ppf(0.5 + confidence / 2, n - 1) * spread / math.sqrt(n) > target:
        n += 1
        assert n < 100_000, "the spread is far too large for the target"
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="the workspace (e.g. benchmarks/finetune.py's)")
    parser.add_argument("--device", default=None, help="machine (default: the one benchmarks/finetune.py fits)")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--fragments", type=int, default=40)
    parser.add_argument("--seconds", default="2,4", help="fragment lengths to try, comma-separated")
    parser.add_argument("--target", type=float, default=0.3, help="half-width to reach, dB")
    parser.add_argument("--trial-weights", type=Path, default=None,
                        help="score a study trial's kept weights (its best.safetensors) instead of a registered version")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from scipy import stats

    from workbench import model_registry
    from workbench.evaluate.device_eval import evaluate_models
    from workbench.finetune import make_plan
    from workbench.model_registry.names import BASE_MODEL, FINE_TUNED
    from workbench.model.checkpoint import load_checkpoint
    from workbench.workspace import Workspace

    workspace = Workspace(args.folder)
    device = args.device
    if device is None:
        from workbench.demo import fine_tuned_device
        from workbench.synth.archive import MANIFEST

        device = fine_tuned_device(json.loads((workspace.root / "archive" / MANIFEST).read_text()))
    name = model_registry.device_model_name(device)
    plan = make_plan(workspace, device, recipe=args.recipe)
    if args.trial_weights is not None:
        import copy

        from workbench.train.loop import load_weights

        version = str(args.trial_weights)
        fine_tuned = copy.deepcopy(plan.base_model)
        load_weights(fine_tuned, args.trial_weights)
    else:
        version = (model_registry.get_alias_version(name, model_registry.CHAMPION, workspace)
                   or model_registry.latest_version(name, workspace))
        assert version is not None, f"{name} has no version: fine-tune {device} first"
        uri = model_registry.model_uri(name, version)
        fine_tuned, _ = load_checkpoint(model_registry.fetch_checkpoint(uri, workspace)[0])
    rows = []
    for seconds in (float(s) for s in args.seconds.split(",")):
        plan.evaluation = dataclasses.replace(plan.evaluation, fragments=args.fragments, seconds=seconds)
        started = time.perf_counter()
        result = evaluate_models(plan, {BASE_MODEL: plan.base_model, FINE_TUNED: fine_tuned})
        wall = time.perf_counter() - started
        audio_seconds = args.fragments * seconds * len(plan.speeds) * len(result.snrs_db) * (len(result.methods) - 1)
        for snr in result.snrs_db:
            gain = result.paired(FINE_TUNED, BASE_MODEL, snr)
            spread = gain.half_width * math.sqrt(gain.n) / stats.t.ppf(0.975, gain.n - 1)
            needed = fragments_for(spread, args.target)
            rows.append({"seconds": seconds, "input_snr_db": snr, "fragments": gain.n, "gain_db": gain.mean,
                         "half_width_db": gain.half_width, "spread_db": spread, "fragments_for_target": needed,
                         "own_delta_snr": result.summary(FINE_TUNED, snr).to_dict(),
                         "wall_s": wall, "wall_s_per_fragment": wall / gain.n,
                         "wall_s_at_target": wall / gain.n * needed,
                         "x_real_time": audio_seconds / wall})
    if args.json:
        print(json.dumps({"device": device, "version": version, "target_db": args.target, "rows": rows}, indent=2))
        return 0
    print(f"{name} v{version} − base model, paired ΔSNR gain on {device}'s test fragments (target half-width "
          f"{args.target:g} dB)")
    print(f"{'seconds':>8s}{'input':>7s}{'n':>5s}{'gain':>8s}{'± half':>8s}{'spread':>8s}{'n for target':>14s}"
          f"{'eval s/fragment':>17s}{'eval s at target':>18s}{'x real time':>13s}")
    for r in rows:
        print(f"{r['seconds']:8g}{r['input_snr_db']:7g}{r['fragments']:5d}{r['gain_db']:+8.2f}{r['half_width_db']:8.2f}"
              f"{r['spread_db']:8.2f}{r['fragments_for_target']:14d}{r['wall_s_per_fragment']:17.2f}"
              f"{r['wall_s_at_target']:18.0f}{r['x_real_time']:13.1f}")
    print("eval: building the fragments (first time), noisy input, base model, fine-tuned, spectral gating, both "
          "input SNRs; x real time = audio scored (fragments x seconds x SNRs x methods) / wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
