"""The trace spec: one TOML file saying what every host of a distributed trace
runs, checked on the dispatcher machine and cut into per-host control packages.

    [trace]                      # name, duration/count, record, interval, snaplen, ring_size, rings, strict
    [collector]                  # address, key
    [filter]                     # every host's filter: the `vnet trace` filters and a tcpdump expression
    [[host]]                     # name, agent, interfaces, probes, direction, pids, min_runq, hypervisor
    [host.filter]                # this host's filter keys, replacing the global ones key by key

Everything is checked that does not depend on the machine the trace will run
on: probe names and globs against the catalog (not against this kernel: what
a host can run is its agent's business), interface names by syntax (not by
existence), filters by value. An error names the file, the line and the field:

    spec.toml:14: host[1].probes[2]: no probe matches 'ovz:*' (did you mean 'ovs:*'?)

Arrays count from 0, as in the parsed document and in JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import msgpack

from vnet.errors import UnsupportedError, UsageError
from vnet.probes import catalog
from vnet.probes.device import DIRECTIONS
from vnet.protocol import MAX_CONTROL_BYTES, parse_address
from vnet.trace.filters import PacketFilter, parse_sample
from vnet.trace.session import DEFAULT_RING_BYTES, SNAP_MAX, check_ring_size, ring_count

from .tomlpos import KeyPath, Locator

PACKAGE_VERSION = 1
RECORD_MODES = ("events", "aggregate", "both")

TOP_KEYS = ("trace", "collector", "filter", "host")
TRACE_KEYS = ("name", "duration", "count", "record", "interval", "snaplen", "ring_size", "rings", "strict")
COLLECTOR_KEYS = ("address", "key")
HOST_KEYS = ("name", "agent", "interfaces", "probes", "direction", "pids", "min_runq", "hypervisor", "filter")
# Spec key -> PacketFilter field. The keys are `vnet trace`'s filter options.
FILTER_KEYS = {"expression": "expression", "proto": "proto", "src": "src", "dst": "dst", "host": "host",
               "sport": "sport", "dport": "dport", "port": "port", "min_len": "len_min", "max_len": "len_max",
               "sample": "sample", "outer": "outer", "netns": "netns", "ifaces": "ifaces"}
FILTER_FIELDS = {field: key for key, field in FILTER_KEYS.items()}
# Where a key put in the wrong table belongs, for the error message.
_HOME = {**{k: "[trace]" for k in TRACE_KEYS}, **{k: "[filter] or [host.filter]" for k in FILTER_KEYS},
         **{k: "[[host]]" for k in HOST_KEYS}, "address": "[collector]", "key": "[collector]"}

IFNAMSIZ = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+)\s*([KMG]i?B?|B)?")
_SIZE_UNITS = {None: 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "KB": 10**3, "M": 1 << 20, "MiB": 1 << 20,
               "MB": 10**6, "G": 1 << 30, "GiB": 1 << 30, "GB": 10**9}


class SpecError(UsageError):
    """A spec that cannot run: `source:line: field: message`."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str,
                 *, hint: str | None = None):
        self.source, self.line, self.field, self.reason = source, line, field, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}", hint=hint)


@dataclass(frozen=True)
class Collector:
    address: str              # HOST:PORT, [IPV6]:PORT or unix:/PATH, as agents reach it
    key: str | None = None    # pre-shared key file on the dispatcher; never put in a control package


@dataclass(frozen=True)
class HostSpec:
    name: str
    agent: str                       # the agent's address
    interfaces: tuple[str, ...]      # IFACE or NETNS/IFACE
    directions: tuple[str, ...]      # of the interfaces' TC hooks
    probes: tuple[str, ...]          # as written: names, globs, dev: patterns, PROBE@HOOK
    run_probes: tuple[str, ...]      # catalog globs expanded to names; dev: patterns left to the agent
    pids: tuple[int, ...]            # processes whose threads sched:* probes watch
    min_runq_ns: int                 # sched:runq reports waits at least this long
    filter: PacketFilter             # [filter] with [host.filter] over it
    line: int | None = None          # of its [[host]] header
    hypervisor: str | None = None    # a VM guest: the host (of this spec) whose threads run it


@dataclass(frozen=True)
class Spec:
    source: str
    name: str
    record: str                      # events | aggregate | both
    duration_s: float | None         # None and count None: until stopped
    count: int | None                # events, summed over hosts
    interval_s: float | None         # aggregate numbers reported this often (None: at the end)
    snaplen: int                     # packet bytes kept per event (0: none, headers are decoded)
    ring_bytes: int
    rings: int | None                # event rings the CPUs write to (None: the agent's default, one per CPU)
    strict: bool                     # a probe a host cannot run fails the trace instead of being skipped
    collector: Collector
    hosts: tuple[HostSpec, ...]

    def control_package(self, host: HostSpec) -> dict[str, Any]:
        """What `host`'s agent needs to run its part: plain msgpack-able values only."""
        return {"version": PACKAGE_VERSION, "trace": self.name, "host": host.name,
                "interfaces": list(host.interfaces), "directions": list(host.directions),
                "probes": list(host.run_probes), "pids": list(host.pids), "min_runq_ns": host.min_runq_ns,
                "filter": filter_fields(host.filter), "record": self.record, "duration_s": self.duration_s,
                "count": self.count, "interval_s": self.interval_s, "snaplen": self.snaplen,
                "ring_bytes": self.ring_bytes, "rings": self.rings, "strict": self.strict, "hypervisor": host.hypervisor,
                "collector": {"address": self.collector.address}}

    def control_packages(self) -> dict[str, dict[str, Any]]:
        return {h.name: self.control_package(h) for h in self.hosts}


def filter_fields(pf: PacketFilter) -> dict[str, Any]:
    """The PacketFilter fields that are set, as plain values."""
    out = {}
    for f in dataclasses.fields(pf):
        value = getattr(pf, f.name)
        if value is not None:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def control_package_to_filter(pkg: dict[str, Any]) -> PacketFilter:
    """The agent's side of `filter_fields`: the package's filter as a PacketFilter."""
    if pkg.get("version") != PACKAGE_VERSION:
        raise UsageError(f"control package version {pkg.get('version')!r} (this vnet reads {PACKAGE_VERSION})")
    fields = dict(pkg.get("filter") or {})
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(PacketFilter)})
    if unknown:
        raise UsageError(f"control package: unknown filter fields {', '.join(unknown)}")
    if fields.get("ifaces") is not None:
        fields["ifaces"] = tuple(fields["ifaces"])
    return PacketFilter(**fields)


def load(path: str | Path) -> Spec:
    try:
        text = Path(path).read_bytes().decode()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return loads(text, str(path))


def loads(text: str, source: str = "<string>") -> Spec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise SpecError(source, int(m.group(1)) if m else None, None, f"invalid TOML: {e}") from None
    return _Checker(text, source).spec(doc)


# -- values ----------------------------------------------------------------------------------------

def parse_duration(value: str | int | float) -> float:
    """Seconds from a number or "30s", "2m", "500ms", "1m30s", "1.5h" (ValueError otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d*)?|\.\d+", text):
        return float(text)
    total, pos = 0.0, 0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError(text)
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError(text)
    return total


def parse_size(value: str | int) -> int:
    """Bytes from a number or "8MiB", "64KiB", "1G" (binary), "1MB" (decimal) (ValueError otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.fullmatch(str(value).strip())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(value)
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def field_name(path: KeyPath) -> str:
    """("host", 1, "probes", 2) -> "host[1].probes[2]"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _toml_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                       (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return "a date/time"


def _show(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML writes it
    return text if len(text) <= 40 else text[:37] + "..."


def _name_problem(name: str, what: str) -> str | None:
    """Why `name` cannot be a Linux interface (dev_valid_name) or `ip netns` name; None if it can."""
    if not name:
        return f"empty {what} name"
    if what == "interface" and len(name) >= IFNAMSIZ:
        return f"interface name {name!r} is longer than {IFNAMSIZ - 1} characters"
    if name in (".", "..") or any(c == "/" or c.isspace() or c == "\0" or (what == "interface" and c == ":")
                                  for c in name):
        return f"{name!r} is not a valid {what} name"
    return None


def _iface_problem(spec: str) -> str | None:
    """IFACE or NETNS/IFACE."""
    ns, sep, name = spec.rpartition("/")
    return (_name_problem(ns, "network namespace") if sep else None) or _name_problem(name, "interface")


# -- the checker -----------------------------------------------------------------------------------

_MISSING = object()


class _Checker:
    """Walks the parsed document; the first problem becomes a SpecError at its line."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.where = Locator(text)

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        raise SpecError(self.source, self.where.line(path) if path else None, field_name(path) or None, message)

    def known(self, table: dict, path: KeyPath, allowed) -> None:
        """Unknown keys are errors: a typo must not silently mean 'default'."""
        for key in table:
            if key in allowed:
                continue
            near = difflib.get_close_matches(key, allowed, n=1)
            why = (f"did you mean {near[0]!r}?" if near else f"it belongs in {_HOME[key]}" if key in _HOME
                   else f"known: {', '.join(allowed)}")
            self.fail(path + (key,), f"unknown key {key!r} ({why})")

    def want(self, value: Any, path: KeyPath, *kinds: type) -> Any:
        """`value` if it is one of the TOML types `kinds` (int is not float, bool is not int)."""
        def fits(kind):
            if kind is float:
                return isinstance(value, (int, float)) and not isinstance(value, bool)
            return isinstance(value, kind) and not (kind is int and isinstance(value, bool))

        if not any(fits(k) for k in kinds):
            names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                     list: "an array", dict: "a table"}
            self.fail(path, f"expected {' or '.join(names[k] for k in kinds)}, "
                            f"got {_toml_type(value)} ({_show(value)})")
        return value

    def get(self, table: dict, path: KeyPath, key: str, *kinds: type, default: Any = _MISSING,
            required: str = "") -> Any:
        if key not in table:
            if default is _MISSING:
                self.fail(path + (key,), f"missing ({required})" if required else "missing")
            return default
        return self.want(table[key], path + (key,), *kinds)

    def strings(self, table: dict, path: KeyPath, key: str) -> list[str]:
        """An array of strings, each listed once."""
        items = self.get(table, path, key, list, default=[])
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            self.want(item, path + (key, i), str)
            if item in seen:
                self.fail(path + (key, i), f"{item!r} is listed twice (also {key}[{seen[item]}])")
            seen[item] = i
        return items

    def duration(self, value: Any, path: KeyPath, allow_zero: bool = False) -> float:
        self.want(value, path, str, float)
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.fail(path, f"{_show(value)} is not a duration (use e.g. 30s, 2m, 500ms, 1h30m or seconds "
                            "as a number)")
        if not math.isfinite(seconds):
            self.fail(path, f"{_show(value)}: the duration must be finite")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            self.fail(path, f"{_show(value)}: the duration must be {'at least' if allow_zero else 'more than'} 0")
        return seconds

    def address(self, value: str, path: KeyPath) -> tuple:
        """HOST:PORT, [IPV6]:PORT or unix:/PATH (vnet.protocol's syntax), with a host that can exist."""
        port = value.rpartition(":")[2]
        if not value.startswith("unix:") and port.isdigit() and not 1 <= int(port) <= 65535:
            self.fail(path, f"address {value!r}: port {port} is not 1-65535")
        try:
            family, sockaddr = parse_address(value)
        except UsageError as e:
            self.fail(path, e.message)
        if isinstance(sockaddr, tuple):
            host = value.rpartition(":")[0]
            bare = host.strip("[]")
            if ":" in host and not host.startswith("["):
                self.fail(path, f"address {value!r}: put an IPv6 address in brackets ([{host}]:PORT)")
            try:
                ipaddress.ip_address(bare)
            except ValueError:
                if bare and (host.startswith("[") or not _HOSTNAME.fullmatch(bare)):
                    self.fail(path, f"address {value!r}: {bare!r} is not an IP address or host name")
        return family, sockaddr

    # -- sections ----------------------------------------------------------------------------------

    def spec(self, doc: dict) -> Spec:
        self.known(doc, (), TOP_KEYS)
        trace = self.get(doc, (), "trace", dict, default={})
        self.known(trace, ("trace",), TRACE_KEYS)
        at = ("trace",)
        name = self.get(trace, at, "name", str, default=None)
        if name is None:
            stem = "" if self.source.startswith("<") else Path(self.source).stem  # "<string>": no file
            name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip("._-")[:64] or "trace"
        elif not _NAME.fullmatch(name):
            self.fail(at + ("name",), f"{name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
        duration = trace.get("duration")
        duration_s = None if duration is None else self.duration(duration, at + ("duration",))
        count = self.get(trace, at, "count", int, default=None)
        if count is not None and count < 1:
            self.fail(at + ("count",), f"{count}: the event count must be at least 1")
        record = self.get(trace, at, "record", str, default="events")
        if record not in RECORD_MODES:
            self.fail(at + ("record",), f"{record!r} is not a record mode (use {', '.join(RECORD_MODES)})")
        if record == "aggregate" and count is not None:
            self.fail(at + ("count",), "record = 'aggregate' makes numbers, not events: stop it with a duration, "
                                       "or record 'both'")
        interval = trace.get("interval")
        if interval is not None and record == "events":
            self.fail(at + ("interval",), "the interval is for aggregate numbers: record 'aggregate' or 'both'")
        interval_s = None if interval is None else self.duration(interval, at + ("interval",))
        snaplen = self.get(trace, at, "snaplen", int, default=0)
        if snaplen != 0 and not 64 <= snaplen <= SNAP_MAX:
            self.fail(at + ("snaplen",), f"{snaplen}: use 0 (no packet bytes) or 64 to {SNAP_MAX} (packet bytes an "
                                         "event can carry)")
        ring_bytes = DEFAULT_RING_BYTES
        if "ring_size" in trace:
            self.want(trace["ring_size"], at + ("ring_size",), str, int)
            try:
                ring_bytes = check_ring_size(parse_size(trace["ring_size"]))
            except ValueError:
                self.fail(at + ("ring_size",), f"{_show(trace['ring_size'])} is not a size (use e.g. 8MiB, "
                                               "512KiB or bytes as a number)")
            except UsageError as e:
                self.fail(at + ("ring_size",), e.message)
        rings = self.get(trace, at, "rings", int, default=None)
        if rings is not None:
            try:
                ring_count(rings)
            except UsageError as e:
                self.fail(at + ("rings",), e.message)
        strict = self.get(trace, at, "strict", bool, default=False)

        collector = self.collector(self.get(doc, (), "collector", dict,
                                            required="a [collector] table with the address agents send to"))
        base_filter = self.filter(self.get(doc, (), "filter", dict, default={}), ("filter",))
        if isinstance(doc.get("host"), dict):
            self.fail(("host",), "write [[host]] (an array of tables, one per host), not [host]")
        hosts = self.get(doc, (), "host", list, required="one [[host]] table per host")
        if not hosts:
            self.fail(("host",), "no hosts (add a [[host]] table per host)")
        checked: list[HostSpec] = []
        for i, table in enumerate(hosts):
            if not isinstance(table, dict):
                self.fail(("host", i), f"expected a table, got {_toml_type(table)} (write one [[host]] per host)")
            checked.append(self.host(table, ("host", i), base_filter, checked))
        names = {h.name for h in checked}
        for i, h in enumerate(checked):
            if h.hypervisor is not None and (h.hypervisor not in names or h.hypervisor == h.name):
                self.fail(("host", i, "hypervisor"), f"{h.hypervisor!r} is not another host of this spec "
                          f"(the host whose threads run this guest: {', '.join(sorted(names - {h.name})) or 'none'})")
        spec = Spec(self.source, name, record, duration_s, count, interval_s, snaplen, ring_bytes, rings, strict,
                    collector, tuple(checked))
        for i, host in enumerate(spec.hosts):
            size = len(msgpack.packb(spec.control_package(host)))
            if size > MAX_CONTROL_BYTES:
                self.fail(("host", i), f"its control package is {size} bytes (the protocol takes at most "
                                       f"{MAX_CONTROL_BYTES})")
        return spec

    def collector(self, table: dict) -> Collector:
        at = ("collector",)
        self.known(table, at, COLLECTOR_KEYS)
        address = self.get(table, at, "address", str, required="where agents send, HOST:PORT or unix:/PATH")
        self.address(address, at + ("address",))
        key = self.get(table, at, "key", str, default=None)
        if key is not None and not key.strip():
            self.fail(at + ("key",), "empty key file name")
        return Collector(address, key)

    def filter(self, table: dict, path: KeyPath) -> dict[str, Any]:
        """PacketFilter field -> value, each checked as far as it does not depend on the machine."""
        self.known(table, path, FILTER_KEYS)
        out: dict[str, Any] = {}
        for key, value in table.items():
            at, field = path + (key,), FILTER_KEYS[key]
            if key == "expression":
                self.want(value, at, str)
                if not value.strip():
                    self.fail(at, "empty expression")
                self.expression(value, at)
            elif key in ("proto", "sample"):
                value = str(self.want(value, at, str, int))  # proto = 17, sample = 10 read as "17", "10"
            elif key in ("src", "dst", "host"):
                self.want(value, at, str)
            elif key in ("sport", "dport", "port"):
                self.want(value, at, int)
            elif key in ("min_len", "max_len"):
                least = 0 if key == "min_len" else 1
                if self.want(value, at, int) < least:
                    self.fail(at, f"{value}: must be at least {least}")
            elif key == "outer":
                self.want(value, at, bool)
            elif key == "netns":
                problem = _name_problem(self.want(value, at, str), "network namespace")
                if problem:
                    self.fail(at, problem)
            elif key == "ifaces":
                names = self.strings(table, path, key)
                if not 1 <= len(names) <= 4:
                    self.fail(at, f"give 1 to 4 interfaces, not {len(names)}")
                for i, name in enumerate(names):
                    problem = _name_problem(name, "interface")
                    if problem:
                        self.fail(at + (i,), f"{problem} (the namespace is the filter's netns)")
                value = tuple(names)
            if field in ("proto", "src", "dst", "host", "sport", "dport", "port"):
                try:
                    PacketFilter(**{field: value}).config()  # the CLI's own checks, one field at a time
                except UsageError as e:
                    self.fail(at, re.sub(r"^--[\w-]+ ", "", e.message))
            elif field == "sample":
                try:
                    parse_sample(value)
                except UsageError as e:
                    self.fail(at, re.sub(r"^--[\w-]+ ", "", e.message))
            out[field] = value
        return out

    def expression(self, text: str, path: KeyPath) -> None:
        """Compiled by this machine's libpcap, as each agent's will."""
        from vnet.binding.pcap import CompileError

        try:
            PacketFilter(expression=text).compiled  # noqa: B018
        except CompileError as e:
            self.fail(path, f"libpcap: {e.reason}")
        except UnsupportedError as e:  # no libpcap here: not a fault of the spec, keep its exit code
            raise UnsupportedError(f"{self.source}:{self.where.line(path)}: {field_name(path)}: {e.message}",
                                   hint=e.hint) from None

    def host(self, table: dict, path: KeyPath, base_filter: dict[str, Any], before: list[HostSpec]) -> HostSpec:
        self.known(table, path, HOST_KEYS)
        name = self.get(table, path, "name", str, required="the host's name in the trace")
        if not _NAME.fullmatch(name):
            self.fail(path + ("name",), f"{name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
        agent = self.get(table, path, "agent", str, required="the agent's address, HOST:PORT or unix:/PATH")
        endpoint = self.address(agent, path + ("agent",))
        for i, other in enumerate(before):
            if other.name == name:
                self.fail(path + ("name",), f"host name {name!r} is also host[{i}]'s (line {other.line})")
            if parse_address(other.agent) == endpoint:
                self.fail(path + ("agent",), f"agent {agent!r} is also host[{i}]'s ({other.name})")

        interfaces = self.strings(table, path, "interfaces")
        for i, spec in enumerate(interfaces):
            problem = _iface_problem(spec)
            if problem:
                self.fail(path + ("interfaces", i), f"{problem} (use IFACE or NETNS/IFACE)")
        direction = self.get(table, path, "direction", str, default="both")
        if direction not in ("both",) + DIRECTIONS:
            self.fail(path + ("direction",), f"{direction!r}: use ingress, egress or both")
        probes = self.strings(table, path, "probes")
        run: list[str] = []
        for i, pattern in enumerate(probes):
            run += [p for p in self.probe(pattern, path + ("probes", i)) if p not in run]
        if not interfaces and not probes:
            self.fail(path, "nothing to trace: give interfaces or probes")

        sched = any(catalog.BY_NAME[p.partition("@")[0]].yields == "sched" for p in run if not p.startswith("dev:"))
        pids = self.get(table, path, "pids", list, default=[])
        for i, pid in enumerate(pids):
            if not 1 <= self.want(pid, path + ("pids", i), int) < catalog.PID_LIMIT:
                self.fail(path + ("pids", i), f"{pid} is not a process id")
        min_runq = table.get("min_runq")
        min_runq_ns = 0 if min_runq is None else round(self.duration(min_runq, path + ("min_runq",), True) * 1e9)
        for key in ("pids", "min_runq"):
            if key in table and not sched:
                self.fail(path + (key,), "only sched:* probes use it, and this host's probes have none")

        hypervisor = self.get(table, path, "hypervisor", str, default=None)
        own = self.filter(self.get(table, path, "filter", dict, default={}), path + ("filter",))
        return HostSpec(name, agent, tuple(interfaces), DIRECTIONS if direction == "both" else (direction,),
                        tuple(probes), tuple(run), tuple(pids), min_runq_ns,
                        self.merged_filter(base_filter, own, path), self.where.line(path), hypervisor)

    def probe(self, pattern: str, path: KeyPath) -> list[str]:
        """The catalog names `pattern` stands for (PROBE@HOOK kept); a dev: pattern stands for itself."""
        if pattern.startswith("dev:"):
            iface, _, direction = pattern.removeprefix("dev:").partition(":")
            ns, sep, name = iface.rpartition("/")
            problem = ((_name_problem(ns, "network namespace") if sep else None)
                       or (_name_problem(name, "interface") if not set("*?[") & set(name) else None)
                       or (f"{name!r} is not a valid interface name glob" if not name or ":" in name
                           or any(c.isspace() for c in name) else None))
            if problem:
                self.fail(path, f"{problem} (use dev:IFACE:DIRECTION, IFACE may be NETNS/IFACE and a glob)")
            if not [d for d in DIRECTIONS if fnmatch.fnmatchcase(d, direction or "*")]:
                self.fail(path, f"bad direction in {pattern!r} (use ingress, egress or *)")
            return [pattern]
        glob, _, force = pattern.partition("@")
        specs, unmatched = catalog.match([glob])
        if unmatched:
            self.fail(path, f"no probe matches {glob!r} ({_probe_suggestion(glob)})")
        for spec in specs:
            kinds = [h.kind for h in spec.hooks]
            if force and force not in kinds:
                self.fail(path, f"probe {spec.name} has no {force} hook (it has: {', '.join(kinds)})")
        return [spec.name + (f"@{force}" if force else "") for spec in specs]

    def merged_filter(self, base: dict[str, Any], own: dict[str, Any], path: KeyPath) -> PacketFilter:
        """[host.filter] over [filter], key by key; then the checks that take two fields."""
        fields = {**base, **own}

        def origin(field: str) -> KeyPath:
            return (path + ("filter",) if field in own else ("filter",)) + (FILTER_FIELDS[field],)

        if fields.get("len_min") is not None and fields.get("len_max") is not None:
            if fields["len_max"] < fields["len_min"]:
                self.fail(origin("len_max"), f"{fields['len_max']} is below min_len ({fields['len_min']})")
        pf = PacketFilter(**fields)
        try:
            # The expression is compiled already; netns and ifaces are resolved on the host.
            dataclasses.replace(pf, expression=None, netns=None, ifaces=None).config()
        except UsageError as e:
            self.fail(path + ("filter",) if own else ("filter",), e.message)
        return pf


def _probe_suggestion(glob: str) -> str:
    if set("*?[") & set(glob):
        group, sep, rest = glob.partition(":")
        near = difflib.get_close_matches(group, sorted({p.group for p in catalog.CATALOG}), n=1)
        if sep and near:
            return f"did you mean {near[0] + ':' + rest!r}?"
    else:
        near = difflib.get_close_matches(glob, list(catalog.BY_NAME), n=1)
        if near:
            return f"did you mean {near[0]!r}?"
    return "list them with 'vnet probes'"
