"""`vnet demo` scenarios: each builds its own throwaway topology, traces it with the
real probes (and, where it needs them, the real agent/collector), analyses the trace
files with `vnet analyze`'s code, and removes everything it created, even on
Ctrl-C or failure.

A scenario is a module with `NAME`, `TITLE` and `run(ctx: DemoContext) -> DemoResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class DemoContext:
    """What a scenario gets from the CLI."""

    out_dir: Path                                  # the folder it writes into (exists, empty)
    progress: Callable[[str, float], None] = lambda step, fraction: None  # step name, 0..1 overall
    quick: bool = False                            # smaller runs (the test suite)
    verbose: int = 0


@dataclass
class DemoResult:
    """What a scenario found: the analysis verdict, the key numbers (JSON-ready) and
    the files it wrote (trace files, the analysis JSON, plots, a pcapng)."""

    name: str
    verdict: str                                   # one paragraph, for people
    numbers: dict = field(default_factory=dict)    # e.g. {"congested": {"p99_ns": ...}, "baseline": {...}}
    files: list[Path] = field(default_factory=list)
    ok: bool = True                                # the scenario's own check of its answer
    why: str = ""                                  # when not ok: what did not come out as expected
