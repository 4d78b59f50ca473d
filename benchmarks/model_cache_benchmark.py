"""Time `load_model` with an empty model cache (the conversion) and with a warm one.

    python benchmarks/model_cache_benchmark.py                 # SmolLM2, 3 warm starts
    python benchmarks/model_cache_benchmark.py --warm-runs 5

Each load runs in a fresh process with its own empty cache folder (removed at the end), so the
imports are not counted and the figures are what a learner's next start costs.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

TIMED_LOAD = """
import sys, time
from tutorial_api import load_model
started = time.perf_counter()
load_model(sys.argv[1])
print(time.perf_counter() - started)
"""


def timed_load(model: str, cache: str) -> float:
    environment = {**os.environ, "TUTORIAL_API_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TIMED_LOAD, model],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--warm-runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="model-cache-") as cache:
        cold = timed_load(args.model, cache)
        warm = [timed_load(args.model, cache) for _ in range(args.warm_runs)]
    each_warm = ", ".join(f"{seconds:.2f}" for seconds in warm)
    print(
        f"{args.model}: cold start (conversion) {cold:.2f} s; "
        f"warm start median {statistics.median(warm):.2f} s ({each_warm})"
    )


if __name__ == "__main__":
    main()
