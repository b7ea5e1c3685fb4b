"""`vnet analyze --round-trip` on a conversation recorded for real: `vnet trace -w`
at both ends of a veth pair, both directions, while a UDP echo server in the second
namespace answers requests sent one at a time from the first. Every request must
pair with its own reply: the round trip's path is the request's hops then the
reply's, and the far end's turnaround (the echo server's) is a segment of its own.
Also the command-line errors of --round-trip and --ignore-hop, and --ignore-hop
leaving a real hop out of the round trips."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest

from kernel_support import VnetProcess, veth_pair
from vnet.errors import UsageError
from vnet.topology import in_netns

PORT = 5413
SENT = 30


@contextlib.contextmanager
def udp_echo(ns: str, ip: str, port: int):
    """A thread answering each datagram to ip:port (in netns ns) with the same bytes."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, port))
    sock.settimeout(0.1)  # how often the thread checks for stop
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            sock.sendto(data, peer)

    thread = threading.Thread(target=serve, name=f"udp-echo-{port}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


def ask(ns: str, dst: str, port: int, count: int) -> None:
    """`count` requests from one socket in netns ns, each sent after the previous one's answer."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(5)
        for i in range(count):
            body = b"vnet-rt-%06d" % i
            sock.sendto(body, (dst, port))
            assert sock.recvfrom(2048)[0] == body


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """The trace file and the four hop names: request out of ns1, into ns2; reply out of ns2, into ns1."""
    out = tmp_path_factory.mktemp("round_trip") / "rt.vnt"
    with veth_pair(74) as net, udp_echo(net.ns2, net.ip2, PORT):
        with VnetProcess("trace", "-i", net.spec1, "-i", net.spec2, "--count", str(4 * SENT), "--duration", "15",
                         "-w", str(out), f"udp and port {PORT}") as rec:
            rec.wait_started()
            ask(net.ns1, net.ip2, PORT, SENT)
            assert rec.wait(20) == 0, rec.stderr
        hops = (f"{net.ns1}/{net.if1}:egress", f"{net.ns2}/{net.if2}:ingress",
                f"{net.ns2}/{net.if2}:egress", f"{net.ns1}/{net.if1}:ingress")
    return out, hops


def analyze(*args: str) -> VnetProcess:
    with VnetProcess("analyze", *args) as a:
        a.wait(60)
    return a


def report(*args: str) -> dict:
    a = analyze(*args, "--json")
    assert a.proc.returncode == 0, a.stderr
    return json.loads("\n".join(a.stdout))


def test_every_request_pairs_with_its_reply_and_the_turnaround_is_a_segment(recording):
    out, (q_out, q_in, r_out, r_in) = recording
    r = report(str(out), "--proto", "udp", "--dport", str(PORT), "--round-trip")
    assert r["round_trip"] == {"requests": SENT, "replies": SENT, "pairs": SENT, "unanswered_requests": 0,
                               "unpaired_replies": 0, "vanished_requests": 0}
    assert r["verdict"].startswith(f"{SENT} round trips paired from {SENT} requests and {SENT} replies "
                                   f"(in order). On the most common path")
    assert r["packets"] == SENT and r["events"] == 4 * SENT
    assert r["hosts"][0]["packet_events"] == 4 * SENT  # the replies' events are read too
    # the request's hops, then the reply's: one path, every round trip on it
    assert [(p["hops"], p["count"]) for p in r["paths"]] == [([q_out, q_in, r_out, r_in], SENT)]
    segments = {(s["from"], s["to"]): s for s in r["segments"]}
    assert set(segments) == {(q_out, q_in), (q_in, r_out), (r_out, r_in)}
    turnaround = segments[(q_in, r_out)]  # the echo server: the request's last hop to the reply's first
    assert turnaround["count"] == SENT
    assert 0 < turnaround["min_ns"] <= turnaround["p50_ns"] <= turnaround["max_ns"] < 1_000_000_000, turnaround
    for s in segments.values():
        assert s["count"] == SENT and s["min_ns"] > 0, s
    # a socket's answer takes longer than a veth crossing: the turnaround dominates the round trip
    assert turnaround["p50_ns"] > segments[(q_out, q_in)]["p50_ns"]


def test_ignore_hop_leaves_a_real_hop_out_of_the_round_trips(recording):
    out, (q_out, q_in, r_out, r_in) = recording
    r = report(str(out), "--proto", "udp", "--dport", str(PORT), "--round-trip", "--ignore-hop", r_out)
    assert r["round_trip"]["pairs"] == SENT and r["round_trip"]["unpaired_replies"] == 0
    assert [(p["hops"], p["count"]) for p in r["paths"]] == [([q_out, q_in, r_in], SENT)]
    assert r_out not in json.dumps(r["segments"]) and r["events"] == 3 * SENT
    # "HOP (reply)", as the report would name a hop both directions cross: the replies' only
    r = report(str(out), "--proto", "udp", "--dport", str(PORT), "--round-trip", "--ignore-hop", f"{r_in} (reply)")
    assert [(p["hops"], p["count"]) for p in r["paths"]] == [([q_out, q_in, r_out], SENT)]
    # without --round-trip too: the requests alone, without their last hop
    r = report(str(out), "--proto", "udp", "--dport", str(PORT), "--ignore-hop", q_in)
    assert [(p["hops"], p["count"]) for p in r["paths"]] == []  # a one-hop path has nothing to measure
    assert r["packets"] == SENT and r["events"] == SENT


@pytest.mark.parametrize("args,words", [
    (("--round-trip",), "--round-trip needs the requests' flow"),
    (("--round-trip", "--proto", "udp"), "--round-trip needs the requests' flow"),
    (("--round-trip", "--dport", str(PORT)), "--round-trip needs the requests' flow"),
    (("--proto", "udp", "--dport", str(PORT), "--round-trip", "--ignore-hop", "nosuch"),
     "--ignore-hop 'nosuch': no such hop in these files"),
    (("--ignore-hop", "nosuch"), "--ignore-hop 'nosuch': no such hop in these files"),
])
def test_usage_errors_are_one_line_and_their_exit_code(recording, args, words):
    out, hops = recording
    a = analyze(str(out), *args)
    assert a.proc.returncode == UsageError.exit_code == 2, (a.stdout, a.stderr)
    assert len(a.stderr) == 1 and a.stderr[0].startswith(f"vnet: error: {words}"), a.stderr
    assert a.stdout == []
    if "nosuch" in words:
        assert all(h in a.stderr[0] for h in hops), a.stderr  # the hops there are, to pick from
