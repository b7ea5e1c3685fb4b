"""The CLI's error boundary (vnet.cli.common.cli_errors), pure logic: a VnetError is one
line and its exit code; a bug (any other exception) is one line and exit 70, with the
traceback only when asked for (-v, VNET_DEBUG=1); Ctrl-C is exit 130; the framework's
own exits pass through."""

from __future__ import annotations

import logging

import pytest

from vnet.cli.common import INTERNAL_ERROR, cli_errors, setup_logging
from vnet.errors import NoSuchInterfaceError


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.delenv("VNET_DEBUG", raising=False)
    root = logging.getLogger("vnet")
    old = getattr(root, "_vnet_verbose", 0)
    root._vnet_verbose = 0
    yield
    root._vnet_verbose = old


def _run(exc, capsys) -> tuple[int, list[str]]:
    @cli_errors
    def command():
        raise exc

    with pytest.raises(SystemExit) as e:
        command()
    return e.value.code, capsys.readouterr().err.splitlines()


def test_a_vnet_error_is_one_line_and_its_code(capsys):
    code, err = _run(NoSuchInterfaceError("no such interface: x"), capsys)
    assert (code, err) == (4, ["vnet: error: no such interface: x"])


def test_a_bug_is_one_line_without_a_traceback(capsys):
    code, err = _run(TypeError("unsupported operand"), capsys)
    assert code == INTERNAL_ERROR == 70
    assert err == ["vnet: internal error: TypeError: unsupported operand (a bug in vnet: run it again with -v "
                   "for the traceback; please report it)"]


@pytest.mark.parametrize("how", ["-v", "VNET_DEBUG"])
def test_with_v_the_traceback_comes_first(capsys, monkeypatch, how):
    if how == "-v":
        setup_logging(1)
    else:
        monkeypatch.setenv("VNET_DEBUG", "1")
    code, err = _run(KeyError("k"), capsys)
    assert code == 70 and err[0] == "Traceback (most recent call last):"
    assert err[-1].startswith("vnet: internal error: KeyError: 'k' (a bug in vnet: the traceback is above")


def test_ctrl_c_is_130(capsys):
    assert _run(KeyboardInterrupt(), capsys) == (130, ["vnet: interrupted"])


def test_the_frameworks_exits_pass_through():
    typer = pytest.importorskip("typer")

    @cli_errors
    def command():
        raise typer.Exit(3)

    with pytest.raises(typer.Exit):
        command()


def test_a_daemon_logging_its_peers_still_hides_a_bugs_traceback(capsys):
    """The agent and collector log at INFO without -v: that is not a request for tracebacks."""
    setup_logging(0, least=1)
    assert logging.getLogger("vnet").level == logging.INFO
    code, err = _run(KeyError("k"), capsys)
    assert code == 70 and len(err) == 1 and err[0].startswith("vnet: internal error: KeyError")
