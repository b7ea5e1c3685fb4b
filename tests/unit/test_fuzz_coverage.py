"""Short coverage-guided runs of the harnesses in tools/fuzz/ (atheris, libFuzzer): the
trace-file reader, the session frame decoder, the spec parser. Each is bounded by a run
count (the long runs, minutes each, are recorded in docs/reliability.md); a finding
stops the harness with a non-zero exit and the input that caused it in crash-*.
Skipped where atheris does not install (it ships wheels for Linux x86_64 only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")
ROOT = Path(__file__).resolve().parents[2]
RUNS = {"trace_reader": 2000, "protocol_frame": 20000, "spec_parser": 5000}


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_a_short_coverage_guided_run_finds_nothing(harness, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz" / f"{harness}.py"), f"-runs={RUNS[harness]}",
                           "-max_total_time=30", "-seed=1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*"))
