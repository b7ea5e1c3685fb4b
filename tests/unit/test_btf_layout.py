"""The event ABI is written once, in bpf/src/vnet_event.h; Python reads it from
the compiled object's BTF. Check that the two agree: the header parsed as text
against the BTF of bpf/build/tc_trace.bpf.o read through libbpf (no root needed,
nothing faked).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vnet.binding import BpfObject, Btf

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "src" / "vnet_event.h"
OBJECT = ROOT / "bpf" / "build" / "tc_trace.bpf.o"
C_SIZES = {"char": 1, "__u64": 8, "__u32": 4, "__u16": 2, "__u8": 1, "__s64": 8, "__s32": 4, "__s16": 2, "__s8": 1}
ENUMS = ("vnet_hook", "vnet_event_kind", "vnet_event_flag", "vnet_stat", "vnet_filter_on", "vnet_plain_test")
RECORDS = ("vnet_event", "vnet_event_more", "vnet_sched_event")  # every struct a ring record is


def _header_text() -> str:
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _body(kind: str, name: str) -> str:
    m = re.search(rf"\b{kind}\s+{name}\s*\{{(.*?)\}}\s*;", _header_text(), re.S)
    assert m, f"{kind} {name} not found in {HEADER}"
    return m.group(1)


def header_struct(name: str) -> list[tuple[str, str, int]]:
    """(field, C type, array length or 1) of `struct name`, in order; a nested
    struct member is flattened into its fields, as vnet's BTF reader does."""
    fields = []
    for decl in (d.strip() for d in _body("struct", name).split(";")):
        if not decl:
            continue
        nested = re.fullmatch(r"struct\s+(\w+)\s+\w+", decl)
        if nested:
            fields.extend(header_struct(nested.group(1)))
            continue
        m = re.fullmatch(r"(\w+)\s+(\w+)\s*(?:\[\s*(\d+)\s*\])?", decl)
        assert m, f"cannot parse declaration {decl!r} of struct {name} (extend this test's parser)"
        fields.append((m.group(2), m.group(1), int(m.group(3) or 1)))
    return fields


def header_enum(name: str) -> dict[str, int]:
    """Enumerators of `enum name`, with C's implicit +1 for those without a value."""
    values: dict[str, int] = {}
    nxt = 0
    for item in (i.strip() for i in _body("enum", name).split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\w+)(?:\s*=\s*(.+))?", item, re.S)
        assert m, f"cannot parse enumerator {item!r} of enum {name}"
        expr = m.group(2)
        if expr is None:
            value = nxt
        else:
            for known, v in values.items():  # C allows earlier enumerators in the value
                expr = re.sub(rf"\b{known}\b", str(v), expr)
            assert re.fullmatch(r"[0-9a-fA-FxXuUlL\s()<>|+\-*~&]+", expr), f"unsupported enum value {expr!r}"
            value = eval(re.sub(r"(?<=[0-9a-fA-F])[uUlL]+", "", expr), {"__builtins__": {}})  # arithmetic only
        values[m.group(1)] = value
        nxt = value + 1
    return values


@pytest.fixture(scope="module")
def btf():
    with Btf.from_file(str(OBJECT)) as b:
        yield b


def test_header_parser_sees_the_whole_struct():
    # Guards the regex itself: comments are gone and arrays are understood.
    fields = header_struct("vnet_event")
    names = [f[0] for f in fields]
    assert names[:5] == ["ts_ns", "probe_id", "kind", "cpu", "pkt_id"]
    assert ("saddr", "__u8", 16) in fields and ("daddr", "__u8", 16) in fields
    declared = _body("struct", "vnet_event").count(";") - 1 + _body("struct", "vnet_event_hdr").count(";")
    assert len(names) == len(set(names)) == declared
    more = header_struct("vnet_event_more")  # the event, nested, then its own fields
    assert more[:len(fields)] == fields and ("comm", "char", 16) in more[len(fields):]


@pytest.mark.parametrize("name", RECORDS)
def test_event_fields_in_btf_equal_the_header_in_order(btf, name):
    layout = btf.struct(name)
    assert layout.names == [field for field, _, _ in header_struct(name)]


@pytest.mark.parametrize("name", RECORDS)
def test_event_field_sizes_and_offsets_match_the_c_types(btf, name):
    layout = btf.struct(name)
    offset = 0
    for name, ctype, count in header_struct(name):
        elem = C_SIZES[ctype]
        field = layout.field(name)
        assert field.size == elem * count, f"{name}: BTF size {field.size}, header {ctype}[{count}]"
        offset = (offset + elem - 1) // elem * elem  # natural alignment, as the C compiler lays it out
        assert field.offset == offset, f"{name}: BTF offset {field.offset}, expected {offset}"
        offset += elem * count
    align = max(C_SIZES[t] for _, t, _ in header_struct(layout.name))
    assert layout.size == (offset + align - 1) // align * align


def test_every_record_fills_whole_cache_lines_with_its_ring_header(btf):
    """Records start on a 64-byte line only while every record before them is whole lines
    (the ring's 8-byte header included): a record across a line's middle makes the program
    touch a third line, which the reader's CPU may hold. The common packet record is two."""
    line, header = btf.enum("vnet_ring_line")["VNET_RING_LINE"], 8
    sizes = {name: btf.struct(name).size for name in RECORDS}
    sizes["vnet_snap_record"] = sizes["vnet_event_more"] + btf.enum("vnet_snap")["VNET_SNAP_MAX"]
    assert {name: (size + header) % line for name, size in sizes.items()} == dict.fromkeys(sizes, 0)
    assert sizes["vnet_event"] + header == 2 * line



# The parser's fields at the offsets (mod 8) the 6.1 verifier prunes well. It tracks the stack
# in 8-byte slots, and a field stored at a slot's start is tracked as a value rather than as
# unknown bytes, so paths that set it differently stop being merged: the same code with these
# fields 4 bytes earlier took tc_trace from 561k to 785k verified instructions on 6.1 (limit 1M,
# tests/vm/test_insn_budget_guest.py, which takes ~20 min; this fails in a second).
PRUNED_OFFSETS_MOD_8 = {"hook": 0, "flags": 4, "dport": 0, "vlan_tci": 4, "l4_proto": 6, "saddr": 4,
                        "daddr": 4}


def test_parser_fields_keep_the_offsets_the_6_1_verifier_prunes_well(btf):
    layout = btf.struct("vnet_event")
    got = {name: layout.field(name).offset % 8 for name in PRUNED_OFFSETS_MOD_8}
    assert got == PRUNED_OFFSETS_MOD_8, "moved: re-run tests/vm/test_insn_budget_guest.py, then update this"

@pytest.mark.parametrize("name", RECORDS)
def test_event_decoder_size_equals_btf_size(btf, name):
    layout = btf.struct(name)
    assert layout.codec().size == layout.size
    # A record of distinct bytes decodes field by field at the BTF offsets.
    raw = bytes(range(layout.size))
    decoded = layout.decode(raw)
    for f in layout.fields:
        chunk = raw[f.offset:f.offset + f.size]
        assert decoded[f.name] == (chunk if f.is_bytes else int.from_bytes(chunk, "little")), f.name
    # Encoding gives the bytes back, padding (holes and the tail) as zeros.
    covered = set().union(*(range(f.offset, f.offset + f.size) for f in layout.fields))
    assert layout.encode(decoded) == bytes(b if i in covered else 0 for i, b in enumerate(raw))


@pytest.mark.parametrize("name", ENUMS)
def test_enum_values_in_btf_equal_the_header(btf, name):
    expected = header_enum(name)
    assert expected, f"enum {name} is empty in the header"
    assert btf.enum(name) == expected


def test_flag_enum_is_single_bits(btf):
    flags = btf.enum("vnet_event_flag")
    assert all(v and v & (v - 1) == 0 for v in flags.values())
    assert len(set(flags.values())) == len(flags)


def test_stats_value_has_one_counter_per_stat(btf):
    stats = btf.struct("vnet_stats")
    (field,) = stats.fields
    assert field.count == btf.enum("vnet_stat")["VNET_STAT_MAX"] and field.size == 8 * field.count


def test_filter_modes_agree_with_the_objects(btf):
    """PacketFilter.config() writes f_on with these values."""
    from vnet.trace.filters import FILTER_ON, FILTER_ON_PCAP

    assert btf.enum("vnet_filter_on") == {"VNET_FILTER_ON": FILTER_ON, "VNET_FILTER_ON_PCAP": FILTER_ON_PCAP}


def test_the_plain_test_rules_agree_with_the_objects(btf):
    """vnet/tcpdump/prejudge.py derives port criteria for `port N` only where step 2a
    leaves SCTP packets alone; the session asks the object's BTF for this enum."""
    from vnet.trace.filters import PLAIN_SCTP_PORTS_LATER

    assert btf.enum("vnet_plain_test") == {"VNET_PLAIN_SCTP_PORTS_LATER": PLAIN_SCTP_PORTS_LATER}


def test_the_sets_step_2a_tests_have_the_slots_prejudge_fills(btf):
    """vnet/tcpdump/prejudge.py writes f_ports, f_l4_protos, f_hosts_v4, f_hosts_v6, f_not_ports and f_not_hosts_v4
    (the IPv4 ones with their _mask) with SET_SLOTS slots each."""
    from vnet.tcpdump.prejudge import SET_SLOTS

    flt = btf.struct("vnet_filter")
    assert flt.field("f_ports").count == SET_SLOTS and flt.field("f_ports").size == 2 * SET_SLOTS
    assert flt.field("f_l4_protos").size == SET_SLOTS and flt.field("f_l4_protos").is_bytes
    assert flt.field("f_hosts_v4").count == SET_SLOTS and flt.field("f_hosts_v4").size == 4 * SET_SLOTS
    six = flt.field("f_hosts_v6")  # 16 bytes an address, read as two 8-byte words
    assert six.size == 16 * SET_SLOTS and six.is_bytes and six.offset % 8 == 0
    assert flt.field("f_not_ports").count == SET_SLOTS and flt.field("f_not_ports").size == 2 * SET_SLOTS
    assert flt.field("f_not_hosts_v4").count == SET_SLOTS and flt.field("f_not_hosts_v4").size == 4 * SET_SLOTS
    for key in ("f_hosts_v4_mask", "f_not_hosts_v4_mask"):  # a mask per IPv4 slot: prefixes
        assert flt.field(key).count == SET_SLOTS and flt.field(key).size == 4 * SET_SLOTS


def test_probe_limit_agrees_with_the_objects(btf):
    """Trace refuses more plans than the per-probe counters have room for."""
    from vnet.trace.session import MAX_PROBES

    assert btf.enum("vnet_limit")["VNET_MAX_PROBES"] == MAX_PROBES
    agg = btf.enum("vnet_agg")
    assert MAX_PROBES * agg["VNET_AGG_HOOKS"] <= agg["VNET_AGG_POINTS"]  # every probe has its aggregation points


def test_aggregation_point_fields_agree_with_the_objects(btf):
    """Trace.aggregates() sums struct vnet_agg_point field by field into AggPoint."""
    from dataclasses import fields

    from vnet.trace.session import AggPoint

    layout = btf.struct("vnet_agg_point")
    assert [f.name for f in layout.fields] == [f.name for f in fields(AggPoint)]
    assert all(f.size == 8 and f.count == 1 for f in layout.fields)


def test_aggregation_table_sets_fit_the_point_bits(btf):
    """A packet's entry keeps its point in the low VNET_AGG_POINT_BITS of `when`."""
    agg = btf.enum("vnet_agg")
    assert agg["VNET_AGG_POINTS"] == 1 << agg["VNET_AGG_POINT_BITS"]
    assert agg["VNET_AGG_SETS"] & (agg["VNET_AGG_SETS"] - 1) == 0  # the set index is a mask of pkt_id's bits
    assert btf.struct("vnet_agg_set").size == 16 * agg["VNET_AGG_WAYS"]


def sample_value(f, n: int):
    """A distinct value that fits field f: bytes for byte arrays, a tuple for
    other arrays, else an int."""
    if f.is_bytes:
        return bytes((n + j) & 0xFF for j in range(f.size))
    if f.count > 1:
        elem = f.size // f.count
        return tuple((n + j) & ((1 << (8 * elem)) - 1) for j in range(f.count))
    return n & ((1 << (8 * f.size)) - 1)


def zero(f):
    return bytes(f.size) if f.is_bytes else (0,) * f.count if f.count > 1 else 0


def test_tc_cfg_round_trips_through_encode_decode(btf):
    offset, layout = btf.variable(".rodata", "tc_cfg")
    assert layout.name == "vnet_tc_config" and offset >= 0
    values = {f.name: sample_value(f, 0x01020304 + i) for i, f in enumerate(layout.fields)}
    data = layout.encode(values)
    assert len(data) == layout.size
    assert layout.decode(data) == values
    # Fields left out encode as zero; unknown names are refused, never dropped.
    first = layout.fields[0].name
    assert layout.decode(layout.encode({first: 5})) == {f.name: 5 if f.name == first else zero(f) for f in layout.fields}
    with pytest.raises(KeyError):
        layout.encode({"no_such_field": 1})


def test_tc_cfg_round_trips_through_an_opened_object():
    # Opening and configuring an object is ELF work in libbpf: no kernel, no root.
    with BpfObject(OBJECT) as obj:
        layout = obj.config_layout("tc_cfg")
        values = {f.name: sample_value(f, 1000 + i) for i, f in enumerate(layout.fields)}
        assert obj.config("tc_cfg") == {f.name: zero(f) for f in layout.fields}
        obj.set_config("tc_cfg", values)
        assert obj.config("tc_cfg") == values
        # The image libbpf will load holds the encoded bytes at the variable's BTF offset.
        offset, _ = obj.btf.variable(".rodata", "tc_cfg")
        image = bytes(obj.maps[next(n for n in obj.maps if n.endswith(".rodata"))].initial_value())
        assert image[offset:offset + layout.size] == layout.encode(values)


def test_wakeup_config_fields_are_in_every_program_config():
    """Trace sets wakeup_every and wakeup_bytes in every object's config struct."""
    from vnet.trace.session import wakeup_config

    config = wakeup_config(8 << 20)
    assert config == {"wakeup_every": 64, "wakeup_bytes": 2 << 20}  # a check every 64, forced past 1/4
    for obj, var in (("tc_trace", "tc_cfg"), ("skb_trace", "skb_cfg"), ("drop", "drop_cfg"), ("sched", "sched_cfg")):
        with Btf.from_file(str(OBJECT.with_name(f"{obj}.bpf.o"))) as b:
            _, layout = b.variable(".rodata", var)
            assert set(config) <= {f.name for f in layout.fields}, obj


def test_wakeup_threshold_must_fit_the_ring():
    from vnet.errors import UsageError
    from vnet.trace.session import wakeup_config

    assert wakeup_config(1 << 20, 1, 0) == {"wakeup_every": 1, "wakeup_bytes": 0}
    with pytest.raises(UsageError):
        wakeup_config(1 << 20, 64, (1 << 20) + 1)


def test_a_one_off_lookup_reuses_the_shared_kernel_btf_or_frees_its_own():
    """The running kernel's BTF (readable without privileges): vmlinux_for_a_lookup gives the
    process's shared parse where there is one, else a parse of its own, freed after."""
    import os

    from vnet.binding.btf import STRUCT, TYPEDEF, release_shared_vmlinux, shared_vmlinux, vmlinux_for_a_lookup

    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("no kernel BTF on this machine")
    release_shared_vmlinux()
    with vmlinux_for_a_lookup() as own:
        assert own.has("sk_buff", STRUCT) and own.has("btf_trace_netif_receive_skb", TYPEDEF)
    assert own._ptr is None  # freed: nothing parsed stays behind
    try:
        shared = shared_vmlinux()
        assert shared_vmlinux() is shared
        with vmlinux_for_a_lookup() as btf:
            assert btf is shared
        assert shared._ptr is not None  # still the process's
    finally:
        release_shared_vmlinux()
    assert shared._ptr is None
