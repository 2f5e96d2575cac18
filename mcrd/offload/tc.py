"""`Tc`: the dispatcher and the rules' programs at tc ingress, kept in step
with an offload plan rule by rule.

Blocking (bpf(2) and netlink): the supervisor calls it from a thread, and a
lock keeps calls apart. Also clears what a crashed mcrd left attached.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from mcrd.counters import KernelCounts
from mcrd.offload import bpf
from mcrd.offload.plan import Attachment
from mcrd.offload.programs import KernelRule, dispatch_program, rule_program, slot_size, table_key
from mcrd.rules import RuleKey

log = logging.getLogger("mcrd.offload")

FILTER_PREFIX = "mcrd:"
PRIO = 1  # first on the hook: what we relay, we consume
HANDLE = 1
CLASSID = 1  # unused by a direct-action filter, but tc wants one
ETH_P_IP = 0x0800
INGRESS_CLSACT = 0xFFFFFFF2  # clsact's ingress hook
INGRESS_QDISC = 0xFFFF0000  # the older `ingress` qdisc's, if the interface has that instead
EGRESS_CLSACT = 0xFFFFFFF3

CAPACITY = 65536  # rules per input interface the kernel's table and program array hold


@dataclass
class LoadedRule:
    """A rule in the kernel: its index in the program array (which holds
    the program itself) and its counters."""

    rule: KernelRule
    index: int
    counters_fd: int

    def close(self) -> None:
        _close(self.counters_fd)

    def read(self) -> KernelCounts:
        (words,) = bpf.read_counters(self.counters_fd, 1, slot_size(self.rule))
        return [(words[2 * i], words[2 * i + 1]) for i in range(1 + len(self.rule.outputs))]


@dataclass
class HookedInterface:
    """An input interface with mcrd's dispatcher attached."""

    index: int
    name: str
    parent: int
    created_qdisc: bool
    dispatch_fd: int
    table_fd: int
    programs_fd: int
    rules: dict[RuleKey, LoadedRule] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)  # indexes given back, reused first
    next_index: int = 0

    def take_index(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.next_index >= CAPACITY:
            return None
        self.next_index += 1
        return self.next_index - 1

    def close(self) -> None:
        for loaded in self.rules.values():
            loaded.close()
        _close(self.dispatch_fd, self.table_fd, self.programs_fd)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Tc:
    """Loads the programs and attaches them at tc ingress; adds, replaces
    and removes rules' programs one by one. Blocking (bpf(2) and netlink):
    the supervisor calls it from a thread, and a lock keeps calls apart."""

    def __init__(self) -> None:
        self.hooked: dict[int, HookedInterface] = {}  # by interface index
        self.carried: dict[RuleKey, KernelCounts] = {}  # counts of rules' programs since replaced
        self.refused: dict[tuple[int, RuleKey, KernelRule], str] = {}  # not retried until changed
        self.unhookable: dict[Attachment, str] = {}  # likewise, for a dispatcher
        self.released: dict[RuleKey, KernelCounts] = {}  # final counts of rules that left the kernel
        self.lock = threading.Lock()
        self._missing: str | None = None

    @property
    def missing(self) -> str:
        """Why the kernel cannot relay at all ("" if it can): checked once."""
        if self._missing is None:
            self._missing = self._probe()
        return self._missing

    @staticmethod
    def _probe() -> str:
        fds: list[int] = []
        try:
            fds.append(bpf.create_table(1))
            fds.append(bpf.create_program_array(1))
            fds.append(bpf.load_program(dispatch_program(fds[0], fds[1]), "mcrd_probe"))
        except OSError as exc:
            return f"eBPF is not available: {exc.strerror or exc}"
        finally:
            _close(*fds)
        return ""

    def clear_leftovers(self) -> int:
        """Delete filters named `mcrd:` (a crashed mcrd's) from every
        interface, and a clsact qdisc left with nothing else in it."""
        from pyroute2 import IPRoute

        removed = 0
        with self.lock, IPRoute() as ipr:
            hooks: dict[int, int] = {}  # one dump of every qdisc: most interfaces have no ingress hook
            for q in ipr.get_qdiscs():
                kind = q.get_attr("TCA_KIND")
                if kind in ("clsact", "ingress"):
                    hooks[q["index"]] = INGRESS_CLSACT if kind == "clsact" else INGRESS_QDISC
            for index, parent in sorted(hooks.items()):
                if not any(_is_ours(f) for f in _filters(ipr, index, parent)):
                    continue
                with contextlib.suppress(Exception):  # one filter of ours: priority and handle are fixed
                    _delete_filter(ipr, index, parent)
                    removed += 1
                if parent == INGRESS_CLSACT and not _any_filters(ipr, index):
                    with contextlib.suppress(Exception):
                        ipr.tc("del", "clsact", index)
        return removed

    def apply(self, programs: dict[int, Attachment]) -> dict[RuleKey, str]:
        """Make the kernel hold `programs`: on each input interface, add the
        rules that are new, replace those that changed, remove the others;
        unchanged rules are not touched. Returns the rules the kernel
        refused (by key), and why; the others are in the kernel."""
        from pyroute2 import IPRoute

        refused: dict[RuleKey, str] = {}
        with self.lock, IPRoute() as ipr:
            for index in sorted(set(self.hooked) - set(programs)):
                self._unhook(ipr, index)
            for att in (programs[i] for i in sorted(programs)):
                refused |= self._apply_interface(ipr, att)
            offloaded = _rules(programs)
            self.refused = {m: r for m, r in self.refused.items() if (m[1], m[2]) in offloaded}
            self.unhookable = {a: r for a, r in self.unhookable.items() if programs.get(a.index) == a}
            self._release({key for hooked in self.hooked.values() for key in hooked.rules})
        return refused

    def _apply_interface(self, ipr: Any, att: Attachment) -> dict[RuleKey, str]:
        """One input interface's part of `apply`; returns its refused rules."""
        index = att.index
        hooked = self.hooked.get(index)
        if hooked is None:
            known = {(key, rule): self.refused.get((index, key, rule)) for key, rule in att.rules}
            if all(known.values()):  # nothing it could hold: not attached just to go again
                return {key: reason for (key, _rule), reason in known.items() if reason}
            if att not in self.unhookable:
                try:
                    hooked = self.hooked[index] = self._hook(ipr, att)
                except OSError as exc:
                    self.unhookable[att] = f"the kernel refused the program of {att.name}: {exc.strerror}"
                    log.error("offload: %s", self.unhookable[att])
            if hooked is None:
                return dict.fromkeys((key for key, _rule in att.rules), self.unhookable[att])
        refused: dict[RuleKey, str] = {}
        wanted = dict(att.rules)
        for key in sorted(set(hooked.rules) - set(wanted), key=str):
            self._drop(hooked, key)
        for key, rule in att.rules:
            current = hooked.rules.get(key)
            if current is not None and current.rule == rule:
                continue
            mark = (index, key, rule)
            if mark not in self.refused:
                try:
                    self._put(hooked, key, rule)
                    continue
                except OSError as exc:
                    self.refused[mark] = f"the kernel refused its program: {exc.strerror or exc}"
                    log.error("offload of %s: %s", key, self.refused[mark])
            refused[key] = self.refused[mark]
            if current is not None:
                self._drop(hooked, key)
        if not hooked.rules:
            self._unhook(ipr, index)
        return refused

    def _hook(self, ipr: Any, att: Attachment) -> HookedInterface:
        fds: list[int] = []
        created = False
        try:
            fds.append(bpf.create_table(CAPACITY))
            fds.append(bpf.create_program_array(CAPACITY))
            fds.append(bpf.load_program(dispatch_program(fds[0], fds[1]), f"mcrd_{att.index}"))
            parent = _ingress_parent(ipr, att.index)
            if parent is None:
                ipr.tc("add", "clsact", att.index)
                created, parent = True, INGRESS_CLSACT
            ipr.tc(  # `add`: never over a filter that is not ours
                "add-filter",
                "bpf",
                att.index,
                handle=HANDLE,
                fd=fds[2],
                name=f"{FILTER_PREFIX}{att.name}",
                parent=parent,
                classid=CLASSID,
                direct_action=True,
                prio=PRIO,
                protocol=ETH_P_IP,
            )
        except Exception as exc:
            _close(*fds)
            if created:
                with contextlib.suppress(Exception):
                    ipr.tc("del", "clsact", att.index)
            if isinstance(exc, OSError):
                raise
            raise OSError(getattr(exc, "code", None) or errno.EINVAL, str(exc)) from None
        table, programs, dispatch = fds
        return HookedInterface(att.index, att.name, parent, created, dispatch, table, programs)

    def _put(self, hooked: HookedInterface, key: RuleKey, rule: KernelRule) -> None:
        """Load a rule's program and put it in place: a new rule gets a free
        index and then its table entry; a changed one takes over its old
        index in one atomic update."""
        current = hooked.rules.get(key)
        index = current.index if current else hooked.take_index()
        if index is None:
            raise OSError(errno.ENOSPC, f"{hooked.name} has {CAPACITY} rules in the kernel already")
        slot = index.to_bytes(4, "little")
        counters = program = -1
        try:
            counters = bpf.create_counters(1, slot_size(rule))
            program = bpf.load_program(rule_program(rule, counters), f"mcrd_{hooked.index}_{index}")
            bpf.update(hooked.programs_fd, slot, program.to_bytes(4, "little"))
            if current is None:
                try:
                    bpf.update(hooked.table_fd, table_key(rule.group, rule.port, rule.source), slot)
                except OSError:
                    with contextlib.suppress(OSError):
                        bpf.delete(hooked.programs_fd, slot)
                    raise
        except OSError:
            _close(*(fd for fd in (program, counters) if fd >= 0))
            if current is None:
                hooked.free.append(index)
            raise
        _close(program)  # the program array holds it now
        if current is not None:
            self._carry(key, current)
            current.close()
        hooked.rules[key] = LoadedRule(rule, index, counters)

    def _drop(self, hooked: HookedInterface, key: RuleKey) -> None:
        loaded = hooked.rules.pop(key)
        rule = loaded.rule
        with contextlib.suppress(OSError):  # the table entry first: no lookup finds the index any more
            bpf.delete(hooked.table_fd, table_key(rule.group, rule.port, rule.source))
        with contextlib.suppress(OSError):
            bpf.delete(hooked.programs_fd, loaded.index.to_bytes(4, "little"))
        hooked.free.append(loaded.index)
        self._carry(key, loaded)
        loaded.close()

    def _unhook(self, ipr: Any, index: int) -> None:
        hooked = self.hooked.pop(index)
        with contextlib.suppress(Exception):  # gone with its interface, or deleted by hand
            _delete_filter(ipr, index, hooked.parent)
        if hooked.created_qdisc:
            with contextlib.suppress(Exception):
                if not _any_filters(ipr, index):
                    ipr.tc("del", "clsact", index)
        for key, loaded in hooked.rules.items():
            self._carry(key, loaded)
        hooked.close()

    def _release(self, keep: set[RuleKey]) -> None:
        """What rules that left the kernel counted goes to `released`."""
        for key in [k for k in self.carried if k not in keep]:
            self.released[key] = add_counts(self.released.get(key, []), self.carried.pop(key))

    def take_released(self) -> dict[RuleKey, KernelCounts]:
        """The final counts of the rules that left the kernel since the last
        call: the caller keeps them, so that totals never go back."""
        with self.lock:
            released, self.released = self.released, {}
            return released

    def _carry(self, key: RuleKey, loaded: LoadedRule) -> None:
        with contextlib.suppress(OSError):
            self.carried[key] = add_counts(self.carried.get(key, []), loaded.read())

    def counters(self) -> dict[RuleKey, KernelCounts]:
        """What each offloaded rule relayed, by rule key: its own count,
        then each output's; carried over replacements of its program."""
        with self.lock:
            found: dict[RuleKey, KernelCounts] = {}
            for hooked in self.hooked.values():
                for key, loaded in hooked.rules.items():
                    with contextlib.suppress(OSError):
                        found[key] = add_counts(self.carried.get(key, []), loaded.read())
            return found

    def remove(self) -> None:
        """Detach everything mcrd attached."""
        from pyroute2 import IPRoute

        with self.lock:
            if self.hooked:
                with IPRoute() as ipr:
                    for index in sorted(self.hooked):
                        self._unhook(ipr, index)
            self._release(set())
            self.refused.clear()
            self.unhookable.clear()


def _rules(programs: dict[int, Attachment]) -> set[tuple[RuleKey, KernelRule]]:
    return {(key, rule) for att in programs.values() for key, rule in att.rules}


def add_counts(a: KernelCounts, b: KernelCounts) -> KernelCounts:
    """Two rules' counts summed pairwise; the shorter one padded with zeros."""
    return [(p1 + p2, b1 + b2) for (p1, b1), (p2, b2) in zip_longest(a, b, fillvalue=(0, 0))]


def _ingress_parent(ipr: Any, index: int) -> int | None:
    """Where a filter goes on this interface's ingress: its clsact qdisc,
    or an `ingress` qdisc; None if it has neither."""
    for q in ipr.get_qdiscs(index=index):
        kind = q.get_attr("TCA_KIND")
        if kind == "clsact":
            return INGRESS_CLSACT
        if kind == "ingress":
            return INGRESS_QDISC
    return None


def _filters(ipr: Any, index: int, parent: int) -> list[Any]:
    return [f for f in ipr.get_filters(index=index, parent=parent) if f["handle"]]


def _any_filters(ipr: Any, index: int) -> bool:
    return bool(_filters(ipr, index, INGRESS_CLSACT) or _filters(ipr, index, EGRESS_CLSACT))


def _is_ours(f: Any) -> bool:
    if f.get_attr("TCA_KIND") != "bpf" or f["info"] >> 16 != PRIO or f["handle"] != HANDLE:
        return False
    name = f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") or ""
    return isinstance(name, str) and name.startswith(FILTER_PREFIX)


def _delete_filter(ipr: Any, index: int, parent: int) -> None:
    ipr.tc("del-filter", "bpf", index, handle=HANDLE, parent=parent, prio=PRIO, protocol=ETH_P_IP)
