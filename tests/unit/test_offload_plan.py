"""Kernel offload planning (mcrd.offload.plan), without sockets or the kernel."""

from __future__ import annotations

from mcrd.offload.plan import (
    Decision,
    Egress,
    Iface,
    OffloadMode,
    egress_for,
    multicast_mac,
    plan_offload,
)
from mcrd.offload.programs import KernelOutput, KernelRule
from mcrd.rules import Destination, RuleKey, RuleSpec

IN0 = Iface(2, "in0", True, True, "02:00:00:00:00:01", 1500)
OUT0 = Iface(3, "out0", True, True, "02:00:00:00:00:02", 1500)
OUT1 = Iface(4, "out1", True, True, "02:00:00:00:00:03", 9000)
TUN = Iface(5, "tun0", True, False, "", 1400)
IFACES = {p.name: p for p in (IN0, OUT0, OUT1, TUN)}
ADDRS = {3: ["198.51.100.1"], 4: ["203.0.113.1"]}


def spec(**kw: object) -> RuleSpec:
    data: dict[str, object] = {
        "input": {"interface": "in0", "group": "239.1.1.1", "port": 5000},
        "outputs": [{"interface": "out0", "group": "239.2.2.2", "port": 6000}],
    }
    data.update(kw)
    return RuleSpec.model_validate(data)


def auto(*rules: RuleSpec, off: tuple[RuleSpec, ...] = ()) -> dict[RuleKey, OffloadMode]:
    """Offload modes: "auto" for `rules`, "off" for `off`."""
    modes: dict[RuleKey, OffloadMode] = dict.fromkeys((r.key for r in rules), "auto")
    return modes | dict.fromkeys((r.key for r in off), "off")


def on(group: str, *outputs: dict[str, object], interface: str = "in0") -> RuleSpec:
    return spec(input={"interface": interface, "group": group, "port": 5000}, outputs=list(outputs))


def egress(
    *specs: RuleSpec, neighbours: dict[tuple[int, str], str] | None = None
) -> dict[Destination, Egress]:
    routes = {"198.51.100.2": ("198.51.100.1", "198.51.100.2")}
    return {
        d: egress_for(d, IFACES, ADDRS, routes.get(d.group), neighbours or {})
        for s in specs
        for d in s.destinations()
    }


def test_multicast_mac_maps_the_low_23_bits() -> None:
    assert multicast_mac("239.2.2.2") == "01:00:5e:02:02:02"
    assert multicast_mac("239.130.1.255") == "01:00:5e:02:01:ff"  # the 24th bit is dropped


def test_a_multicast_rule_becomes_a_kernel_rule_with_everything_resolved() -> None:
    rule = spec(
        outputs=[
            {"interface": "out0", "group": "239.2.2.2", "port": 6000},
            {"interface": "out1", "group": "239.3.3.3", "ttl": 4},
        ]
    )
    p = plan_offload([rule], auto(rule), IFACES, egress(rule))
    assert p.decisions[rule.key].kernel
    (attachment,) = p.shape()
    assert (attachment.index, attachment.name) == (2, "in0")
    assert attachment.rules == (
        (
            rule.key,
            KernelRule(
                "239.1.1.1",
                5000,
                None,
                1500,  # the smaller output MTU: larger datagrams go to user space, which fragments
                (
                    KernelOutput(
                        3, "02:00:00:00:00:02", "01:00:5e:02:02:02", "198.51.100.1", "239.2.2.2", 6000, 1
                    ),
                    KernelOutput(
                        4, "02:00:00:00:00:03", "01:00:5e:03:03:03", "203.0.113.1", "239.3.3.3", 5000, 4
                    ),
                ),
            ),
        ),
    )
    assert p.shape() == plan_offload([rule], auto(rule), IFACES, egress(rule)).shape()


def test_source_specific_rules_come_before_the_catch_all() -> None:
    anyone = spec()
    one = spec(input={"interface": "in0", "group": "239.1.1.1", "port": 5000, "source": "192.0.2.10"})
    modes = auto(anyone, one)
    p = plan_offload([anyone, one], modes, IFACES, egress(anyone, one))
    first, second = p.programs[2].rules
    assert first == (one.key, first[1]) and first[1].source == "192.0.2.10"
    assert second[0] == anyone.key and second[1].source is None


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
    modes = auto(*rules[:-1], off=(off,))
    p = plan_offload(rules, modes, IFACES, egress(*rules))
    why = {r.input.group: p.decisions[r.key].reason for r in rules}
    assert why == {
        "239.1.1.1": "rate limits are policed in user space",
        "239.1.1.2": "output 239.2.2.2:5000 on tun0 ttl 1: tun0 is not an Ethernet interface",
        "239.1.1.3": "output 239.2.2.2:5000 ttl 1 names no interface",
        "239.1.1.4": "output 198.51.100.2:5000 on out0 ttl 64: next hop 198.51.100.2 is not resolved yet",
        "239.1.1.5": "no interface named 'eth9'",
        "239.1.1.6": "offload is off",
    }
    assert not p.programs
    resolved = egress(unicast, neighbours={(3, "198.51.100.2"): "02:00:00:00:00:99"})
    p = plan_offload([unicast], auto(unicast), IFACES, resolved)
    ((_key, kernel_rule),) = p.programs[2].rules
    assert kernel_rule.outputs[0].dst_mac == "02:00:00:00:00:99"
    assert kernel_rule.outputs[0].src_ip == "198.51.100.1" and kernel_rule.outputs[0].ttl == 64


def test_nothing_is_offloaded_without_ebpf_and_a_refused_rule_says_why() -> None:
    rule = spec()
    p = plan_offload(
        [rule], auto(rule), IFACES, egress(rule), "eBPF is not available: Operation not permitted"
    )
    assert p.decisions[rule.key].reason == "eBPF is not available: Operation not permitted"
    assert not p.programs
    p = plan_offload([rule], auto(rule), IFACES, egress(rule), refused={rule.key: "the kernel refused it"})
    assert p.decisions[rule.key].reason == "the kernel refused it" and not p.programs


def test_a_change_on_one_input_leaves_the_other_inputs_program_alone() -> None:
    in1 = Iface(6, "in1", True, True, "02:00:00:00:00:06", 1500)
    ports = {**IFACES, "in1": in1}
    a = spec()
    b = on("239.1.1.2", {"interface": "out1", "group": "239.3.3.3"}, interface="in1")
    b2 = on("239.1.1.2", {"interface": "out1", "group": "239.3.3.4"}, interface="in1")
    modes = auto(a, b, b2)
    old = plan_offload([a, b], modes, ports, egress(a, b))
    new = plan_offload([a, b2], modes, ports, egress(a, b2))
    assert old.programs[2] == new.programs[2]  # in0's: equal, so not touched
    assert old.programs[6] != new.programs[6] and old.shape() != new.shape()


def test_a_catch_all_stays_in_user_space_while_a_source_rule_of_its_group_does() -> None:
    anyone = spec()
    limited = spec(
        input={"interface": "in0", "group": "239.1.1.1", "port": 5000, "source": "192.0.2.10"},
        rate_limit={"pps": 10},
    )
    modes = auto(anyone, limited)
    p = plan_offload([anyone, limited], modes, IFACES, egress(anyone, limited))
    # else the kernel would relay 192.0.2.10's datagrams by the catch-all, past the limit
    assert p.decisions[anyone.key] == Decision(
        False, "the rule for source 192.0.2.10 of the same group and port is in user space"
    )
    assert not p.programs
    other_port = spec(input={"interface": "in0", "group": "239.1.1.1", "port": 5001})
    modes[other_port.key] = "auto"
    p = plan_offload([anyone, limited, other_port], modes, IFACES, egress(anyone, limited, other_port))
    assert p.decisions[other_port.key].kernel


def test_an_output_from_an_ephemeral_port_stays_in_user_space() -> None:
    # the kernel path keeps the sender's port: it cannot do otherwise, so the
    # rule stays where what leaves is what the output asks for
    ephemeral = spec(outputs=[{"interface": "out0", "group": "239.2.2.2", "source_port": "ephemeral"}])
    kept = spec(
        input={"interface": "in0", "group": "239.1.1.2", "port": 5000},
        outputs=[{"interface": "out0", "group": "239.2.2.2", "source_port": "keep"}],
    )
    p = plan_offload([ephemeral, kept], auto(ephemeral, kept), IFACES, egress(ephemeral, kept))
    assert p.decisions[ephemeral.key].reason == (
        "output 239.2.2.2:5000 on out0 ttl 1 source port ephemeral sends from an ephemeral port, "
        "which user space does"
    )
    assert p.decisions[kept.key].reason == ""
