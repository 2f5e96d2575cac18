"""Kernel offload planning and rendering, without sockets or nft."""

from __future__ import annotations

from mcrd.offload import Egress, Port, egress_for, multicast_mac, parse_counters, plan
from mcrd.rules import Destination, RuleSpec

IN0 = Port(2, "in0", True, True, "02:00:00:00:00:01", 1500)
OUT0 = Port(3, "out0", True, True, "02:00:00:00:00:02", 1500)
OUT1 = Port(4, "out1", True, True, "02:00:00:00:00:03", 9000)
TUN = Port(5, "tun0", True, False, "", 1400)
PORTS = {p.name: p for p in (IN0, OUT0, OUT1, TUN)}
ADDRS = {3: ["198.51.100.1"], 4: ["203.0.113.1"]}


def spec(**kw: object) -> RuleSpec:
    data: dict[str, object] = {
        "input": {"interface": "in0", "group": "239.1.1.1", "port": 5000},
        "outputs": [{"interface": "out0", "group": "239.2.2.2", "port": 6000}],
    }
    data.update(kw)
    return RuleSpec.model_validate(data)


def on(group: str, *outputs: dict[str, object], interface: str = "in0") -> RuleSpec:
    return spec(input={"interface": interface, "group": group, "port": 5000}, outputs=list(outputs))


def egress(
    *specs: RuleSpec, neighbours: dict[tuple[int, str], str] | None = None
) -> dict[Destination, Egress]:
    routes = {"198.51.100.2": ("198.51.100.1", "198.51.100.2")}
    return {
        d: egress_for(d, PORTS, ADDRS, routes.get(d.group), neighbours or {})
        for s in specs
        for d in s.destinations()
    }


def test_multicast_mac_maps_the_low_23_bits() -> None:
    assert multicast_mac("239.2.2.2") == "01:00:5e:02:02:02"
    assert multicast_mac("239.130.1.255") == "01:00:5e:02:01:ff"  # the 24th bit is dropped


def test_a_multicast_rule_is_rewritten_counted_and_forwarded() -> None:
    rule = spec(
        outputs=[
            {"interface": "out0", "group": "239.2.2.2", "port": 6000},
            {"interface": "out1", "group": "239.3.3.3", "ttl": 4},
        ]
    )
    p = plan([rule], {str(rule.key): "auto"}, PORTS, egress(rule))
    assert p.decisions[str(rule.key)].kernel
    (text,) = p.chains[IN0]
    assert text.startswith(
        "ip hdrlength 5 ip frag-off & 0x3fff == 0 ip daddr 239.1.1.1 ip protocol udp udp dport 5000"
    )
    assert "ip length <= 1500" in text  # the smaller output MTU: larger datagrams go to user space
    first, second = text.split(" dup to ")
    assert "ether saddr set 02:00:00:00:00:02 ether daddr set 01:00:5e:02:02:02" in first
    assert "ip saddr set 198.51.100.1 ip daddr set 239.2.2.2 udp dport set 6000 ip ttl set 1" in first
    assert "ip saddr set 203.0.113.1 ip daddr set 239.3.3.3 udp dport set 5000 ip ttl set 4" in second
    assert second.endswith('fwd to "out1"')
    first_time = p.transaction(None).splitlines()
    assert first_time[0] == "add table netdev mcrd"
    assert sorted(first_time[1:4]) == [f"add counter netdev mcrd {c}" for c in sorted(p.counters)]
    assert first_time[4] == (
        'add chain netdev mcrd in_2 { type filter hook ingress device "in0" priority -500; policy accept; }'
    )
    assert first_time[5] == f"add rule netdev mcrd in_2 {text}" and len(first_time) == 6
    # a change: the chain is replaced whole, counters that stay are kept, the rest go
    other = spec(input={"interface": "in0", "group": "239.1.1.9", "port": 5000})
    q = plan([other], {str(other.key): "auto"}, PORTS, egress(other))
    change = q.transaction(p).splitlines()
    assert change[3:6] == [
        "add chain netdev mcrd in_2",
        "flush chain netdev mcrd in_2",
        "delete chain netdev mcrd in_2",
    ]
    assert change[-3:] == [f"delete counter netdev mcrd {c}" for c in sorted(p.counters)]
    assert plan([], {}, PORTS, {}).transaction(q).splitlines()[-1] == "delete table netdev mcrd"
    assert p.shape() == plan([rule], {str(rule.key): "auto"}, PORTS, egress(rule)).shape()


def test_source_specific_rules_come_before_the_catch_all() -> None:
    anyone = spec()
    one = spec(input={"interface": "in0", "group": "239.1.1.1", "port": 5000, "source": "192.0.2.10"})
    modes = {str(anyone.key): "auto", str(one.key): "auto"}
    p = plan([anyone, one], modes, PORTS, egress(anyone, one))  # type: ignore[arg-type]
    first, second = p.chains[IN0]
    assert "ip saddr 192.0.2.10 " in first and "ip saddr 192.0.2.10 " not in second.split("counter")[0]


def test_what_stays_in_user_space_says_why() -> None:
    limited = spec(rate_limit={"pps": 100})
    tunnel = spec(
        input={"interface": "in0", "group": "239.1.1.2", "port": 5000},
        outputs=[{"interface": "tun0", "group": "239.2.2.2"}],
    )
    nowhere = spec(
        input={"interface": "in0", "group": "239.1.1.3", "port": 5000}, outputs=[{"group": "239.2.2.2"}]
    )
    unicast = spec(
        input={"interface": "in0", "group": "239.1.1.4", "port": 5000},
        outputs=[{"interface": "out0", "group": "198.51.100.2"}],
    )
    gone = spec(input={"interface": "eth9", "group": "239.1.1.5", "port": 5000})
    off = spec(input={"interface": "in0", "group": "239.1.1.6", "port": 5000})
    rules = [limited, tunnel, nowhere, unicast, gone, off]
    modes = {str(r.key): "auto" for r in rules} | {str(off.key): "off"}
    p = plan(rules, modes, PORTS, egress(*rules))  # type: ignore[arg-type]
    why = {r.input.group: p.decisions[str(r.key)].reason for r in rules}
    assert why == {
        "239.1.1.1": "rate limits are policed in user space",
        "239.1.1.2": "output 239.2.2.2:5000 on tun0 ttl 1: tun0 is not an Ethernet interface",
        "239.1.1.3": "output 239.2.2.2:5000 ttl 1 names no interface",
        "239.1.1.4": "output 198.51.100.2:5000 on out0 ttl 64: next hop 198.51.100.2 is not resolved yet",
        "239.1.1.5": "no interface named 'eth9'",
        "239.1.1.6": "offload is off",
    }
    assert not p.chains and not p.counters
    resolved = egress(unicast, neighbours={(3, "198.51.100.2"): "02:00:00:00:00:99"})
    p = plan([unicast], {str(unicast.key): "auto"}, PORTS, resolved)
    assert "ether daddr set 02:00:00:00:00:99" in p.chains[IN0][0]
    assert "ip saddr set 198.51.100.1" in p.chains[IN0][0]


def test_nothing_is_offloaded_without_nft() -> None:
    rule = spec()
    p = plan(
        [rule], {str(rule.key): "auto"}, PORTS, egress(rule), "nftables (the nft command) is not installed"
    )
    assert p.decisions[str(rule.key)].reason == "nftables (the nft command) is not installed" and not p.chains


def test_counters_are_read_from_nft_json_and_garbage_is_ignored() -> None:
    text = (
        '{"nftables": [{"metainfo": {"version": "1.0.6"}}, '
        '{"counter": {"family": "netdev", "name": "r_1", "table": "mcrd", "packets": 5, "bytes": 300}}, '
        '{"counter": {"family": "netdev", "name": "x", "table": "other", "packets": 1, "bytes": 1}}, '
        '{"counter": {"family": "netdev", "name": "r_2", "table": "mcrd", "packets": "5", "bytes": 3}}]}'
    )
    assert parse_counters(text) == {"r_1": (5, 300)}
    assert parse_counters("not json") == {} and parse_counters("[]") == {}


def test_a_change_on_one_input_leaves_the_other_inputs_chain_alone() -> None:
    in1 = Port(6, "in1", True, True, "02:00:00:00:00:06", 1500)
    ports = {**PORTS, "in1": in1}
    a = spec()
    b = on("239.1.1.2", {"interface": "out1", "group": "239.3.3.3"}, interface="in1")
    b2 = on("239.1.1.2", {"interface": "out1", "group": "239.3.3.4"}, interface="in1")
    modes = {str(r.key): "auto" for r in (a, b)}
    old = plan([a, b], modes, ports, egress(a, b))  # type: ignore[arg-type]
    new = plan([a, b2], modes, ports, egress(a, b2))  # type: ignore[arg-type]
    script = new.transaction(old)
    assert "in_2" not in script  # in0's chain is not touched
    assert "delete chain netdev mcrd in_6" in script and "ip daddr set 239.3.3.4" in script
    assert new.transaction(new).splitlines() == ["add table netdev mcrd"] + [
        f"add counter netdev mcrd {c}" for c in new.counters
    ]
