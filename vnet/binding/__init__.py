"""cffi (ABI mode) binding to the system's libbpf.so.1: open, configure, load,
attach, read maps and ring buffers, test-run. No compiler needed at run time."""

from .btf import Btf, Field, StructLayout
from .libbpf import has, lib, version
from .object import (BpfObject, CreatedMap, FdLink, Link, LibbpfLink, Map, PinnedMap, Program, ProgramInfo,
                     TcFilterLink, TestRunResult, prog_test_run, program_info, remove_left_tc_filter, run_time_stats)
from .ringbuf import RingBuffer

__all__ = [
    "Btf", "Field", "StructLayout", "has", "lib", "version", "BpfObject", "CreatedMap", "FdLink", "Link", "LibbpfLink",
    "Map", "PinnedMap", "Program", "ProgramInfo", "TcFilterLink", "TestRunResult", "RingBuffer", "prog_test_run",
    "program_info", "remove_left_tc_filter", "run_time_stats",
]
