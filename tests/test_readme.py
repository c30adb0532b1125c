"""The README is a contract: every python block runs, and every `vqcore ...` shell line succeeds.

Shell lines starting with `make` are not run here (`make test` is this suite; `make demo` is covered by
tests/test_demo.py in a reduced mode), nor are `torchrun` lines (tests/test_distributed.py runs
examples/train_ddp.py under torchrun).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(language):
    found = [
        (m.string[: m.start()].count("\n") + 1, m.group(2))
        for m in BLOCK.finditer(README.read_text())
        if m.group(1) == language
    ]
    return [pytest.param(code, id=f"line{line}") for line, code in found]


def test_readme_has_blocks_and_starts_with_the_two_commands():
    text = README.read_text()
    first = BLOCK.search(text)
    assert first.group(1) == "bash"
    commands = [line.split("#")[0].strip() for line in first.group(2).splitlines()]
    assert commands[:2] == ["make demo", "make test"]
    assert len(blocks("python")) >= 6


@pytest.mark.parametrize("code", blocks("python"))
def test_python_block_runs(code, fresh_registry):
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("code", blocks("bash"))
def test_shell_block_runs(code):
    vqcore = Path(sys.executable).with_name("vqcore")
    for line in code.splitlines():
        command = line.split("#")[0].split()
        if not command or command[0] in ("make", "torchrun"):
            continue
        assert command[0] == "vqcore", f"README shell line not covered by this test: {line!r}"
        result = subprocess.run([str(vqcore), *command[1:]], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
