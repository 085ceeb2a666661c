"""Wake latency: seconds per fact, and where they go, over several runs of several settings.

Each run writes N facts one at a time into a fresh state folder (constrained, as the app
does), after one write that loads Ĉ⁻¹, then puts the weights back. Settings (JSON objects of
EditConfig overrides, as in ``sweep.py``) take turns run by run, so that a noisy machine
weighs on each alike; each run uses the next N facts of the pool. Per setting it prints the
median seconds per fact of each run, their median, and the share of v* (eq. 1), the probes
(keys and hidden states, layer by layer) and the rest (solves, files), and the ratio of each
setting's median to the first's.

    python bench/latency.py                       # the preset, 3 runs of 20 facts
    python bench/latency.py --runs 4 --n 12 '{}' '{"hold_name": false}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import edited_layers, load_facts, seen_only  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui.engine import Engine, load_backend  # noqa: E402
from sleeptui.models import resolve  # noqa: E402
from sleeptui.state import StateFolder  # noqa: E402


class Timed:
    """Adds up the seconds spent in some of a backend's methods (wrapped on the instance)."""

    def __init__(self, backend, names: tuple[str, ...]) -> None:
        self.seconds = dict.fromkeys(names, 0.0)
        for name in names:
            setattr(backend, name, self._wrap(name, getattr(backend, name)))

    def _wrap(self, name, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="*", help="JSON objects of EditConfig overrides")
    p.add_argument("--n", type=int, default=20, help="facts per run")
    p.add_argument("--runs", type=int, default=3, help="runs per setting")
    p.add_argument("--facts", type=Path)
    p.add_argument("--model")
    args = p.parse_args()
    settings = [json.loads(s) for s in args.settings] or [{}]
    pool = load_facts(args.facts)
    if args.n * args.runs + 1 > len(pool):
        p.error(f"{args.runs} runs of {args.n} facts need {args.n * args.runs + 1} facts")
    source = resolve(args.model)
    backend = load_backend(source)
    timed = Timed(backend, ("optimise_shift", "probe"))
    console = Console()
    per_run: list[list[float]] = [[] for _ in settings]
    shares: list[list[dict[str, float]]] = [[] for _ in settings]
    for run in range(args.runs):
        facts = pool[run * args.n : (run + 1) * args.n]
        order = range(len(settings)) if run % 2 == 0 else reversed(range(len(settings)))
        for i in order:
            with tempfile.TemporaryDirectory() as state:
                engine = Engine(backend, source, StateFolder.open(state))
                layers = edited_layers(engine.cfg.layers, settings)
                base = {layer: backend.weight(layer) for layer in layers}
                engine.cfg = replace(engine.cfg, **settings[i])
                engine.remember([seen_only(pool[-1])])  # loads Ĉ⁻¹; not timed
                seconds = []
                timed.reset()
                for fact in facts:
                    start = time.perf_counter()
                    engine.remember([seen_only(fact)])
                    seconds.append(time.perf_counter() - start)
                total = sum(seconds)
                v, probe = timed.seconds["optimise_shift"], timed.seconds["probe"]
                shares[i].append({"v*": v / total, "probes": probe / total})
                per_run[i].append(statistics.median(seconds))
                for layer, w in base.items():
                    backend.set_weight(layer, w)
                engine.close()
            console.print(f"run {run + 1}, setting {i + 1}: {per_run[i][-1]:.2f} s per fact")
    table = Table(title=f"wake latency: {args.runs} runs of {args.n} facts, one at a time")
    for col in ("setting", "medians per run (s)", "median", "v*", "probes", "rest", "ratio"):
        table.add_column(col)
    first = statistics.median(per_run[0])
    for i, changes in enumerate(settings):
        median = statistics.median(per_run[i])
        v = statistics.median(s["v*"] for s in shares[i])
        probe = statistics.median(s["probes"] for s in shares[i])
        table.add_row(
            json.dumps(changes),
            " ".join(f"{x:.2f}" for x in per_run[i]),
            f"{median:.2f}",
            f"{v:.0%}",
            f"{probe:.0%}",
            f"{1 - v - probe:.0%}",
            f"{median / first:.3f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
