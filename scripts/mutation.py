"""Mutation testing of the core with mutmut: does a test fail when a decision changes?

    scripts/mutation.sh [PATH...]          the core (pyproject.toml's [tool.mutmut]
                                           only_mutate), or the given core files
    scripts/mutation.sh --changed          the core files changed since the base: the
                                           merge base with origin/main, else HEAD~1
    --gate                                 exit 1 when a module kills under 80 %
    --time-cap S                           stop after S seconds and say what was not run
    --tests T...                           these tests instead of the configured selection

mutmut runs in a work directory (``.mutation/``, or ``--work``), which holds a copy of
the packages and the tests and a pyproject.toml whose ``[tool.mutmut]`` names what to
mutate and which tests to run. A run never writes into the tree, and mutmut keeps its
results there: the next run re-tests only the functions that changed. For each mutant
mutmut runs only the selected tests that call the mutated function (its "stats").

The last line is ``mutation: killed K of N (R %)``: N counts the mutants run, K those a
test failed on (or that timed out). A mutant no test reaches counts as survived.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_gate import default_base  # noqa: E402  (the bench gate's base, the same for both gates)

PACKAGES = ("pipeline", "batches", "workers", "orchestrator_site")
ALSO = ("tests", "manage.py", "pipeline.example.toml", "benchmarks", "docs")
FLOOR = 80.0
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
NOT_RUN = {"not checked", "skipped", "check was interrupted by user"}
_MODULE = re.compile(r"^(?P<module>[\w.]+?)\.x(?:_|ǁ)")


def settings() -> dict[str, object]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"])


def core_files() -> list[str]:
    return [str(p) for p in settings()["only_mutate"]]  # type: ignore[attr-defined]


def changed_core_files(base: str) -> list[str]:
    diff = subprocess.run(["git", "diff", "--name-only", f"{base}...HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [path for path in core_files() if path in diff]


def prepare(work: Path, files: list[str], tests: list[Path]) -> None:
    """The work directory: the tree's packages and tests now, and mutmut told what to do."""
    work.mkdir(parents=True, exist_ok=True)
    for name in (*PACKAGES, *ALSO):
        source, target = ROOT / name, work / name
        if target.is_dir():
            shutil.rmtree(target)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, target)
    config = settings()
    config["only_mutate"] = files
    if tests:
        given = work / "tests" / "given"
        given.mkdir(exist_ok=True)
        (given / "__init__.py").touch()
        for test in tests:
            shutil.copy2(test, given / test.name)
        config["pytest_add_cli_args_test_selection"] = [f"tests/given/{test.name}" for test in tests]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project["tool"]["mutmut"] = config
    (work / "pyproject.toml").write_text(tomli_w.dumps(project))


def run_mutmut(work: Path, *, children: int, cap_s: float | None) -> bool:
    """mutmut's run in ``work``; False when the time cap stopped it."""
    env = {
        **os.environ,
        # Databases and key prefixes of its own: a mutation run beside the suite meets nothing of it.
        "DATABASE_TEST_NAME": os.environ.get("MUTATION_DATABASE_TEST_NAME", "test_orch_mutation"),
        "CELERY_BROKER_KEY_PREFIX": "orchmutation:",
    }
    mutmut = str(Path(sys.executable).parent / "mutmut")
    proc = subprocess.Popen(
        [mutmut, "run", "--max-children", str(children)], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=cap_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate()
        return False
    if proc.returncode != 0:
        raise SystemExit(f"mutation: mutmut failed ({proc.returncode}): {err.decode(errors='replace')[-3000:]}")
    return True


@dataclass
class Module:
    killed: int = 0
    tested: int = 0
    not_run: int = 0
    survivors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return 100.0 * self.killed / self.tested if self.tested else 100.0


def results(work: Path, files: list[str]) -> dict[str, Module]:
    """Each mutated module's count, from ``mutmut results --all true``."""
    out = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=True).stdout
    wanted = {f.removesuffix(".py").replace("/", ".") for f in files}
    modules: dict[str, Module] = defaultdict(Module)
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        found = _MODULE.match(name)
        if found is None or found["module"] not in wanted:
            continue
        module = modules[found["module"]]
        if status in NOT_RUN:
            module.not_run += 1
            continue
        module.tested += 1
        if status in KILLED:
            module.killed += 1
        else:
            module.survivors.append(f"{name} ({status})")
    return dict(sorted(modules.items()))


def report(modules: dict[str, Module], *, capped: bool) -> list[str]:
    lines = ["| module | killed | run | kill rate | not run |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {m.killed} | {m.tested} | {m.rate:.1f} % | {m.not_run} |" for name, m in modules.items()]
    survivors = [s for m in modules.values() for s in m.survivors]
    if survivors:
        lines += ["", "survivors (mutmut show NAME, in the work directory):", *(f"  {s}" for s in survivors)]
    not_run = sum(m.not_run for m in modules.values())
    if capped or not_run:
        lines.append(f"not run within the time cap: {not_run} mutants ({', '.join(n for n, m in modules.items() if m.not_run)})")
    return lines


def summary(modules: dict[str, Module]) -> str:
    killed, tested = sum(m.killed for m in modules.values()), sum(m.tested for m in modules.values())
    rate = 100.0 * killed / tested if tested else 100.0
    return f"mutation: killed {killed} of {tested} ({rate:.1f} %)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="core files to mutate (default: the whole core)")
    parser.add_argument("--changed", action="store_true", help="the core files changed since the base")
    parser.add_argument("--base-ref", help="the base for --changed (default: merge base with origin/main, else HEAD~1)")
    parser.add_argument("--gate", action="store_true", help=f"exit 1 when a module kills under {FLOOR:.0f} %%")
    parser.add_argument("--time-cap", type=float, default=None, help="seconds; what is left is reported, not failed")
    parser.add_argument("--tests", nargs="+", type=Path, default=[], help="these test files instead of the configured selection")
    parser.add_argument("--children", type=int, default=1, help="mutants run at once (they share the test database: 1)")
    parser.add_argument("--work", type=Path, default=ROOT / ".mutation")
    args = parser.parse_args(argv)
    core = core_files()
    if args.changed:
        files = changed_core_files(args.base_ref or default_base())
        if not files:
            sys.stdout.write("mutation: no core file changed\n")
            return 0
    else:
        files = [str(Path(p)) for p in args.paths] or core
        outside = [f for f in files if f not in core]
        if outside:
            sys.stderr.write(f"mutation: not core files (pyproject.toml [tool.mutmut] only_mutate): {', '.join(outside)}\n")
            return 2
    started = time.monotonic()
    prepare(args.work, files, [t.resolve() for t in args.tests])
    finished = run_mutmut(args.work, children=args.children, cap_s=args.time_cap)
    modules = results(args.work, files)
    lines = [*report(modules, capped=not finished), f"(in {time.monotonic() - started:.0f} s)"]
    weak = [name for name, m in modules.items() if m.tested and m.rate < FLOOR]
    if args.gate:
        lines.append(f"mutation gate: FAILED: under {FLOOR:.0f} %: {', '.join(weak)}" if weak else "mutation gate: ok")
    sys.stdout.write("\n".join([*lines, summary(modules)]) + "\n")  # the summary last, always
    return 1 if args.gate and weak else 0


if __name__ == "__main__":
    raise SystemExit(main())
