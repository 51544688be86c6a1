"""The CPU benchmarks at a quick size (a few minutes in all): search overhead, scale-out, efficiency.

Each needs PostgreSQL (``$CVAE_SEARCH_BENCH_PG``, default ``postgresql://postgres@127.0.0.1:5432/postgres``)
except the efficiency benchmark, and waits for a quiet machine before it measures. The full
sizes, as reported in benchmarks/RESULTS.md, are each module's defaults:

    python -m benchmarks.search_overhead
    python -m benchmarks.scale_out
    python -m benchmarks.search_efficiency
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from benchmarks.scale_out import run_scale_out
from benchmarks.search_efficiency import run_efficiency
from benchmarks.search_overhead import run_overhead

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine")
    args = p.parse_args(argv)
    runs = (
        ("search overhead", lambda: run_overhead(trials=30, repeats=1, max_wait_s=args.max_wait)),
        (
            "scale-out",
            lambda: run_scale_out(processes=[1, 4], window=6.0, settle=2.0, max_wait_s=args.max_wait),
        ),
        ("search efficiency", lambda: run_efficiency(budget=30, seeds=2)),
    )
    for name, run in runs:
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        _, text = run()
        print(text)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
