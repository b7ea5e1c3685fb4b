"""`vnet demo`: the main jobs on built-in throwaway topologies.

Each scenario (vnet/demo/) builds its topology, traces it, analyses the trace
with `vnet analyze`'s code, prints the verdict and key numbers, leaves its trace
files, analysis, plots and captures in a folder it names, and removes everything
it created, also on Ctrl-C or failure.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from vnet.errors import UsageError
from vnet.probes import features

from .common import cli_errors, setup_logging

SCENARIOS = {"ovs-congestion": "vnet.demo.ovs_congestion", "tail-latency": "vnet.demo.tail_latency",
             "tail-latency-qemu": "vnet.demo.tail_latency_qemu", "vm-boundary": "vnet.demo.vm_boundary",
             "bridge": "vnet.demo.bridge"}
ALL = ("ovs-congestion", "tail-latency", "tail-latency-qemu", "vm-boundary")  # the QEMU ones where installed


@cli_errors
def demo(
    scenario: str = typer.Argument("all", metavar="[ovs-congestion|tail-latency|tail-latency-qemu|vm-boundary|bridge|all]",
                                   help="Which scenario; all: ovs-congestion, tail-latency and, where QEMU and "
                                        "virtme-ng are installed, tail-latency-qemu and vm-boundary."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for trace files, analysis, plots "
                                                                 "(default: ./vnet-demo-TIME)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller runs (what the test suite does)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """Build a throwaway topology, reproduce a latency problem, find its cause with vnet, tear down."""
    setup_logging(verbose)
    names = list(ALL) if scenario == "all" else [scenario]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UsageError(f"unknown demo scenario {unknown[0]!r} (one of {', '.join(SCENARIOS)}, all)")
    features.require_privileges(net_admin=True)
    from vnet.demo import DemoContext

    if scenario == "all":
        from vnet.demo.tail_latency_qemu import available

        why = available()
        if why:
            for qemu in ("tail-latency-qemu", "vm-boundary"):
                print(f"vnet demo: skipping {qemu}: {why}", file=sys.stderr)
                names.remove(qemu)

    folder = out or Path(f"vnet-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"vnet demo: results in {folder}/", file=sys.stderr)
    results = []
    for i, name in enumerate(names):
        module = importlib.import_module(SCENARIOS[name])
        sub = folder / name
        sub.mkdir(exist_ok=True)
        with _progress(f"[{i + 1}/{len(names)}] {module.TITLE}", enabled=not json_out) as report:
            try:
                result = module.run(DemoContext(sub, report, quick, verbose))
            except KeyboardInterrupt:
                print(f"vnet demo: interrupted during {name}; what it built is removed", file=sys.stderr)
                raise typer.Exit(130) from None
        results.append(result)
        if not json_out:
            _show(result)
    if json_out:
        sys.stdout.write(json.dumps({"folder": str(folder), "results": [
            {"name": r.name, "ok": r.ok, "why": r.why, "verdict": r.verdict, "numbers": r.numbers,
             "files": [str(f) for f in r.files]} for r in results]}, default=str) + "\n")
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            print(f"vnet demo: {r.name}: the answer is not the expected one: {r.why}", file=sys.stderr)
        raise typer.Exit(1)


class _progress:
    """A progress bar on stderr (rich) for one scenario; report(step, fraction)."""

    def __init__(self, title: str, enabled: bool):
        self.title, self.enabled = title, enabled and sys.stderr.isatty()
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 transient=True, console=None)
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=1.0)
        else:
            print(f"vnet demo: {self.title}", file=sys.stderr)
        return self.report

    def report(self, step: str, fraction: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=max(0.0, min(fraction, 1.0)), description=f"{self.title}: {step}")
        else:
            print(f"vnet demo:   {step}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _show(r) -> None:
    print(f"\n== {r.name} ==")
    print(r.verdict)
    lines = list(_numbers(r.numbers))
    if lines:
        print("\nkey numbers:")
        print("\n".join(f"  {line}" for line in lines))
    if r.files:
        print(f"\nwrote {len(r.files)} files: " + ", ".join(str(f) for f in r.files))


def _numbers(v, key: str = ""):
    """Nested numbers as 'a.b: value' lines (a dict of plain values on one line);
    *_ns values in microseconds."""
    if isinstance(v, dict) and key and v and not any(isinstance(x, (dict, list)) for x in v.values()):
        yield f"{key}: " + ", ".join(_value(k, x) for k, x in v.items())
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _numbers(x, f"{key}.{k}" if key else str(k))
    elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        for i, x in enumerate(v):
            yield from _numbers(x, f"{key}[{i}]")
    else:
        yield _value(key, v, ": ")


def _value(key: str, v, sep: str = " ") -> str:
    if key.endswith("_ns") and isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{key.removesuffix('_ns')}{sep}{v / 1000:.1f} us"
    if isinstance(v, float):
        return f"{key}{sep}{v:.3g}"
    return f"{key}{sep}{v}"
