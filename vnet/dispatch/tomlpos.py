"""Where a value is defined in a TOML text: key path -> line number.

tomllib reports line numbers for syntax errors only; a spec checker wants them
for semantic errors too ("line 14: host[1].probes[2]: ..."). This is a small
scanner for text tomllib has already accepted, so it trusts the syntax and
only tracks positions: table headers, arrays of tables (`[[host]]`, counted
per parent), dotted keys, inline tables and arrays, on one line or many.

A path is a tuple of keys (str) and array indexes (int), as in the parsed
document: ("host", 1, "probes", 2).
"""

from __future__ import annotations

import tomllib

KeyPath = tuple[str | int, ...]

_PUNCT = "[]{}=,."
_NOT_BARE = set(_PUNCT) | set(" \t\r\n#\"'")


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, line): kind is a punctuation character, "\\n", "str" or "bare"."""
    out, i, line, n = [], 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            out.append(("\n", c, line))
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "\"'":
            delim = c * 3 if text.startswith(c * 3, i) else c
            j = i + len(delim)
            while j < n and not text.startswith(delim, j):
                j += 2 if c == '"' and text[j] == "\\" else 1  # literal strings have no escapes
            end = j + len(delim)
            extra = 0
            while len(delim) == 3 and end < n and text[end] == c and extra < 2:  # """a"""" ends in a quote
                end, extra = end + 1, extra + 1
            out.append(("str", text[i:end], line))
            line += text.count("\n", i, end)
            i = end
        elif c in _PUNCT:
            out.append((c, c, line))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _NOT_BARE:
                j += 1
            out.append(("bare", text[i:j], line))
            i = j
    return out


class Locator:
    """Lines of the tables, keys and array elements of one TOML text."""

    def __init__(self, text: str):
        self.lines: dict[KeyPath, int] = {}
        self._toks = _tokens(text)
        self._i = 0
        try:
            self._document()
        except IndexError:  # text tomllib did not accept: keep what was found
            pass

    def line(self, path: KeyPath) -> int | None:
        """The line defining `path`, or else its nearest enclosing table or key."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    # -- the scan --------------------------------------------------------------------------------

    def _peek(self) -> str:
        return self._toks[self._i][0] if self._i < len(self._toks) else ""

    def _take(self) -> tuple[str, str, int]:
        tok = self._toks[self._i]
        self._i += 1
        return tok

    def _skip_newlines(self) -> None:
        while self._peek() == "\n":
            self._i += 1

    def _note(self, path: KeyPath, line: int) -> None:
        self.lines.setdefault(path, line)  # a table is where it first appears

    def _key(self, end: str) -> tuple[list[str], int]:
        """A dotted key up to (and consuming) `end`; its parts and line."""
        parts, line = [], self._toks[self._i][2]
        while self._peek() != end:
            kind, text, _ = self._take()
            if kind == "str":
                parts.append(tomllib.loads(f"k = {text}")["k"])
            elif kind == "bare":
                parts.append(text)
        self._take()
        return parts, line

    def _document(self) -> None:
        table: KeyPath = ()
        current: dict[KeyPath, int] = {}  # array of tables -> index of its last element
        while self._i < len(self._toks):
            kind = self._peek()
            if kind == "\n":
                self._i += 1
            elif kind == "[":
                self._take()
                array = self._peek() == "["  # at the start of a line `[[` can only open an array of tables
                if array:
                    self._take()
                keys, line = self._key("]")
                if array:
                    self._take()
                path: KeyPath = ()
                for k in keys[:-1] if array else keys:
                    path += (k,)
                    if path in current:  # [host.filter] belongs to the last [[host]]
                        path += (current[path],)
                if array:
                    path += (keys[-1],)
                    current[path] = current.get(path, -1) + 1
                    self._note(path, line)
                    path += (current[path],)
                for n in range(1, len(path) + 1):
                    self._note(path[:n], line)
                table = path
            else:
                keys, line = self._key("=")
                path = table + tuple(keys)
                for n in range(len(table) + 1, len(path) + 1):  # a.b = 1 defines table a here too
                    self._note(path[:n], line)
                self._value(path)

    def _value(self, path: KeyPath) -> None:
        kind, _, line = self._take()
        if kind == "[":
            index = 0
            while True:
                self._skip_newlines()
                if self._peek() == "]":
                    self._take()
                    return
                self._note(path + (index,), self._toks[self._i][2])
                self._value(path + (index,))
                self._skip_newlines()
                if self._peek() == ",":
                    self._take()
                index += 1
        elif kind == "{":
            while self._peek() != "}":
                if self._peek() == ",":
                    self._take()
                    continue
                keys, line = self._key("=")
                sub = path + tuple(keys)
                for n in range(len(path) + 1, len(sub) + 1):
                    self._note(sub[:n], line)
                self._value(sub)
            self._take()
        else:
            # A scalar: a string, or bare words and dots (1.5, 1979-05-27 07:32:00, inf).
            while self._peek() not in (",", "]", "}", "\n", ""):
                self._take()
