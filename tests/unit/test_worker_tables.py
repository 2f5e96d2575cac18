"""What carries over in the worker and the supervisor's bookkeeping of it:
the worker's rate-limit token buckets (Policer), its per-rule carry-over of
counts across reconfigurations (_carried_rule) and lookup tables (_tables),
the restart backoff, and the wire identities of rules and outputs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from mcrd import fastpath
from mcrd.packet import ip_to_int
from mcrd.relaying import Output, Policer, Rule, carried_rule, tables
from mcrd.supervisor.workers import BACKOFF_MAX, Identities, backoff_delay
from mcrd.wire import OutputConfig, RuleConfig

# -- the policer -----------------------------------------------------------


def test_policer_allows_a_burst_of_a_tenth_of_a_second_of_packets() -> None:
    policer = Policer(100, None, now=50.0)
    allowed = [policer.allow(100, now=50.0) for _ in range(12)]
    assert allowed == [True] * 10 + [False] * 2


def test_policer_refills_with_time() -> None:
    policer = Policer(100, None, now=0.0)
    assert sum(policer.allow(100, now=0.0) for _ in range(20)) == 10  # the burst, spent
    # 50 ms at 100 pps: 5 more datagrams
    assert [policer.allow(100, now=0.05) for _ in range(6)] == [True] * 5 + [False]
    # never more than the burst, however long it was quiet
    assert sum(policer.allow(100, now=100.0) for _ in range(50)) == 10


def test_policer_burst_is_at_least_one_packet() -> None:
    policer = Policer(1, None, now=0.0)
    assert policer.allow(100, now=0.0)
    assert not policer.allow(100, now=0.0)
    assert not policer.allow(100, now=0.5)
    assert policer.allow(100, now=1.0)


def test_policer_limits_bits() -> None:
    # 8 Mbit/s: a burst of 800 kbit = 100 datagrams of 1000 bytes
    policer = Policer(None, 8_000_000, now=0.0)
    assert sum(policer.allow(1000, now=0.0) for _ in range(150)) == 100
    # 1 ms refills 8 kbit: one more 1000-byte datagram, not two
    assert [policer.allow(1000, now=0.001) for _ in range(2)] == [True, False]


def test_policer_bit_burst_holds_one_largest_datagram() -> None:
    policer = Policer(None, 1000, now=0.0)  # 100 bits of burst would pass nothing
    assert policer.allow(65535, now=0.0)
    assert not policer.allow(1, now=0.0)


def test_policer_refusing_on_bits_spends_no_packet_token() -> None:
    policer = Policer(10, 1000, now=0.0)  # 1 datagram, 524280 bits of burst
    assert not policer.allow(70_000, now=0.0)  # too many bits
    assert policer.allow(10, now=0.0)  # the packet token is still there
    assert not policer.allow(10, now=0.0)


# -- the restart backoff ---------------------------------------------------


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert backoff_delay(30) == 10.0 == BACKOFF_MAX
    assert backoff_delay(0) == 0.1
    delays = [backoff_delay(n) for n in range(1, 40)]
    assert delays == sorted(delays)
    assert max(delays) == 10.0


# -- wire identities -------------------------------------------------------


def test_identities_are_stable_and_new_things_get_new_ids() -> None:
    ids: Identities[str] = Identities()
    a, b = ids.of("a"), ids.of("b")
    assert a != b
    assert ids.of("a") == a
    assert ids.of("b") == b
    assert ids.things == {a: "a", b: "b"}


def test_identities_retain_forgets_and_never_reuses_an_id() -> None:
    ids: Identities[str] = Identities()
    a, b = ids.of("a"), ids.of("b")
    ids.retain({"b"})
    assert ids.things == {b: "b"}
    assert ids.of("b") == b
    # a counted reply for the old "a" must not be taken for the new one
    again = ids.of("a")
    assert again not in (a, b)
    assert ids.things == {b: "b", again: "a"}


# -- carry-over across reconfigurations ------------------------------------


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    """Descriptors as a configure message brings them (0: the packet socket)."""
    opened = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def out(ident: int, fd: int, generation: int = 1, group: str = "239.2.2.1") -> OutputConfig:
    return OutputConfig(ident, fd, group, 6000, generation, f"{group}:6000")


def spec(
    ident: int,
    outputs: tuple[OutputConfig, ...],
    group: str = "239.1.1.1",
    source: str | None = None,
    pps: int | None = None,
    bps: int | None = None,
) -> RuleConfig:
    return RuleConfig(ident, group, 5000, source, outputs, pps, bps)


def counted(rule: Rule) -> Rule:
    rule.packets, rule.octets, rule.limited = 10, 1000, 3
    for n, o in enumerate(rule.outputs, 1):
        o.packets, o.octets, o.errors, o.last_error = n, n * 100, n, f"error {n}"
    return rule


def test_new_rule_starts_from_zero(socks: list[socket.socket]) -> None:
    rule = carried_rule(spec(1, (out(7, 1),)), socks, None)
    assert (rule.ident, rule.packets, rule.octets, rule.limited) == (1, 0, 0, 0)
    assert rule.policer is None
    [o] = rule.outputs
    assert (o.ident, o.fd, o.packets, o.octets, o.errors) == (7, socks[1].fileno(), 0, 0, 0)


def test_rule_carries_its_counts_and_its_outputs(socks: list[socket.socket]) -> None:
    old = counted(carried_rule(spec(1, (out(7, 1), out(8, 2))), socks, None))
    # reconfigured: output 8 gone, output 9 new, output 7 now on another descriptor
    new = carried_rule(spec(1, (out(9, 1), out(7, 2))), socks, old)
    assert (new.packets, new.octets, new.limited) == (10, 1000, 3)
    fresh, kept = new.outputs
    assert (fresh.ident, fresh.packets, fresh.octets, fresh.errors, fresh.last_error) == (9, 0, 0, 0, "")
    assert (kept.ident, kept.packets, kept.octets, kept.errors, kept.last_error) == (7, 1, 100, 1, "error 1")
    assert kept.fd == socks[2].fileno()


def test_gso_limit_is_carried_only_on_the_same_socket(socks: list[socket.socket]) -> None:
    old = carried_rule(spec(1, (out(7, 1, generation=1), out(8, 2, generation=1))), socks, None)
    for o in old.outputs:
        o.gso_limit = 1400  # the kernel refused larger runs on this socket
    new = carried_rule(spec(1, (out(7, 1, generation=1), out(8, 2, generation=2))), socks, old)
    same, replaced = new.outputs
    assert same.gso_limit == 1400
    assert replaced.gso_limit == fastpath.GSO_MAX_BYTES


def test_policer_kept_while_the_limit_is_the_same(socks: list[socket.socket]) -> None:
    old = carried_rule(spec(1, (out(7, 1),), pps=100), socks, None)
    assert old.policer is not None
    same = carried_rule(spec(1, (out(7, 1),), pps=100), socks, old)
    assert same.policer is old.policer  # its tokens, already spent, stay spent
    changed = carried_rule(spec(1, (out(7, 1),), pps=200), socks, same)
    assert changed.policer is not None
    assert changed.policer is not old.policer
    assert (changed.policer.pps, changed.policer.bps) == (200, None)
    lifted = carried_rule(spec(1, (out(7, 1),)), socks, changed)
    assert lifted.policer is None


def test_tables_by_group_port_and_source(socks: list[socket.socket]) -> None:
    specs = (
        spec(1, (out(7, 1),), group="239.1.1.1"),  # plain: fast path
        spec(2, (out(7, 1),), group="239.1.1.2", pps=100),  # rate limited: not the fast path
        spec(3, (out(7, 1),), group="232.1.1.1", source="192.0.2.9"),
        spec(4, (out(7, 1),), group="232.1.1.1", source="192.0.2.10"),
        spec(5, (out(7, 1),), group="239.1.1.3"),  # a source-less rule beside a sourced one
        spec(6, (out(7, 1),), group="239.1.1.3", source="192.0.2.9"),
    )
    rules = [carried_rule(s, socks, None) for s in specs]
    table, fast = tables(specs, rules)
    by_id = {r.ident: r for r in rules}

    def key(group: str) -> int:
        return ip_to_int(group) << 16 | 5000

    assert table[key("239.1.1.1")] is by_id[1]
    assert table[key("239.1.1.2")] is by_id[2]
    assert table[key("232.1.1.1")] == {ip_to_int("192.0.2.9"): by_id[3], ip_to_int("192.0.2.10"): by_id[4]}
    assert table[key("239.1.1.3")] == {None: by_id[5], ip_to_int("192.0.2.9"): by_id[6]}
    assert len(table) == 4
    assert fast == {fastpath.native_key(ip_to_int("239.1.1.1"), 5000): by_id[1]}


def test_outputs_are_built_on_the_given_descriptors(socks: list[socket.socket]) -> None:
    o = Output(socks[2], out(7, 2, group="198.51.100.2"))
    assert o.fd == socks[2].fileno()
    assert o.counters() == {"output": 7, "packets": 0, "bytes": 0, "errors": 0, "last_error": ""}
