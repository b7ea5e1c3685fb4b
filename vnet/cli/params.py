"""Command parameters declared once, in the command's signature, without importing typer.

`vnet trace` must start fast: importing typer and letting it parse costs ~0.15 s (typer 0.29
builds a pydantic adapter per option). A command declares its parameters with `Option` and
`Argument` below, spelled exactly like typer's; from that one signature

- `typer_command(fn)` makes the function typer registers (each default becomes the typer.Option /
  typer.Argument it spells), so `--help`, completion and every error message stay typer's;
- `FastParser(fn)` parses argv the way typer's (click's) parser does, for the inputs it is sure of,
  and gives up (None) on anything else: an unknown or malformed option, `--help`, a value it does
  not convert exactly as typer would, or one typer would reject. The caller then runs typer, which
  accepts it or prints its usual error with its usual exit code. So the fast path never accepts
  what typer rejects, never converts differently, and never has an error message of its own.

tests/unit/test_cli_params.py parses the same command lines both ways and compares.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Callable

# The keywords a parameter may use: the ones the fast parser knows the meaning of.
# Anything else (callback, envvar, is_eager, ...) is refused at declaration time.
_DISPLAY_ONLY = frozenset({"help", "metavar", "show_default", "rich_help_panel"})
_OPTION_KEYWORDS = _DISPLAY_ONLY | {"min", "max", "count"}
_ARGUMENT_KEYWORDS = _DISPLAY_ONLY


class Option:
    """typer.Option(default, *param_decls, **kwargs), recorded."""

    def __init__(self, default: Any, *param_decls: str, **kwargs: Any):
        unknown = set(kwargs) - _OPTION_KEYWORDS
        if unknown:
            raise TypeError(f"Option keywords the fast parser does not handle: {sorted(unknown)}")
        if not param_decls:
            raise TypeError("Option needs its names spelled out (e.g. '-c', '--count')")
        self.default, self.param_decls, self.kwargs = default, param_decls, kwargs

    def to_typer(self):
        import typer

        return typer.Option(self.default, *self.param_decls, **self.kwargs)


class Argument:
    """typer.Argument(default, **kwargs), recorded."""

    def __init__(self, default: Any, **kwargs: Any):
        unknown = set(kwargs) - _ARGUMENT_KEYWORDS
        if unknown:
            raise TypeError(f"Argument keywords the fast parser does not handle: {sorted(unknown)}")
        self.default, self.kwargs = default, kwargs

    def to_typer(self):
        import typer

        return typer.Argument(self.default, **self.kwargs)


def typer_command(fn: Callable, call: Callable | None = None) -> Callable:
    """The function to register with typer: `fn`'s signature with typer's parameter objects.
    `call` (default `fn`) is what runs with the parsed values (tests capture them with it)."""
    import functools
    import inspect

    target = call or fn
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    params = [p.replace(default=p.default.to_typer() if isinstance(p.default, (Option, Argument)) else p.default,
                        annotation=hints.get(p.name, p.annotation))
              for p in sig.parameters.values()]

    @functools.wraps(fn)
    def command(**kwargs):
        return target(**kwargs)

    del command.__wrapped__  # typer must see the signature below, not fn's
    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


# What typer (pydantic, lax mode) turns into the same number; anything else is left to typer.
_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{1,17})?")


class _Decline(Exception):
    """The fast parser is not sure: let typer parse this command line."""


class _Param:
    def __init__(self, name: str, info: Option | Argument, hint: Any):
        self.name, self.default = name, info.default
        self.multiple = False
        kind = hint
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"{name}: unsupported type {hint!r}")
            kind = args[0]
        if typing.get_origin(kind) is list:
            self.multiple, kind = True, typing.get_args(kind)[0]
        if kind not in (str, int, float, bool, Path):
            raise TypeError(f"{name}: unsupported type {hint!r}")
        self.kind = kind
        kw = info.kwargs
        self.count = bool(kw.get("count"))
        self.min, self.max = kw.get("min"), kw.get("max")
        self.is_flag = kind is bool and not self.multiple
        if self.is_flag and self.default is not False:
            raise TypeError(f"{name}: a flag must default to False")
        if self.count and (kind is not int or self.multiple):
            raise TypeError(f"{name}: count=True needs an int")
        if isinstance(info, Option):
            self.decls = info.param_decls
            for d in self.decls:
                if not re.fullmatch(r"-[A-Za-z]|--[a-z][a-z0-9-]*", d) or "/" in d:
                    raise TypeError(f"{name}: option name {d!r} not handled by the fast parser")
        elif not self.multiple:
            raise TypeError(f"{name}: only a variadic argument (List[...]) is handled")

    def convert(self, text: str) -> Any:
        if self.kind is str:
            return text
        if self.kind is Path:
            if not text:
                raise _Decline
            return Path(text)
        if self.kind is int:
            if not _INT.fullmatch(text):
                raise _Decline
            value = int(text)
        elif self.kind is float:
            if not _FLOAT.fullmatch(text):
                raise _Decline
            value = float(text)
        else:
            raise _Decline
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise _Decline  # typer says why, in its words
        return value


class FastParser:
    """Parses a command's argv as typer would, or returns None when unsure (see the module doc)."""

    def __init__(self, fn: Callable):
        import inspect

        hints = typing.get_type_hints(fn)
        self.params: list[_Param] = []
        self.argument: _Param | None = None
        self.short: dict[str, _Param] = {}
        self.long: dict[str, _Param] = {}
        for p in inspect.signature(fn).parameters.values():
            if not isinstance(p.default, (Option, Argument)):
                raise TypeError(f"{p.name}: not declared with Option/Argument")
            param = _Param(p.name, p.default, hints[p.name])
            self.params.append(param)
            if isinstance(p.default, Argument):
                if self.argument is not None:
                    raise TypeError("only one (variadic) argument is handled")
                self.argument = param
                continue
            for d in param.decls:
                table = self.short if len(d) == 2 else self.long
                if d in self.short or d in self.long or d == "--help":
                    raise TypeError(f"option name {d} used twice")
                table[d] = param

    def parse(self, argv: list[str]) -> dict[str, Any] | None:
        try:
            return self._parse(list(argv))
        except _Decline:
            return None

    def _parse(self, rargs: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        positional: list[str] = []

        def take(param: _Param, value: str | None) -> None:
            if param.count:
                values[param.name] = values.get(param.name, 0) + 1
            elif param.is_flag:
                values[param.name] = True
            elif param.multiple:
                values.setdefault(param.name, []).append(param.convert(value))
            else:
                values[param.name] = param.convert(value)  # the last one given wins, as in click

        def needs_value(param: _Param) -> bool:
            return not (param.count or param.is_flag)

        while rargs:
            arg = rargs.pop(0)
            if arg == "--":
                positional += rargs
                break
            if not arg.startswith("-") or len(arg) == 1:
                positional.append(arg)  # click allows arguments between options
                continue
            name, eq, explicit = arg.partition("=")
            if name in self.long or name in self.short and eq:
                # click tries every option token as a long option first ("-c=5" is then a short
                # option with the value "=5"): only the plain forms are taken here.
                if name in self.short:
                    raise _Decline
                param = self.long[name]
                if needs_value(param):
                    if eq:
                        value = explicit
                    elif rargs:
                        value = rargs.pop(0)
                    else:
                        raise _Decline  # "requires an argument": typer's message
                    take(param, value)
                elif eq:
                    raise _Decline  # a flag given a value
                else:
                    take(param, None)
                continue
            if arg.startswith("--"):
                raise _Decline  # unknown long option, --help
            # Short options, possibly bundled (-vv, -c5, -vc5).
            i = 1
            while i < len(arg):
                param = self.short.get("-" + arg[i])
                if param is None:
                    raise _Decline
                i += 1
                if needs_value(param):
                    if i < len(arg):
                        value, i = arg[i:], len(arg)
                    elif rargs:
                        value = rargs.pop(0)
                    else:
                        raise _Decline
                    take(param, value)
                else:
                    take(param, None)
        out: dict[str, Any] = {}
        for param in self.params:
            if param is self.argument:
                out[param.name] = [param.convert(a) for a in positional] if positional else param.default
                continue
            if param.name in values:
                out[param.name] = values[param.name]
            else:
                out[param.name] = list(param.default) if param.multiple else param.default
        if positional and self.argument is None:
            raise _Decline
        return out
