"""Start-up costs a user waits for before any work: loading the embedded model from its cache, and
validating a whole grid (every cell's config, method options and data) before anything trains.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 3]

Prints the median of each over the repeats. These were once assertions inside tests (<= 3 s, < 1 s);
a timing depends on the machine's load, so it lives here and the tests check the behaviour instead
(the model comes from the cache; validation loads no model).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _median_seconds(fn, repeats: int) -> float:
    from roofline import seconds  # the benchmarks' one median timer

    return seconds(fn, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tunelab.compare import plan
    from tunelab.compare.grid import preset_path
    from tunelab.models import load_model

    load_model("smollm2-135m")  # converts once if the cache is empty; not timed
    load = _median_seconds(lambda: load_model("smollm2-135m"), args.repeats)
    print(f"load smollm2-135m from the cache: {load:.2f} s (median of {args.repeats})")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("quick", "paper"):
            path = preset_path(preset)
            plan(path, [], Path(tmp) / preset)  # warm the imports
            seconds = _median_seconds(lambda p=path, name=preset: plan(p, [], Path(tmp) / name), args.repeats)
            print(f"validate the {preset} grid ({len(plan(path, [], Path(tmp) / preset)[1])} cells): {seconds:.2f} s")


if __name__ == "__main__":
    main()
