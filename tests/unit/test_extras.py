"""Tracing hosts do without the `analysis` extra: without numpy, `vnet analyze`
and `vnet export` say what to install (one line, exit 5), and tracing imports
none of it."""

from __future__ import annotations

import subprocess
import sys

BLOCK_NUMPY = "import sys; sys.modules['numpy'] = None; "


def _vnet(*args: str) -> subprocess.CompletedProcess:
    code = BLOCK_NUMPY + "from vnet.cli.main import main; sys.argv = ['vnet', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_analyze_and_export_without_numpy_say_what_to_install(tmp_path):
    for args in (["analyze", str(tmp_path)], ["export", str(tmp_path), "--to", "jsonl", "-o", "-"]):
        r = _vnet(*args)
        assert r.returncode == 5, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "pip install 'vnet[analysis]'" in r.stderr, r.stderr


def test_tracing_modules_do_not_import_numpy():
    code = ("import sys; import vnet.cli.main, vnet.cli.app, vnet.trace.session, vnet.agent.agent, vnet.collector.server, "
            "vnet.dispatch.dispatcher, vnet.trace.recorder; print('numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
