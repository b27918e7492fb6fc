"""`attnzoo check` (every method against its float64 oracle) and `attnzoo --version`."""

import json
import os
import re
import subprocess
import sys

import pytest

import attnzoo
from attnzoo import check
from attnzoo.cli import main as cli_main

_MEASURE = """
import json, resource, subprocess, sys
result = subprocess.run([sys.executable, "-m", "attnzoo", "check"], capture_output=True, text=True)
print(json.dumps({"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnzoo {attnzoo.__version__}"


def test_check_passes_under_one_gigabyte_with_a_line_per_method():
    """The whole `attnzoo check` on the CPU (torch backend), in a child process whose peak resident
    memory its parent reads: below 1 GB, one progress line per method as it finishes."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    measured = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, env=env, timeout=600)
    assert measured.returncode == 0, measured.stderr[-3000:]
    result = json.loads(measured.stdout)
    assert result["returncode"] == 0, result["stdout"] + result["stderr"][-3000:]
    assert f"all {len(attnzoo.list_methods())} methods ok" in result["stdout"]
    assert result["max_rss_kb"] < 1024 * 1024, f"peak RSS {result['max_rss_kb'] / 1024:.0f} MB"
    progress = [line for line in result["stderr"].splitlines() if line.startswith("  checked ")]
    assert [line.split()[1] for line in progress] == attnzoo.list_methods()
    pattern = re.compile(r"  checked \S+ \((torch|triton)\): max error \d\.\d\de[-+]\d\d, \d+\.\d s: ok$")
    assert all(pattern.match(line) for line in progress), progress


def test_progress_line_names_method_backend_error_and_seconds():
    row = check.CheckRow("dense", "exact", "cpu", "torch", "-", "float32", 1.5e-6, 2.0, "ok", seconds=0.25)
    assert check.progress_line(row) == "  checked dense (torch): max error 1.50e-06, 0.2 s: ok"
    failed = check.CheckRow("x", "exact", "cpu", "-", "-", "-", None, None, "FAIL: ImportError: no")
    assert check.progress_line(failed) == "  checked x (-): max error -, -: FAIL: ImportError: no"


def test_iter_rows_yields_each_method_when_it_is_done(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = check.iter_rows(["dense", "gla"], "cpu")
    first = next(rows)
    assert first.method == "dense" and first.status == "ok" and first.seconds is not None
    assert next(rows).method == "gla"
