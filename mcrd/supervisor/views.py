"""What the control socket shows: functions of a read-only `Observed`.

`mcrctl list`, `stats` and `workers` (and `status`) read the supervisor
through an `Observed`: the desired rules, the ports, the output sockets, the
kernel path and the link lookup as they are at one moment. Nothing here
changes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mcrd.counters import OutputCounts, Rate, Rates, RuleCounts, add_rates
from mcrd.links import Link
from mcrd.rulebook import rule_id
from mcrd.rules import Destination, RuleSpec, is_multicast
from mcrd.supervisor.kernel import KernelPath
from mcrd.supervisor.outputs import OutputPool
from mcrd.supervisor.ports import InputPort, Lane, PortState


@dataclass(frozen=True)
class Observed:
    """The supervisor as the views see it."""

    rules: list[RuleSpec]
    ports: Mapping[str, InputPort]
    outputs: OutputPool
    kernel: KernelPath
    link: Callable[[str], Link | None]
    now: float


def rule_state(obs: Observed, spec: RuleSpec) -> tuple[str, str]:
    port = obs.ports.get(spec.input.interface)
    if port is None:
        return PortState.PENDING.value, "not applied yet"
    if port.state == PortState.ACTIVE:
        link = obs.link(port.interface)
        return ("active", "") if link is None or link.up else ("active", "interface is down")
    return port.state.value, port.why


def counts(obs: Observed) -> tuple[int, int]:
    """(active, pending) rules."""
    active = sum(1 for s in obs.rules if rule_state(obs, s)[0] == "active")
    return active, len(obs.rules) - active


def warnings(spec: RuleSpec, link: Callable[[str], Link | None]) -> list[str]:
    """What may keep a rule from working although it is active: multicast on
    an interface without multicast (WireGuard and most point-to-point
    tunnels), where sends succeed and nothing arrives."""
    found = []
    inp = link(spec.input.interface)
    if inp is not None and not inp.multicast and is_multicast(spec.input.group):
        found.append(f"input {spec.input.interface} does not do multicast (no IFF_MULTICAST)")
    for dest in spec.destinations():
        out = link(dest.interface) if dest.interface else None
        if out is not None and not out.multicast and is_multicast(dest.group):
            found.append(f"output {dest}: {dest.interface} does not do multicast (no IFF_MULTICAST)")
    return found


def rule_views(obs: Observed, origin: Callable[[RuleSpec], str]) -> list[dict[str, Any]]:
    views = []
    for spec in obs.rules:
        state, reason = rule_state(obs, spec)
        outputs = []
        for dest in spec.destinations():
            ostate, oreason = obs.outputs.state(dest, obs.link)
            outputs.append({"destination": str(dest), "state": ostate.value, "reason": oreason})
        decision = obs.kernel.decision(spec.key)
        views.append(
            {
                "name": spec.name,
                "id": rule_id(spec.key),
                "key": str(spec.key),
                "origin": origin(spec),
                "input": spec.input.model_dump(),
                "outputs": outputs,
                "state": state,
                "reason": reason,
                "path": "kernel" if decision and decision.kernel else "user",
                "path_reason": decision.reason if decision else "",
                "warnings": warnings(spec, obs.link),
            }
        )
    return views


def _output_view(dest: Destination, counted: OutputCounts, rate: Rate) -> dict[str, Any]:
    return {
        "destination": str(dest),
        "packets": counted.packets,
        "bytes": counted.bytes,
        "errors": counted.errors,
        "last_error": counted.last_error,
        "pps": round(rate.pps, 1),
        "bps": round(rate.bps, 1),
    }


def _rule_view(spec: RuleSpec, counted: RuleCounts, rates: Rates) -> dict[str, Any]:
    rate = rates.get((spec.key, None), Rate())
    return {
        "name": spec.name,
        "id": rule_id(spec.key),
        "key": str(spec.key),
        "packets": counted.packets,
        "bytes": counted.bytes,
        "pps": round(rate.pps, 1),
        "bps": round(rate.bps, 1),
        "drops": {"rate_limit": counted.limited, "loop": counted.looped, "ttl": counted.expired},
        "outputs": [
            _output_view(d, counted.output(d), rates.get((spec.key, d), Rate())) for d in spec.destinations()
        ],
    }


def stats_view(obs: Observed) -> dict[str, Any]:
    """Counts and rates per rule and output (user space and kernel added
    up), and per input interface."""
    rules = []
    interfaces = []
    kernel_rates = obs.kernel.rates()
    for port in obs.ports.values():
        total = port.total()
        pids = [w.pid for w in port.workers()]
        interfaces.append(
            {
                "interface": port.interface,
                "worker": pids[0] if pids else None,
                "workers": pids,
                "state": port.state.value,
                "filter": str(port.precision),
                "received": total.received,
                "drops": dict(total.drops),
            }
        )
        rates = add_rates([*(lane.ledger.rates() for lane in port.lanes), kernel_rates])
        for spec in port.rules:
            counted = total.rule(spec.key) + obs.kernel.counts(spec)
            rules.append(_rule_view(spec, counted, rates))
    return {"rules": rules, "interfaces": interfaces}


def _worker_view(obs: Observed, port: InputPort, lane: Lane | None) -> dict[str, Any]:
    worker = lane.live_worker() if lane else None
    return {
        "interface": port.interface,
        "lane": lane.index if lane else 0,
        "pid": worker.pid if worker else None,
        "state": lane.state.value if lane else port.state.value,
        "reason": lane.reason if lane else port.reason,
        "restarts": lane.restarts if lane else 0,
        "received": lane.ledger.total().received if lane else 0,
        "rules": len(port.rules),
        "last_heard": round(obs.now - worker.last_heard, 1) if worker else None,
    }


def worker_views(obs: Observed) -> list[dict[str, Any]]:
    """One row per lane; a closed port shows one row saying why."""
    rows: list[dict[str, Any]] = []
    for port in obs.ports.values():
        lanes: list[Lane | None] = list(port.lanes) or [None]
        rows.extend(_worker_view(obs, port, lane) for lane in lanes)
    return rows
