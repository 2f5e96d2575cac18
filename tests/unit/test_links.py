"""The netlink link table, fed messages by hand."""

from __future__ import annotations

from typing import Any

from mcrd.links import IFF_MULTICAST, IFF_UP, Link, LinkTable


class Msg(dict[str, Any]):
    """Stands in for a pyroute2 message: a dict with attributes."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_link_table_follows_links_and_addresses() -> None:
    t = LinkTable()
    t.apply(Msg({"IFLA_IFNAME": "eth0"}, event="RTM_NEWLINK", index=3, flags=IFF_MULTICAST))
    assert t.snapshot() == {"eth0": Link(3, "eth0", False)}
    t.apply(Msg({"IFA_LOCAL": "192.0.2.1"}, event="RTM_NEWADDR", index=3, family=2))
    t.apply(Msg({"IFLA_IFNAME": "eth0"}, event="RTM_NEWLINK", index=3, flags=IFF_UP | IFF_MULTICAST))
    assert t.snapshot() == {"eth0": Link(3, "eth0", True, frozenset({"192.0.2.1"}))}
    t.apply(Msg({"IFA_ADDRESS": "2001:db8::1"}, event="RTM_NEWADDR", index=3, family=10))  # not IPv4
    t.apply(
        Msg({"IFLA_IFNAME": "wan"}, event="RTM_NEWLINK", index=3, flags=IFF_UP | IFF_MULTICAST)
    )  # renamed
    assert list(t.snapshot()) == ["wan"]
    t.apply(Msg({"IFA_LOCAL": "192.0.2.1"}, event="RTM_DELADDR", index=3, family=2))
    assert t.snapshot()["wan"].addresses == frozenset()
    t.apply(Msg({}, event="RTM_DELLINK", index=3))
    t.apply(
        Msg({"IFLA_IFNAME": "wan"}, event="RTM_NEWLINK", index=9, flags=IFF_UP | IFF_MULTICAST)
    )  # recreated
    assert t.snapshot() == {"wan": Link(9, "wan", True)}


class Info(Msg):
    pass


def test_link_table_knows_multicast_and_bridge_ports() -> None:
    t = LinkTable()
    t.apply(Msg({"IFLA_IFNAME": "wg0"}, event="RTM_NEWLINK", index=4, flags=IFF_UP))  # no IFF_MULTICAST
    t.apply(Msg({"IFLA_IFNAME": "br0"}, event="RTM_NEWLINK", index=5, flags=IFF_UP | IFF_MULTICAST))
    port = {
        "IFLA_IFNAME": "eth1",
        "IFLA_MASTER": 5,
        "IFLA_LINKINFO": Info({"IFLA_INFO_SLAVE_KIND": "bridge"}),
    }
    t.apply(Msg(port, event="RTM_NEWLINK", index=6, flags=IFF_UP | IFF_MULTICAST))
    bond = {"IFLA_IFNAME": "eth2", "IFLA_MASTER": 7, "IFLA_LINKINFO": Info({"IFLA_INFO_SLAVE_KIND": "bond"})}
    t.apply(Msg(bond, event="RTM_NEWLINK", index=8, flags=IFF_UP | IFF_MULTICAST))
    snap = t.snapshot()
    assert not snap["wg0"].multicast and snap["br0"].multicast
    assert snap["eth1"].bridge == "br0" and snap["eth2"].bridge is None and snap["br0"].bridge is None
    t.apply(
        Msg({"IFLA_IFNAME": "eth1"}, event="RTM_NEWLINK", index=6, flags=IFF_UP | IFF_MULTICAST)
    )  # released
    assert t.snapshot()["eth1"].bridge is None
