"""The regression gate catches an injected 20 % slowdown and stays green on an unchanged tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_gate

# The tests that run the gate: one gate run is three side-by-side comparisons of ~8 s
# on a quiet machine; a slowdown is confirmed twice more and a disturbed run is
# repeated (up to five runs), so on a busy CI host the 120 s default was seen to cut a
# correct run short.
GATE_TIMEOUT_S = 1200

PACKAGES = ("orchestrator_site", "pipeline", "workers", "batches")

SLOWDOWN = """

# --- injected by test_bench_gate: every second call does the work twice (+50 % of assemble's own work) ---
_assemble_once = assemble
_calls = [0]


def assemble(ctx, *, config):  # type: ignore[no-redef]
    _calls[0] += 1
    if _calls[0] % 2 == 0:
        _assemble_once(ctx, config=config)
    return _assemble_once(ctx, config=config)
"""


def copy_tree(into: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def gate(base: Path, head: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/bench_gate.py", "--base-tree", str(base), "--head-tree", str(head), "--pairs", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )


CONTROLS = ("rag.limit_context", "post (2 KiB reply)")  # cases the injection does not touch


def disturbed(stdout: str) -> bool:
    """A run in which the untouched cases moved by more than 10 % was disturbed by the
    shared machine (seen once in CI: every base case 20 % slower); it says nothing."""
    return any(line.startswith(CONTROLS) and "%" in line and abs(change(line)) > 10 for line in stdout.splitlines())


def change(line: str) -> float:
    return float(line.split()[-2 if "REGRESSION" in line else -1].rstrip("%"))


def case_name(line: str) -> str:
    """A case's short name: ``post`` for ``post (2 KiB reply)`` and a line of its figures."""
    return line.split(" (")[0].split()[0]


def stands_out(stdout: str, case: str = "assemble", margin: float = 10.0) -> bool:
    """In every comparison of the run (the first and each confirmation), ``case`` slowed
    down by more than ``margin`` points beyond every control: the machine moved them
    all, the injection only the one."""
    blocks: list[dict[str, float]] = [{}]
    for line in stdout.splitlines():
        if line.startswith("confirmation run"):
            blocks.append({})
        elif line.startswith((case, *CONTROLS)) and "%" in line:
            blocks[-1][case_name(line)] = change(line)
    controls = [case_name(name) for name in CONTROLS]
    return all(case in b and all(c in b for c in controls) and b[case] - max(b[c] for c in controls) > margin for b in blocks)


@pytest.mark.slow
@pytest.mark.timeout(GATE_TIMEOUT_S)
def test_an_injected_slowdown_fails_the_gate(tmp_path: Path) -> None:
    base = copy_tree(tmp_path / "base")
    head = copy_tree(tmp_path / "head")
    with (head / "pipeline" / "stages" / "assemble.py").open("a") as f:
        f.write(SLOWDOWN)
    # A run tells when the controls held still, or when the injected case stood clear of
    # them in every comparison (seen in CI: the controls at -20 % and +8 %, assemble at
    # +30 % to +55 %). On a busy host it may take several runs: CI saw three disturbed in
    # a row twice in one afternoon (once with the base side 15-20 % slower throughout,
    # hiding the injection).
    for _ in range(5):
        proc = gate(base, head)
        if not disturbed(proc.stdout) or stands_out(proc.stdout):
            break
    assert not disturbed(proc.stdout) or stands_out(proc.stdout), proc.stdout
    assert proc.returncode == 1, proc.stdout
    flagged = [line for line in proc.stdout.splitlines() if "REGRESSION" in line]
    assert any(line.startswith("assemble") for line in flagged), proc.stdout


def test_disturbed_runs_are_recognised() -> None:
    calm = "rag.limit_context (50 docs)   4.6   4.7   +2.0%\npost (2 KiB reply)   170.0   171.0   +0.6%\nassemble   12.0   14.8  +23.3%  REGRESSION"
    noisy = "rag.limit_context (50 docs)   6.45   4.93  -23.6%\npost (2 KiB reply)   230.5   184.3  -20.0%"
    assert not disturbed(calm) and disturbed(noisy)


CI_RUN = """case                                   base us   head us   change
rag.limit_context (50 docs)               6.44      6.06   -5.9%
assemble                                 16.89     21.89  +29.6%  REGRESSION
post (2 KiB reply)                      122.98     98.67  -19.8%
confirmation run 1:
rag.limit_context (50 docs)               6.11      6.44   +5.4%
assemble                                 15.13     22.58  +49.2%  REGRESSION
post (2 KiB reply)                      102.18    100.89   -1.3%
bench gate: FAILED"""


def test_an_injected_case_standing_clear_of_the_controls_is_told_from_noise() -> None:
    assert disturbed(CI_RUN) and stands_out(CI_RUN)
    assert not stands_out(CI_RUN.replace("+49.2%", "+12.0%"))  # within 10 points of a control (+5.4 %)
    assert not stands_out(CI_RUN.replace("post (2 KiB reply)                      102.18    100.89   -1.3%\n", ""))  # a control missing
    assert not stands_out(CI_RUN.replace("assemble                                 15.13     22.58  +49.2%  REGRESSION\n", ""))


@pytest.mark.slow
@pytest.mark.timeout(GATE_TIMEOUT_S)
def test_an_unchanged_tree_passes(tmp_path: Path) -> None:
    # Once here (it was three times, 80 s of the suite): CI's own gate run is another
    # comparison of a tree with its base on every push.
    base = copy_tree(tmp_path / "base")
    proc = gate(base, ROOT)
    for _ in range(2):
        if proc.returncode == 0 or not disturbed(proc.stdout):
            break
        proc = gate(base, ROOT)  # the machine, not the code, moved the controls
    assert proc.returncode == 0, proc.stdout
    assert "bench gate: ok" in proc.stdout


def test_a_base_ref_that_cannot_be_exported_fails_the_gate() -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_gate.py", "--base-ref", "no-such-ref"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "FAILED: cannot export the base tree no-such-ref" in proc.stdout


def test_a_base_tree_the_benchmark_cannot_run_on_fails_the_gate(tmp_path: Path) -> None:
    base = copy_tree(tmp_path / "base")
    (base / "pipeline" / "stages" / "context.py").write_text("raise RuntimeError('a broken tree')\n")
    proc = gate(base, ROOT)
    assert proc.returncode == 1 and "FAILED: the benchmark could not run" in proc.stdout


def test_a_case_the_base_cannot_build_yet_is_reported_and_skipped(tmp_path: Path) -> None:
    """A case whose module the base has not got (new, or moved since) is left out of
    the base's run and shown as new; the other cases are compared as ever."""
    base = copy_tree(tmp_path / "base")
    (base / "pipeline" / "stages" / "postprocess.py").unlink()
    run = subprocess.run(
        [sys.executable, "scripts/bench_stages.py", "--tree", str(base), "--rounds", "1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(out["cases"]) == ["assemble", "rag.limit_context (50 docs)", "route group decision"]  # the engine imports the post stage too
    assert [line.split(":", 1)[0] for line in out["unavailable"]] == ["post (2 KiB reply)", "post on a stream (7-char chunks)", "engine (5 stages, in memory)"]
    compared = bench_gate.table(out["cases"], {**out["cases"], "post (2 KiB reply)": [100.0]}, threshold=0.1)
    assert any("post (2 KiB reply)" in line and "(new)" in line for line in compared.lines) and not compared.regressed


def comparisons(*results: tuple[set[str], float]) -> tuple[bench_gate.Compare, list[int]]:
    """A scripted ``compare``: each call answers the next (regressed cases, drift)."""
    calls = [0]

    def compare_once() -> bench_gate.Comparison:
        regressed, drift = results[calls[0]]
        calls[0] += 1
        return bench_gate.Comparison(set(regressed), ["case  base  head  change", *(f"{c}  1.0  1.5  +50.0%  REGRESSION" for c in regressed)], drift)

    return compare_once, calls


def test_a_disturbed_confirmation_neither_clears_nor_confirms_a_case() -> None:
    # Seen in CI: the injected case flagged, then a confirmation in which the base side
    # ran ~27 % slower throughout, hiding it; that confirmation cleared it and the gate
    # said ok. Now it is compared again, and the steady comparisons decide.
    compare_once, calls = comparisons(({"assemble"}, 0.0), (set(), -0.21), ({"assemble"}, 0.01), ({"assemble"}, -0.02))
    ok, lines = bench_gate.gate(compare_once, threshold=0.10)
    assert not ok and calls[0] == 4
    assert "  disturbed: the median case moved -21.0%; compared again" in lines
    assert lines.count("confirmation run 1:") == 1 and lines.count("confirmation run 2:") == 1


def test_a_steady_comparison_that_clears_a_case_passes_the_gate() -> None:
    compare_once, calls = comparisons(({"assemble"}, 0.0), (set(), 0.03))
    ok, _lines = bench_gate.gate(compare_once, threshold=0.10)
    assert ok and calls[0] == 2


def test_a_disturbed_first_comparison_is_run_again() -> None:
    # Every case slower on the head's side: the machine, not a change of five stages at once.
    compare_once, calls = comparisons(({"assemble", "post", "engine"}, 0.25), (set(), 0.01))
    ok, lines = bench_gate.gate(compare_once, threshold=0.10)
    assert ok and calls[0] == 2
    assert any(line.startswith("  disturbed | post") for line in lines)


def test_retries_are_bounded_and_the_last_comparison_counts() -> None:
    compare_once, calls = comparisons(({"a"}, 0.3), ({"a"}, 0.3), ({"a"}, 0.3), ({"a"}, 0.0), ({"a"}, 0.0))
    ok, _lines = bench_gate.gate(compare_once, threshold=0.10, confirmations=2, retries=2)
    assert not ok and calls[0] == 5  # 3 tries of the first comparison, then one steady confirmation each


def test_the_table_flags_cases_over_the_threshold_and_measures_the_drift() -> None:
    base = {"a": [10.0, 11.0], "b": [20.0], "c": [30.0], "gone": [5.0]}
    head = {"a": [12.0, 10.5], "b": [24.0], "c": [30.3], "new": [1.0]}
    result = bench_gate.table(base, head, threshold=0.10)
    assert result.regressed == {"b"}  # +20 %; a is +5 % by its fastest rounds
    assert result.drift == pytest.approx(0.05)  # the median of +5 %, +20 %, +1 %
    assert any("(new)" in line and line.startswith("new") for line in result.lines)
    assert bench_gate.table({}, {"new": [1.0]}, threshold=0.10).drift == 0.0
