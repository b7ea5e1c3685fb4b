"""Where the precompiled CO-RE objects are: inside the installed package
(vnet/_bpf, put there by the wheel build) or, in a source checkout, bpf/build/."""

from __future__ import annotations

import os
from pathlib import Path

from vnet.errors import VnetError

_PACKAGED = Path(__file__).resolve().parent / "_bpf"
_CHECKOUT = Path(__file__).resolve().parent.parent / "bpf" / "build"


def object_path(name: str) -> Path:
    """Path of `<name>.bpf.o`; $VNET_BPF_DIR overrides the search."""
    dirs = [Path(os.environ["VNET_BPF_DIR"])] if os.environ.get("VNET_BPF_DIR") else [_PACKAGED, _CHECKOUT]
    for d in dirs:
        p = d / f"{name}.bpf.o"
        if p.is_file():
            return p
    raise VnetError(f"eBPF object {name}.bpf.o not found in {', '.join(map(str, dirs))}",
                    hint="reinstall vnet; in a source checkout run 'make bpf'")
