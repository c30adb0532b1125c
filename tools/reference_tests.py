"""Run vector-quantize-pytorch's own test files with the import changed to vqcore, and count what passes.

The reference's tests are not shipped in its wheel or sdist and are not part of this repository; give
this tool a folder holding them (a checkout of the reference's ``tests/``)::

    .venv/bin/python tools/reference_tests.py --tests ~/src/vector-quantize-pytorch/tests
    .venv/bin/python tools/reference_tests.py --tests DIR --against reference   # the baseline
    .venv/bin/python tools/reference_tests.py --tests DIR --compare             # both, per test

With ``--against vqcore`` (the default) the files are copied to a scratch folder and every import of
``vector_quantize_pytorch`` (the package or one of its submodules) is rewritten to the vqcore module
that holds the same names (:data:`MODULES`): what a user switching libraries does. Nothing else in
the files changes. ``--compare`` runs both and lists the tests that pass on the reference but not on
vqcore. The exit status is pytest's (``--compare``: 0 when vqcore passes every test the reference
passes).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# reference module -> the vqcore module a switching user imports the same names from
MODULES = {
    "vector_quantize_pytorch": "vqcore",
    "vector_quantize_pytorch.vector_quantize_pytorch": "vqcore.plugins.vq",
    "vector_quantize_pytorch.residual_vq": "vqcore.plugins.rvq",
    "vector_quantize_pytorch.random_projection_quantizer": "vqcore.plugins.rpq",
    "vector_quantize_pytorch.finite_scalar_quantization": "vqcore.plugins.fsq",
    "vector_quantize_pytorch.residual_fsq": "vqcore.plugins.residual_fsq",
    "vector_quantize_pytorch.finite_scalar_perturbation": "vqcore.plugins.fsp",
    "vector_quantize_pytorch.lookup_free_quantization": "vqcore.plugins.lfq",
    "vector_quantize_pytorch.residual_lfq": "vqcore.plugins.residual_lfq",
    "vector_quantize_pytorch.evo_lookup_free_quantization": "vqcore.plugins.evo_lfq",
    "vector_quantize_pytorch.latent_quantization": "vqcore.plugins.latent",
    "vector_quantize_pytorch.binary_mapper": "vqcore.plugins.binary_mapper",
    "vector_quantize_pytorch.utils": "vqcore.blocks.sequential",
    "vector_quantize_pytorch.sim_vq": "vqcore.plugins.sim_vq",
    "vector_quantize_pytorch.residual_sim_vq": "vqcore.plugins.residual_sim_vq",
    "vector_quantize_pytorch.hierarchical_vq": "vqcore.plugins.hierarchical_vq",
}

_MODULE = re.compile(r"\bvector_quantize_pytorch(?:\.[A-Za-z_][A-Za-z_0-9]*)*")


def rewrite(source: str) -> str:
    """Every ``vector_quantize_pytorch[.sub]`` module name -> its vqcore module (:data:`MODULES`);
    an unknown submodule maps to ``vqcore`` (the test then fails on the missing name, as it would for
    a user)."""
    return _MODULE.sub(lambda m: MODULES.get(m.group(0), "vqcore"), source)


def run(tests: Path, against: str, pytest_args: list[str]) -> tuple[int, dict[str, str]]:
    """Run pytest on a copy of ``tests`` (rewritten for vqcore unless ``against == "reference"``);
    returns (pytest's exit status, {test id: outcome})."""
    with tempfile.TemporaryDirectory(prefix=f"reference-tests-{against}-") as scratch:
        folder = Path(scratch) / "tests"
        folder.mkdir()
        for path in sorted(tests.glob("*.py")):
            text = path.read_text()
            (folder / path.name).write_text(rewrite(text) if against == "vqcore" else text)
        report = Path(scratch) / "report.jsonl"
        plugin = Path(scratch) / "outcomes.py"
        plugin.write_text(_OUTCOME_PLUGIN.format(report=str(report)))
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "outcomes",
            "--continue-on-collection-errors",
            "--rootdir",
            scratch,
            str(folder),
            *pytest_args,
        ]
        env_path = f"{scratch}"
        status = subprocess.call(command, cwd=scratch, env=_env_with_path(env_path))
        outcomes: dict[str, str] = {}
        if report.exists():
            for line in report.read_text().splitlines():
                entry = json.loads(line)
                outcomes[entry["id"]] = entry["outcome"]
        shutil.rmtree(folder, ignore_errors=True)
    return status, outcomes


_OUTCOME_PLUGIN = """
import json

def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        with open({report!r}, "a") as handle:
            handle.write(json.dumps({{"id": report.nodeid, "outcome": report.outcome}}) + "\\n")

def pytest_collectreport(report):
    if report.outcome == "failed":
        with open({report!r}, "a") as handle:
            handle.write(json.dumps({{"id": report.nodeid + "::<collection>", "outcome": "error"}}) + "\\n")
"""


def _env_with_path(folder: str) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = folder + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def summary(outcomes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, required=True, help="folder with the reference's test files")
    parser.add_argument("--against", choices=("vqcore", "reference"), default="vqcore")
    parser.add_argument("--compare", action="store_true", help="run both and list the differences")
    parser.add_argument("--json", type=Path, help="write {test id: outcome} per run to this file")
    args, pytest_args = parser.parse_known_args(argv)
    if not args.tests.is_dir():
        parser.error(f"--tests must be a folder of test files, got {args.tests}")
    runs = ("reference", "vqcore") if args.compare else (args.against,)
    results = {}
    status = 0
    for against in runs:
        status, outcomes = run(args.tests, against, pytest_args)
        results[against] = outcomes
        print(f"{against}: {summary(outcomes)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        reference, ours = results["reference"], results["vqcore"]
        passed = [t for t, outcome in reference.items() if outcome == "passed"]
        missing = sorted(t for t in passed if ours.get(t) != "passed")
        print(f"vqcore passes {len(passed) - len(missing)} of the {len(passed)} tests the reference passes")
        for test in missing:
            print(f"  {ours.get(test, 'not run')}: {test}")
        return 1 if missing else 0
    return status


if __name__ == "__main__":
    raise SystemExit(main())
