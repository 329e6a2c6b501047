"""The benchmark regression gate: HEAD against a base tree, side by side in one run.

    python scripts/bench_gate.py [--base-ref REF | --base-tree DIR] [--head-tree DIR]
                                 [--rounds N] [--threshold 0.10]

Runs ``bench_stages.py`` for the base and the head trees alternately (base,
head, head, base, ...) so that both see the same machine load, then compares
the fastest round of every case (noise only adds time). Fails (exit 1) when any case of the
head is more than ``threshold`` slower than the base. A case that the base
does not have (or cannot build: a module it has not got yet) is reported and
skipped. The gate fails, too, when its own machinery cannot export the base or
run the benchmark on either tree: a gate that cannot measure says so.

A comparison in which the cases moved together (their median change beyond half
the threshold) was disturbed: the shared machine slowed one side for a stretch,
and the change says nothing about the code. It is run again, up to ``retries``
times, before it counts (a change of the code moves some cases, not all of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench_stages.py"
PACKAGES = ("orchestrator_site", "pipeline", "workers", "batches")


def export_ref(ref: str, into: Path) -> Path:
    """The packages of ``ref`` as files under ``into`` (git archive, no checkout)."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, *PACKAGES], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def default_base() -> str:
    upstream = subprocess.run(["git", "merge-base", "HEAD", "origin/main"], cwd=ROOT, capture_output=True, text=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if upstream.returncode == 0 and upstream.stdout.strip() != head:
        return upstream.stdout.strip()
    return "HEAD~1"


def sample(tree: Path, rounds: int) -> dict[str, list[float]]:
    # Never benchmark under coverage: it would trace one tree (inside its source) and not the other.
    env = {k: v for k, v in os.environ.items() if k not in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")}
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts on both sides
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tree", str(tree), "--rounds", str(rounds), "--json"], capture_output=True, text=True, timeout=600, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark failed for {tree}: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for missing in out.get("unavailable", []):
        sys.stderr.write(f"bench gate: {tree}: case not available: {missing}\n")
    cases: dict[str, list[float]] = out["cases"]
    return cases


@dataclasses.dataclass(frozen=True)
class Comparison:
    regressed: set[str]
    lines: list[str]
    drift: float  # the median case's change: how far the machine moved one side


def compare(base: Path, head: Path, *, pairs: int, rounds: int, threshold: float) -> Comparison:
    samples: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
    for i in range(pairs):
        order = [("base", base), ("head", head)] if i % 2 == 0 else [("head", head), ("base", base)]
        for label, tree in order:
            for case, values in sample(tree, rounds).items():
                samples[label].setdefault(case, []).extend(values)
    return table(samples["base"], samples["head"], threshold=threshold)


def table(base: dict[str, list[float]], head: dict[str, list[float]], *, threshold: float) -> Comparison:
    """Each case's change, from the fastest round of either side: noise on a shared
    machine only ever adds time, so the minimum is the steadiest estimate of the
    code's own cost."""
    regressed_cases: set[str] = set()
    changes: list[float] = []
    lines = [f"{'case':<36}{'base us':>10}{'head us':>10}{'change':>9}"]
    for case, head_values in head.items():
        base_values = base.get(case)
        if not base_values:
            lines.append(f"{case:<36}{'-':>10}{min(head_values):>10.2f}   (new)")
            continue
        b, h = min(base_values), min(head_values)
        change = h / b - 1.0
        changes.append(change)
        regressed = change > threshold
        if regressed:
            regressed_cases.add(case)
        lines.append(f"{case:<36}{b:>10.2f}{h:>10.2f}{change:>+8.1%}{'  REGRESSION' if regressed else ''}")
    return Comparison(regressed_cases, lines, statistics.median(changes) if changes else 0.0)


Compare = Callable[[], Comparison]


def steady(compare_once: Compare, *, threshold: float, retries: int, lines: list[str]) -> Comparison:
    """A comparison the machine did not disturb (its cases did not all move together),
    or the last of ``retries`` further tries. Each disturbed try's table goes into ``lines``."""
    result = compare_once()
    for _ in range(retries):
        if abs(result.drift) <= threshold / 2:
            break
        lines += [f"  disturbed | {line}" for line in result.lines]
        lines.append(f"  disturbed: the median case moved {result.drift:+.1%}; compared again")
        result = compare_once()
    return result


def gate(compare_once: Compare, *, threshold: float, confirmations: int = 2, retries: int = 2) -> tuple[bool, list[str]]:
    """A case fails only when every one of ``confirmations`` further, independent
    comparisons flags it too: a noisy stretch on a shared 2-core machine must not
    block a merge; a real 20 % slowdown shows up every time. A disturbed comparison
    (``steady``) neither flags nor clears a case until it is run again."""
    lines: list[str] = []
    first = steady(compare_once, threshold=threshold, retries=retries, lines=lines)
    lines += first.lines
    regressed = first.regressed
    for n in range(confirmations):
        if not regressed:
            break
        lines.append(f"confirmation run {n + 1}:")
        again = steady(compare_once, threshold=threshold, retries=retries, lines=lines)
        lines += again.lines[1:]
        regressed &= again.regressed
    return not regressed, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-ref")
    parser.add_argument("--base-tree", type=Path)
    parser.add_argument("--head-tree", type=Path, default=ROOT)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-base-") as tmp:
        if args.base_tree is not None:
            base = args.base_tree
            label = str(base)
        else:
            label = args.base_ref or default_base()
            try:
                base = export_ref(label, Path(tmp))
            except subprocess.CalledProcessError as exc:
                sys.stdout.write(f"bench gate: FAILED: cannot export the base tree {label}: {(exc.stderr or b'').decode(errors='replace')[-500:]}\n")
                return 1
        try:
            ok, lines = gate(
                functools.partial(compare, base, args.head_tree, pairs=args.pairs, rounds=args.rounds, threshold=args.threshold), threshold=args.threshold
            )
        except RuntimeError as exc:
            sys.stdout.write(f"bench gate: FAILED: the benchmark could not run ({exc})\n")
            return 1
    sys.stdout.write(f"bench gate: base {label} vs head, threshold +{args.threshold:.0%}\n" + "\n".join(lines) + "\n")
    sys.stdout.write("bench gate: " + ("ok" if ok else "FAILED") + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
