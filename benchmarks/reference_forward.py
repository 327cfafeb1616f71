"""Time the TensorFlow reference network's forward pass, for `model_speed.py --tf-python ... --tf-reference ...`.

Runs in a throwaway environment (tensorflow-cpu 2.15.1), never in the project's: it imports `unet.py` from a
checkout of the reference repository (eloimoliner/denoising-historical-recordings) given on the command line,
builds the network with the settings of that repository's conf/conf.yaml `unet` section (the paper's), checks
it has the published 71,408,196 parameters, and prints one JSON line: the best and median seconds of
`runs` forward passes of a (1, frames, 1025, 2) input after one warm-up pass, on `threads` threads. Nothing
of the reference is copied into this project; this file only drives it.

    TFENV/bin/python benchmarks/reference_forward.py THREADS FRAMES REFERENCE_CHECKOUT [RUNS]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from types import SimpleNamespace

PAPER_PARAMETERS = 71_408_196


def main() -> int:
    threads, frames, checkout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    sys.path.insert(0, checkout)
    import unet  # the reference's own module, from the checkout

    # conf/conf.yaml, `unet:` (the paper's settings)
    settings = SimpleNamespace(activation="elu", use_csff=False, use_SAM=True, use_cam=False, use_fam=False,
                               use_fencoding=True, use_tdf=False, use_alttdfs=False, num_tfc=3, num_stages=3,
                               depth=6, f_dim=1025)
    model = unet.build_model_denoise(unet_args=settings)
    parameters = int(model.count_params())
    assert parameters == PAPER_PARAMETERS, f"reference built with {parameters:,} parameters, not the paper's"
    spectrum = tf.random.normal((1, frames, 1025, 2), seed=1)
    started = time.perf_counter()
    model(spectrum)
    warmup = time.perf_counter() - started
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        outputs = model(spectrum)
        _ = outputs[0].numpy()  # wait for the result
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"tensorflow": tf.__version__, "parameters": parameters, "threads": threads,
                      "frames": frames, "warmup_s": warmup, "best_s": min(seconds),
                      "median_s": statistics.median(seconds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
