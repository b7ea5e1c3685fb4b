"""`vnet trace`'s fast parser (vnet.cli.params, no typer) against typer's parser of the same
signature: every option, in every spelling, is accepted with the same values, and whatever the
fast parser accepts typer accepts with the same values too (it declines everything else, which
then goes to typer and its messages). No root, no kernel."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from vnet.cli.params import Argument, FastParser, Option, typer_command
from vnet.cli.trace import trace

FAST = FastParser(trace)
_captured: list[dict] = []

_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@_app.callback()
def _root():
    pass


_app.command("trace")(typer_command(trace, call=lambda **kw: _captured.append(kw)))
COMMAND = get_command(_app).commands["trace"]  # built once: typer 0.29 makes its adapters here


def typer_parse(args: list[str]) -> dict | None:
    """The values typer hands the command, or None if typer rejects the command line."""
    _captured.clear()
    try:
        COMMAND.main(list(args), prog_name="vnet trace", standalone_mode=False)
    except (typer.Exit, SystemExit):
        return None
    except Exception as e:  # click's UsageError / BadParameter and the like
        if type(e).__module__.startswith("typer"):
            return None
        raise
    assert len(_captured) == 1
    return _captured[0]


def same(args: list[str]) -> dict | None:
    """Parse both ways; when the fast parser accepts, typer must give exactly the same values."""
    fast = FAST.parse(args)
    if fast is not None:
        slow = typer_parse(args)
        assert slow is not None, f"fast parser accepts what typer rejects: {args}"
        assert fast == slow, args
        for k in fast:
            assert type(fast[k]) is type(slow[k]), (args, k, fast[k], slow[k])
    return fast


def test_the_options_are_typers():
    """The same names, kinds and defaults as the click command typer builds from the signature."""
    by_name = {p.name: p for p in COMMAND.params}
    assert set(by_name) == {p.name for p in FAST.params}
    for param in FAST.params:
        click_param = by_name[param.name]
        if param is FAST.argument:
            assert click_param.param_type_name == "argument" and click_param.nargs == -1
            continue
        assert sorted(click_param.opts + click_param.secondary_opts) == sorted(param.decls), param.name
        assert bool(click_param.count) == param.count, param.name
        assert bool(click_param.is_flag) == param.is_flag, param.name
        assert bool(click_param.multiple) == param.multiple, param.name
    names = set(FAST.short) | set(FAST.long)
    click_names = {o for p in COMMAND.params if p.param_type_name == "option" for o in p.opts + p.secondary_opts}
    assert names == click_names


def test_defaults_alone():
    assert same([]) is not None


# One valid value per option type: (text, the value typer makes of it).
SAMPLES = {str: ("tap1", "tap1"), int: ("7", 7), float: ("2.5", 2.5), Path: ("out.vnt", Path("out.vnt"))}


@pytest.mark.parametrize("param", [p for p in FAST.params if p is not FAST.argument], ids=lambda p: p.name)
def test_every_option_is_accepted_identically(param):
    for decl in param.decls:
        if param.is_flag:
            spellings = [[decl]]
        elif param.count:
            spellings = [[decl], [decl, decl]] + ([[decl + decl[1]]] if len(decl) == 2 else [])
        else:
            text, value = SAMPLES[param.kind]
            spellings = [[decl, text]] + ([[decl + text]] if len(decl) == 2 else [[f"{decl}={text}"]])
            if param.multiple:
                spellings.append([decl, text, decl, text])
        for args in spellings:
            for where in (args, ["udp", *args, "port", "53"], [*args, "--", "-c"]):
                got = same(where)
                assert got is not None, f"the fast parser declines a valid {where}"
                assert got[param.name] not in (None, False, 0, []), where
                if not (param.is_flag or param.count):
                    assert got[param.name] == ([value] * args.count(decl) or [value] if param.multiple else value), where


def test_the_expression_words():
    assert same(["udp", "and", "dst", "port", "53"])["expression"] == ["udp", "and", "dst", "port", "53"]
    assert same(["--", "-c", "5"])["expression"] == ["-c", "5"]
    assert same(["-", "x"])["expression"] == ["-", "x"]
    assert same([])["expression"] is None


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["--bogus"], ["-X"], ["-c"], ["-c", "0"], ["-c", "x"], ["-c=5"], ["--count=0"],
    ["--json=1"], ["--verbose=2"], ["--duration", "-1"], ["--min-len", "-1"], ["--max-len", "0"],
    ["--interval", "0.05"], ["--follow-idle-ms", "0.5"], ["--min-runq-us", "-0.1"], ["--pid", "1.0"],
    ["--count", "007"], ["--count", "+5"], ["--count", " 5"], ["--count", "5_0"], ["--duration", "1e3"],
    ["--duration", ".5"], ["--duration", "inf"], ["-w", ""], ["-r", ""], ["--ring-size", "4096.0"],
    ["--coun", "5"], ["--Count", "5"], ["-vx"], ["--dump-filter=yes"],
])
def test_what_typer_rejects_or_reads_its_own_way_goes_to_typer(args):
    assert same(args) is None


@pytest.mark.parametrize("args", [
    ["-i", "--help"], ["-i", "--"], ["-i", "-c"], ["--sport", "-5"], ["-vvc", "3"], ["-vc3"], ["-c", "3", "-c", "4"],
    ["-w", "a//b/"], ["--direction=sideways"], ["-s64"], ["--proto", ""], ["--count", "1", "udp", "-v", "--", "--x"],
])
def test_corner_cases_agree(args):
    assert same(args) is not None


def test_random_command_lines_agree():
    """Whatever the fast parser accepts, typer accepts with the same values (seeded, ~600 lines)."""
    words = sorted(set(FAST.short) | set(FAST.long)) + [
        "--", "-", "udp", "53", "0", "1", "-1", "2.5", "x", "", "--help", "-vv", "-c5", "-c=5", "--count=3",
        "--json=1", "--sample=1/4", "-ifoo", "007", "1e3", "ns1/eth0", "--bogus"]
    rng = random.Random(20261126)
    accepted = 0
    for _ in range(600):
        args = [rng.choice(words) for _ in range(rng.randint(0, 7))]
        accepted += same(args) is not None
    assert accepted > 100  # the comparison means something


def test_declarations_the_fast_parser_cannot_follow_are_refused():
    with pytest.raises(TypeError):
        Option(None, "--x", callback=print)
    with pytest.raises(TypeError):
        Argument(None, envvar="X")

    def bad(x: bool = Option(True, "--x")):  # a flag defaulting to True has a --no-x in typer
        pass

    with pytest.raises(TypeError):
        FastParser(bad)


def test_vnet_trace_runs_without_typer(tmp_path):
    """The entry point: a command line the fast parser takes never imports typer (its error is
    still one line and its exit code); --help goes to typer."""
    code = ("import atexit, sys; atexit.register(lambda: print('typer' in sys.modules)); "
            "from vnet.cli.main import main; sys.argv = ['vnet', *sys.argv[1:]]; main()")
    missing = tmp_path / "none.vnt"
    env = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-c", code, "trace", "-r", str(missing), "-c", "1"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert (r.returncode, r.stdout) == (2, "False\n"), r.stderr
    assert r.stderr == f"vnet: error: no trace file {missing}\n"
    r = subprocess.run([sys.executable, "-c", code, "trace", "--help"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("True") and "--dump-filter" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-c", code, "trace", "-c", "0"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2 and "Invalid value for '-c' / '--count'" in r.stderr, r.stderr
