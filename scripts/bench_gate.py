"""The benchmark regression gate: HEAD against a base tree, side by side in one run.

    python scripts/bench_gate.py [--base-ref REF | --base-tree DIR] [--head-tree DIR]
                                 [--rounds N] [--threshold 0.10]

Runs ``bench_stages.py`` for the base and the head trees alternately (base,
head, head, base, ...) so that both see the same machine load, then compares
the fastest round of every case (noise only adds time). Fails (exit 1) when any case of the
head is more than ``threshold`` slower than the base. A case that the base
does not have is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
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
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(base: Path, head: Path, *, pairs: int, rounds: int, threshold: float) -> tuple[set[str], list[str]]:
    samples: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
    for i in range(pairs):
        order = [("base", base), ("head", head)] if i % 2 == 0 else [("head", head), ("base", base)]
        for label, tree in order:
            for case, values in sample(tree, rounds).items():
                samples[label].setdefault(case, []).extend(values)
    regressed_cases: set[str] = set()
    lines = [f"{'case':<36}{'base us':>10}{'head us':>10}{'change':>9}"]
    for case, head_values in samples["head"].items():
        base_values = samples["base"].get(case)
        if not base_values:
            lines.append(f"{case:<36}{'-':>10}{min(head_values):>10.2f}   (new)")
            continue
        # The fastest round of each side: noise on a shared machine only ever adds
        # time, so the minimum is the steadiest estimate of the code's own cost.
        b, h = min(base_values), min(head_values)
        change = h / b - 1.0
        regressed = change > threshold
        if regressed:
            regressed_cases.add(case)
        lines.append(f"{case:<36}{b:>10.2f}{h:>10.2f}{change:>+8.1%}{'  REGRESSION' if regressed else ''}")
    return regressed_cases, lines


def gate(base: Path, head: Path, *, pairs: int, rounds: int, threshold: float, confirmations: int = 2) -> tuple[bool, list[str]]:
    """A case fails only when every one of ``confirmations`` further, independent
    comparisons flags it too: a noisy stretch on a shared 2-core machine must not
    block a merge; a real 20 % slowdown shows up every time."""
    regressed, lines = compare(base, head, pairs=pairs, rounds=rounds, threshold=threshold)
    for n in range(confirmations):
        if not regressed:
            break
        confirmed, again = compare(base, head, pairs=pairs, rounds=rounds, threshold=threshold)
        lines += [f"confirmation run {n + 1}:", *again[1:]]
        regressed &= confirmed
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
            except subprocess.CalledProcessError:
                sys.stdout.write(f"bench gate: no base tree at {label}; nothing to compare\n")
                return 0
        try:
            ok, lines = gate(base, args.head_tree, pairs=args.pairs, rounds=args.rounds, threshold=args.threshold)
        except RuntimeError as exc:
            # The base predates a benchmark case's API: report, do not block.
            sys.stdout.write(f"bench gate: base {label} could not be benchmarked ({exc}); skipped\n")
            return 0
    sys.stdout.write(f"bench gate: base {label} vs head, threshold +{args.threshold:.0%}\n" + "\n".join(lines) + "\n")
    sys.stdout.write("bench gate: " + ("ok" if ok else "FAILED") + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
