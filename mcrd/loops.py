"""Rules that feed each other: which do, which of them the loop guard
covers, and which cycles are refused because the guard cannot make them
safe. Pure: rules in, sets and messages out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcrd.rules import Destination, Labeler, RuleKey, RuleSpec


def feeds(dest: Destination, key: RuleKey) -> bool:
    """Whether packets sent to `dest` could arrive as input of the rule `key`.

    The relay's sender address is not known statically, so a source-specific
    input is assumed to match; an output without an interface can leave on any.
    """
    return (
        dest.group == key.group
        and dest.port == key.port
        and (dest.interface is None or dest.interface == key.interface)
    )


def _feed_edges(rules: list[RuleSpec]) -> dict[int, list[int]]:
    """Which rules' outputs could arrive as which other rules' input (by index)."""
    by_input: dict[tuple[str, int], list[int]] = {}
    for j, rule in enumerate(rules):
        by_input.setdefault((rule.input.group, rule.input.port), []).append(j)
    edges: dict[int, list[int]] = {}
    for i, rule in enumerate(rules):
        targets: dict[int, None] = {}
        for dest in rule.destinations():
            for j in by_input.get((dest.group, dest.port), []):
                if j != i and feeds(dest, rules[j].key):
                    targets[j] = None
        edges[i] = list(targets)
    return edges


def _cycles(rules: list[RuleSpec]) -> list[tuple[set[int], dict[int, list[int]]]]:
    """Each set of two or more rules that feed each other, with its edges."""
    edges = _feed_edges(rules)
    return [
        (component, {k: [n for n in edges[k] if n in component] for k in component})
        for component in _strongly_connected(edges)
        if len(component) > 1
    ]


def loop_guarded(rules: list[RuleSpec]) -> set[RuleKey]:
    """The rules whose datagrams go through the loop guard: those that say
    so, and those that feed each other (two-way and N-way rules) unless they
    turn it off."""
    guarded = {r.key for r in rules if r.loop_guard}
    for component, _edges in _cycles(rules):
        guarded |= {rules[k].key for k in component if rules[k].loop_guard is None}
    return guarded


#: the interface on which mcrd hears what this host itself sends
LOOPBACK = "lo"


def check_cycles(rules: list[RuleSpec], label: Labeler) -> list[tuple[int, str]]:
    """Rules that feed each other are relayed with the loop guard (see
    `loop_guarded`); a cycle is refused only where the guard cannot make it
    safe: when one of its rules turns the guard off, or when it runs through
    the loopback interface, where mcrd would hear its own output and relay
    it again at once. One error per cycle; linear in rules and outputs."""
    errors = []
    for component, edges in _cycles(rules):
        start = min(component)
        cycle = _find_cycle(start, edges)
        assert cycle is not None  # a strongly connected component of two or more has one
        path = " -> ".join(label(k, rules[k]) for k in [*cycle, cycle[0]])
        unguarded = sorted(k for k in component if rules[k].loop_guard is False)
        if any(rules[k].input.interface == LOOPBACK for k in component):
            errors.append(
                (
                    start,
                    f"rules feed each other in a cycle through {LOOPBACK}, "
                    f"where mcrd hears its own output: {path}",
                )
            )
        elif unguarded:
            errors.append(
                (
                    start,
                    f"rules feed each other in a cycle and {label(unguarded[0], rules[unguarded[0]])} "
                    f"turns the loop guard off (loop_guard = false): {path}",
                )
            )
    return errors


def _strongly_connected(edges: dict[int, list[int]]) -> list[set[int]]:
    """Tarjan's algorithm, without recursion (a rule set may be large)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    found: list[set[int]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, pos = work.pop()
            if pos == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for k in range(pos, len(edges[node])):
                nxt = edges[node][k]
                if nxt not in index:
                    work.append((node, k + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def _find_cycle(start: int, edges: dict[int, list[int]]) -> list[int] | None:
    """A cycle through `start`, as the list of nodes in order, or None."""
    stack: list[tuple[int, list[int]]] = [(start, [start])]
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        for nxt in edges[node]:
            if nxt == start:
                return path
            if nxt not in visited:
                visited.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None
