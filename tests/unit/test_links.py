"""The netlink link table, fed messages by hand."""

from __future__ import annotations

from typing import Any

from mcrd.links import IFF_UP, Link, LinkTable


class Msg(dict[str, Any]):
    """Stands in for a pyroute2 message: a dict with attributes."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_link_table_follows_links_and_addresses() -> None:
    t = LinkTable()
    t.apply(Msg({"IFLA_IFNAME": "eth0"}, event="RTM_NEWLINK", index=3, flags=0))
    assert t.snapshot() == {"eth0": Link(3, "eth0", False)}
    t.apply(Msg({"IFA_LOCAL": "192.0.2.1"}, event="RTM_NEWADDR", index=3, family=2))
    t.apply(Msg({"IFLA_IFNAME": "eth0"}, event="RTM_NEWLINK", index=3, flags=IFF_UP))
    assert t.snapshot() == {"eth0": Link(3, "eth0", True, frozenset({"192.0.2.1"}))}
    t.apply(Msg({"IFA_ADDRESS": "2001:db8::1"}, event="RTM_NEWADDR", index=3, family=10))  # not IPv4
    t.apply(Msg({"IFLA_IFNAME": "wan"}, event="RTM_NEWLINK", index=3, flags=IFF_UP))  # renamed
    assert list(t.snapshot()) == ["wan"]
    t.apply(Msg({"IFA_LOCAL": "192.0.2.1"}, event="RTM_DELADDR", index=3, family=2))
    assert t.snapshot()["wan"].addresses == frozenset()
    t.apply(Msg({}, event="RTM_DELLINK", index=3))
    t.apply(Msg({"IFLA_IFNAME": "wan"}, event="RTM_NEWLINK", index=9, flags=IFF_UP))  # recreated
    assert t.snapshot() == {"wan": Link(9, "wan", True)}
