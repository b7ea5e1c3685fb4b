"""`vnet agent` serving starts without the typer application (vnet/cli/daemon.py):
the same options and defaults; anything else goes to typer."""

import subprocess
import sys
from pathlib import Path

import pytest

from vnet.cli import daemon


@pytest.fixture
def runs(monkeypatch):
    seen = []
    monkeypatch.setattr(daemon, "_run_agent", lambda *a: seen.append(a))
    return seen


def test_serving_options_and_defaults(runs):
    assert daemon.agent_fast(["agent"]) == 0
    assert runs[-1] == ("127.0.0.1:7878", Path("/etc/vnet/key"), False, Path("/var/lib/vnet/spool"), None, 64, 1024, 0,
                        None, 60.0, Path("/dev/shm/vnet"))
    assert daemon.agent_fast(["agent", "--listen", "unix:/x.sock", "--key", "/k", "--allow-remote", "--spool", "/s",
                              "--host", "h1", "--queue-mb", "0", "--spool-mb", "5", "-vv", "--pin-dir", "/p",
                              "--orphan-grace", "5", "--queue-dir", "/q"]) == 0
    assert runs[-1] == ("unix:/x.sock", Path("/k"), True, Path("/s"), "h1", 0, 5, 2, Path("/p"), 5.0, Path("/q"))


@pytest.mark.parametrize("argv", [["trace", "-i", "x"], ["agent", "init"], ["agent", "--help"], ["agent", "-h"],
                                  ["agent", "--bogus"], ["agent", "--queue-mb", "-1"], ["agent", "--orphan-grace", "-1"],
                                  ["-v", "agent"], []])
def test_everything_else_goes_to_typer(runs, argv):
    assert daemon.agent_fast(argv) is None and not runs


def test_the_agent_does_not_import_typer():
    code = ("import sys; from vnet.cli import daemon; daemon._run_agent = lambda *a: None; "
            "from vnet.cli.main import main; sys.argv = ['vnet', 'agent']; "
            "exec('try:\\n main()\\nexcept SystemExit as e:\\n assert e.code == 0, e.code'); "
            "assert 'typer' not in sys.modules and 'pydantic' not in sys.modules, 'typer imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
