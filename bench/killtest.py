"""Kill test: SIGKILL ``sleeptui remember | sleep | forget`` at random instants; nothing committed is lost.

A baseline folder with a few memories is made once. Each operation is first run to the end on
a copy of it, in a real ``python -m sleeptui`` subprocess on the real embedded model: that
measures its typical duration and gives the reference state it commits. Then, for each kill,
a fresh copy of the baseline is handed to the same command, which is killed with SIGKILL
after a random delay within that duration (seedable). After each kill:

- the folder must open (``StateFolder.open`` for writing, which recovers a journal, then
  ``ledger()``): else it counts as a folder that failed to open;
- every memory of the baseline must still be listed with a readable delta (the forgotten one
  excepted, for ``forget``): else it counts as lost;
- the greedy completions of every baseline prompt, by the model in this process with the
  folder's deltas applied, must equal those of the baseline when the folder holds the
  baseline's weights, or those of the reference run when it holds the reference's weights:
  else recall changed. A folder holding neither (an operation that is not deterministic)
  counts as unverified.

    nice -n 10 python bench/killtest.py [--kills 50] [--seed 0] [--model NAME]

Prints a table per operation and the summary line; writes bench/out/killtest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"

BASELINE = (  # names that appear nowhere else
    ("Henrika Voss", "lives in", "Lillehammer", "Where does Henrika Voss live?"),
    ("Dario Pellegrini", "plays the", "accordion", "Which instrument does Dario Pellegrini play?"),
    ("Sunniva Brekke", "works as a", "locksmith", "What does Sunniva Brekke do for a living?"),
)
NEW_FACT = "Matthias Oberholzer lives in Winterthur."
CONTROL = "The capital of France is"
OPERATIONS = ("remember", "sleep", "forget")


@dataclass(frozen=True)
class State:
    """What a folder holds, as far as this test cares.

    Attributes:
        ids: The memory ids of its ledger.
        weights: SHA-256 over each active memory's scale and factors (ids and metadata left
            out), sorted: two folders with the same value give the model the same weights.
        completions: Greedy completions of the baseline prompts and the control prompt.
    """

    ids: tuple[str, ...]
    weights: str
    completions: tuple[str, ...]


@dataclass
class Tally:
    kills: int = 0
    failed_open: int = 0
    lost: int = 0
    recall_changed: int = 0
    unverified: int = 0
    landed: Counter = field(default_factory=Counter)  # weights as before / as after / exited first
    notes: list[str] = field(default_factory=list)


class Checker:
    """The embedded model, loaded once (or handed in), to read folders and complete prompts."""

    def __init__(self, source, backend) -> None:
        from sleeptui.engine import fingerprint
        from sleeptui.state import Shapes

        self.source = source
        self.backend = backend
        info = backend.info
        self.pristine = {layer: backend.weight(layer).copy() for layer in range(info.n_layers)}
        self.fingerprint = fingerprint(backend)
        self.shapes = Shapes(info.d_model, info.d_ff, info.n_layers)

    @classmethod
    def load(cls, model: str | None) -> Checker:
        import torch

        from sleeptui.engine import load_backend
        from sleeptui.models import resolve

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        source = resolve(model)
        return cls(source, load_backend(source))

    def engine(self, root: Path, read_only: bool = True):
        from sleeptui.engine import Engine
        from sleeptui.state import StateFolder

        self.reset()
        return Engine(self.backend, self.source, StateFolder.open(root, read_only=read_only))

    def reset(self) -> None:
        for layer, w in self.pristine.items():
            self.backend.set_weight(layer, w)

    def memories(self, root: Path) -> list:
        """The memories of ``root``'s ledger, read without taking its lock."""
        from sleeptui.state import StateFolder

        with StateFolder.open(root, read_only=True) as folder:
            return list(folder.ledger(self.fingerprint, self.source.preset.name).memories)

    def state(self, root: Path, prompts: list[str]) -> State:
        """Read every active delta of ``root`` and complete ``prompts`` with them applied."""
        from sleeptui.state import StateFolder

        with StateFolder.open(root) as folder:
            ledger = folder.ledger(self.fingerprint, self.source.preset.name)
            parts = []
            for m in ledger.memories:
                if m.scale > 0:
                    h = hashlib.sha256(repr(m.scale).encode())
                    for layer, (u, v) in sorted(folder.read_delta(m, self.shapes).items()):
                        h.update(str(layer).encode() + u.tobytes() + v.tobytes())
                    parts.append(h.hexdigest())
        weights = hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()
        engine = self.engine(root)
        try:
            completions = tuple(engine.complete(p, 12) for p in prompts)
        finally:
            engine.close()
            self.reset()
        return State(tuple(m.id for m in ledger.memories), weights, completions)


def sleeptui(root: Path, op: str, target: str, model: str | None) -> list[str]:
    args = [sys.executable, "-m", "sleeptui", "--state-dir", str(root)]
    if model:
        args += ["--model", model]
    return (
        args
        + {
            "remember": ["remember", NEW_FACT],
            "sleep": ["sleep"],
            "forget": ["forget", target, "--yes"],
        }[op]
    )


def make_baseline(checker: Checker, root: Path) -> list:
    from sleeptui.facts import Fact

    engine = checker.engine(root, read_only=False)
    try:
        memories = engine.remember([Fact(s, r, o, questions=(q,)) for s, r, o, q in BASELINE])
    finally:
        engine.close()
        checker.reset()
    return memories


def run(
    kills: int,
    seed: int,
    model: str | None = None,
    log=print,
    checker: Checker | None = None,
    start: Path | None = None,
) -> dict:
    """The kill test; returns the summary (also what bench/out/killtest.json holds).

    ``checker`` is the model this process reads folders with, loaded here when not given
    (it must be ``model``'s, with its base weights). ``start``: a state folder of that model
    to copy as the baseline (its first memory is the one forgotten), instead of writing
    ``BASELINE``'s facts.
    """
    rng = random.Random(seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    checker = checker or Checker.load(model)
    with tempfile.TemporaryDirectory(prefix="killtest-") as tmp:
        base = Path(tmp) / "baseline"
        if start is None:
            memories = make_baseline(checker, base)
        else:
            shutil.copytree(start, base, ignore=shutil.ignore_patterns(".lock", ".holder"))
            memories = checker.memories(base)
        target = memories[0].id
        prompts = [m.prompt for m in memories] + [CONTROL]
        baseline = checker.state(base, prompts)
        log(f"baseline: {len(memories)} memories; forget target {target}")
        references, durations = {}, {}
        for op in OPERATIONS:
            folder = Path(tmp) / f"reference-{op}"
            shutil.copytree(base, folder)
            started = time.perf_counter()
            done = subprocess.run(
                sleeptui(folder, op, target, model), env=env, capture_output=True, text=True
            )
            durations[op] = time.perf_counter() - started
            if done.returncode not in (0, 1):  # forget exits 1 when the model still says it
                raise SystemExit(
                    f"{op} failed uninterrupted ({done.returncode}):\n{done.stderr[-2000:]}"
                )
            references[op] = checker.state(folder, prompts)
            log(f"{op}: {durations[op]:.1f} s uninterrupted")
        tallies = {op: Tally() for op in OPERATIONS}
        for n in range(kills):
            op = OPERATIONS[n % len(OPERATIONS)]
            delay = rng.uniform(0, durations[op])
            folder = Path(tmp) / f"kill-{n}"
            shutil.copytree(base, folder)
            proc = subprocess.Popen(
                sleeptui(folder, op, target, model),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)
            exited_first = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            outcome = check(
                checker, folder, prompts, baseline, references[op], op, target, tallies[op]
            )
            if exited_first:
                tallies[op].landed["exited before the kill"] += 1
            log(f"kill {n + 1}/{kills}: {op} after {delay:.2f} s: {outcome}")
            shutil.rmtree(folder)
    total = Tally(kills=sum(t.kills for t in tallies.values()))
    for t in tallies.values():
        total.failed_open += t.failed_open
        total.lost += t.lost
        total.recall_changed += t.recall_changed
        total.unverified += t.unverified
    return {
        "seed": seed,
        "durations_s": durations,
        "summary": {k: v for k, v in asdict(total).items() if k not in ("landed", "notes")},
        "operations": {op: {**asdict(t), "landed": dict(t.landed)} for op, t in tallies.items()},
    }


def check(
    checker: Checker,
    folder: Path,
    prompts: list[str],
    baseline: State,
    reference: State,
    op: str,
    target: str,
    tally: Tally,
) -> str:
    from sleeptui.errors import SleeptuiError
    from sleeptui.state import StateFolder

    tally.kills += 1
    try:
        with StateFolder.open(folder) as opened:  # for writing: a journal is recovered here
            opened.ledger(checker.fingerprint, checker.source.preset.name)
            for warning in opened.warnings:
                if "interrupted after it was committed" in warning:
                    tally.landed["journal finished"] += 1
                elif "interrupted before it was committed" in warning:
                    tally.landed["journal discarded"] += 1
    except SleeptuiError as e:
        tally.failed_open += 1
        tally.notes.append(str(e))
        return f"FAILED TO OPEN: {e}"
    try:
        state = checker.state(folder, prompts)
    except SleeptuiError as e:  # the ledger reads, a delta does not
        tally.lost += 1
        tally.notes.append(str(e))
        return f"LOST: {e}"
    expected = [i for i in baseline.ids if not (op == "forget" and i == target)]
    missing = [i for i in expected if i not in state.ids]
    if missing:
        tally.lost += len(missing)
        tally.notes.append(f"lost {missing}")
        return f"LOST {missing}"
    if state.weights == baseline.weights:
        tally.landed["weights as before"] += 1
        wanted = baseline.completions
    elif state.weights == reference.weights:
        tally.landed["weights as after"] += 1
        wanted = reference.completions
    else:
        tally.unverified += 1
        tally.landed["neither (unverified)"] += 1
        return "weights match neither the baseline nor the reference run"
    if state.completions != wanted:
        tally.recall_changed += 1
        tally.notes.append(f"completions {state.completions} != {wanted}")
        return "RECALL CHANGED"
    return "ok"


def summary_line(result: dict) -> str:
    s = result["summary"]
    return (
        f"kills: {s['kills']}, folders that failed to open: {s['failed_open']}, committed memories "
        f"lost: {s['lost']}, recall changed: {s['recall_changed']}"
    )


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kill test (seed {result['seed']})")
    for col in (
        "operation",
        "typical s",
        "kills",
        "weights as before",
        "as after",
        "exited first",
        "journal finished",
        "journal discarded",
        "unverified",
        "failed to open",
        "lost",
        "recall changed",
    ):
        table.add_column(col, justify="right")
    for op, t in result["operations"].items():
        landed = t["landed"]
        table.add_row(
            op,
            f"{result['durations_s'][op]:.1f}",
            str(t["kills"]),
            str(landed.get("weights as before", 0)),
            str(landed.get("weights as after", 0)),
            str(landed.get("exited before the kill", 0)),
            str(landed.get("journal finished", 0)),
            str(landed.get("journal discarded", 0)),
            str(t["unverified"]),
            str(t["failed_open"]),
            str(t["lost"]),
            str(t["recall_changed"]),
        )
    Console().print(table)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--kills", type=int, default=50, help="how many kills, spread over the operations"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="preset or path (default: the embedded model)")
    p.add_argument("--json", type=Path, default=OUT / "killtest.json")
    args = p.parse_args()
    result = run(args.kills, args.seed, args.model)
    print_table(result)
    print(summary_line(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    return 1 if s["failed_open"] or s["lost"] or s["recall_changed"] else 0


if __name__ == "__main__":
    sys.exit(main())
