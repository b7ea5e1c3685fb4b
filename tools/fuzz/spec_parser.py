#!/usr/bin/env python3
"""Coverage-guided fuzzing of the trace-spec parser (vnet/dispatch/spec.py): any text
is a Spec (whose control packages can then be built) or a VnetError (SpecError names
file, line and field); anything else is a finding. Seeds: examples/*.toml.

    python tools/fuzz/spec_parser.py -max_total_time=180
"""

from __future__ import annotations

import atheris

from common import ROOT, run

with atheris.instrument_imports():
    from vnet.dispatch.spec import loads
    from vnet.errors import VnetError


def test_one(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # spec.load() refuses non-UTF-8 before parsing (tests/unit/test_spec.py)
    try:
        spec = loads(text, "fuzz.toml")
        spec.control_packages()
    except VnetError:
        return


if __name__ == "__main__":
    run(test_one, [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.toml"))], default_max_len=8192)
