#!/usr/bin/env python3
"""Regenerate vnet/binding/_libbpf_ffi.py, _pcap_ffi.py, _crypto_ffi.py and _deflate_ffi.py (cffi out-of-line ABI mode) from
vnet/binding/_cdef.py: run after editing the declarations, and commit the result (make ffi)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vnet.binding._ffi import main  # noqa: E402

main()
