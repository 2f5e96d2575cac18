"""The one counter model: what a rule and each of its outputs relayed.

Workers (user space) and the kernel's programs (offload) both count in
packets and payload bytes, per rule and per output; a worker also counts what
it received and dropped. Here those counts are values keyed by identities
(`RuleKey`, `Destination`), never by display strings, with one way to add
them up (`+`) and one way to carry them across generations of whatever counts
(`Ledger`): a worker restarted, a port reopened, a rule moved out of the
kernel. Pure: no sockets, no clock (callers pass the time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from mcrd.packet import DROP_REASONS
from mcrd.rules import Destination, RuleKey

#: (packets, payload bytes) a kernel program counted: the rule's, then each output's
KernelCounts = list[tuple[int, int]]


@dataclass(frozen=True)
class OutputCounts:
    """What one output of one rule sent, and how sending failed."""

    packets: int = 0
    bytes: int = 0
    errors: int = 0
    last_error: str = ""

    def __add__(self, later: OutputCounts) -> OutputCounts:
        return OutputCounts(
            self.packets + later.packets,
            self.bytes + later.bytes,
            self.errors + later.errors,
            later.last_error or self.last_error,
        )


@dataclass(frozen=True)
class RuleCounts:
    """What one rule relayed (`limited`: held back by its rate limit;
    `looped`: dropped by the loop guard), and what each of its outputs sent."""

    packets: int = 0
    bytes: int = 0
    limited: int = 0
    outputs: Mapping[Destination, OutputCounts] = field(default_factory=dict)
    looped: int = 0
    expired: int = 0  # came with TTL 1 where outputs decrement it

    def __add__(self, later: RuleCounts) -> RuleCounts:
        return RuleCounts(
            self.packets + later.packets,
            self.bytes + later.bytes,
            self.limited + later.limited,
            _add_maps(self.outputs, later.outputs, OutputCounts()),
            self.looped + later.looped,
            self.expired + later.expired,
        )

    def output(self, dest: Destination) -> OutputCounts:
        return self.outputs.get(dest, OutputCounts())


@dataclass(frozen=True)
class Counts:
    """Everything one counting source counted: a worker, a port's workers
    over time, or the kernel's programs (which receive and drop nothing
    of their own)."""

    received: int = 0
    drops: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    rules: Mapping[RuleKey, RuleCounts] = field(default_factory=dict)

    def __add__(self, later: Counts) -> Counts:
        return Counts(
            self.received + later.received,
            {k: self.drops.get(k, 0) + later.drops.get(k, 0) for k in DROP_REASONS},
            _add_maps(self.rules, later.rules, RuleCounts()),
        )

    def rule(self, key: RuleKey) -> RuleCounts:
        return self.rules.get(key, RuleCounts())

    def only(self, keys: Iterable[RuleKey]) -> Counts:
        """The same counts without the rules not in `keys`."""
        kept = set(keys)
        return Counts(self.received, self.drops, {k: v for k, v in self.rules.items() if k in kept})


EMPTY = Counts()


class _Addable(Protocol):
    def __add__(self: _V, other: _V, /) -> _V: ...


_K = TypeVar("_K")
_V = TypeVar("_V", bound=_Addable)


def _add_maps(a: Mapping[_K, _V], b: Mapping[_K, _V], zero: _V) -> dict[_K, _V]:
    """Two maps summed key by key; a key only one of them has is added to `zero`."""
    return {k: a.get(k, zero) + b.get(k, zero) for k in (*a, *(k for k in b if k not in a))}


def from_kernel(key: RuleKey, destinations: list[Destination], counts: KernelCounts) -> RuleCounts:
    """A kernel program's positional counts as a rule's: the first pair is
    the rule's, the next ones its outputs' in order (missing ones are 0)."""
    padded = [*counts, *[(0, 0)] * (1 + len(destinations))]
    return RuleCounts(
        padded[0][0],
        padded[0][1],
        0,
        {d: OutputCounts(p, b) for d, (p, b) in zip(destinations, padded[1:], strict=False)},
    )


@dataclass(frozen=True)
class Sample:
    at: float
    counts: Counts


@dataclass(frozen=True)
class Rate:
    """Packets and bits per second over the last two samples."""

    pps: float = 0.0
    bps: float = 0.0

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.pps + other.pps, self.bps + other.bps)


Rates = dict[tuple[RuleKey, Destination | None], Rate]


def _rate(packets: int, octets: int, dt: float) -> Rate:
    return Rate(max(0, packets) / dt, max(0, octets) * 8 / dt)


@dataclass
class Ledger:
    """The counts of something that outlives its generations.

    `carried` is what finished generations counted; `samples` are the last
    two readings of the live one. `retire()` ends a generation (its last
    reading joins `carried`), so totals never go back when a worker is
    restarted or a rule leaves the kernel.
    """

    carried: Counts = EMPTY
    samples: list[Sample] = field(default_factory=list)

    def record(self, at: float, counts: Counts) -> None:
        self.samples = [*self.samples[-1:], Sample(at, counts)]

    def latest(self) -> Counts:
        return self.samples[-1].counts if self.samples else EMPTY

    def total(self) -> Counts:
        return self.carried + self.latest()

    def retire(self) -> None:
        self.carried = self.total()
        self.samples.clear()

    def absorb(self, counts: Counts) -> None:
        """Counts of a generation that ended elsewhere (a closed lane, a
        rule the kernel released) become part of this ledger's."""
        self.carried = self.carried + counts

    def retain(self, keys: Iterable[RuleKey]) -> None:
        """Forget what was carried for rules that are gone."""
        self.carried = self.carried.only(keys)

    def forget_live(self, keys: Iterable[RuleKey]) -> None:
        """Drop `keys` from the samples: their counts were taken elsewhere."""
        gone = set(keys)
        self.samples = [
            Sample(s.at, s.counts.only(k for k in s.counts.rules if k not in gone)) for s in self.samples
        ]

    def rates(self) -> Rates:
        """(pps, bps) per rule (destination None) and per output."""
        if len(self.samples) < 2:
            return {}
        before, now = self.samples
        dt = max(now.at - before.at, 1e-6)
        found: Rates = {}
        for key, c in now.counts.rules.items():
            prev = before.counts.rule(key)
            found[key, None] = _rate(c.packets - prev.packets, c.bytes - prev.bytes, dt)
            for dest, o in c.outputs.items():
                p = prev.output(dest)
                found[key, dest] = _rate(o.packets - p.packets, o.bytes - p.bytes, dt)
        return found


def add_rates(many: Iterable[Rates]) -> Rates:
    total: Rates = {}
    for rates in many:
        total = _add_maps(total, rates, Rate())
    return total


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} is not a count: {value!r}")
    return value


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"malformed stats reply: {what}")


def parse_stats(reply: object, rules: Mapping[int, RuleKey], outputs: Mapping[int, Destination]) -> Counts:
    """A worker's `stats` reply as counts, every value checked first:
    workers run unprivileged and parse hostile packets, so what they send is
    not trusted. Raises ValueError on anything malformed. Rules and outputs
    by identities no longer given out (a reply that crossed a reload) are
    left out."""
    try:
        _expect(isinstance(reply, dict), "not an object")
        assert isinstance(reply, dict)
        drops = reply["drops"]
        _expect(isinstance(drops, dict), "drops is not an object")
        counted: dict[RuleKey, RuleCounts] = {}
        _expect(isinstance(reply["rules"], list), "rules is not a list")
        for r in reply["rules"]:
            outs: dict[Destination, OutputCounts] = {}
            _expect(isinstance(r["outputs"], list), "outputs is not a list")
            for o in r["outputs"]:
                last_error = o["last_error"]
                _expect(isinstance(last_error, str), "last_error is not a string")
                sent = OutputCounts(
                    _count(o["packets"], "packets"),
                    _count(o["bytes"], "bytes"),
                    _count(o["errors"], "errors"),
                    last_error[:200],
                )
                dest = outputs.get(_count(o["output"], "output"))
                if dest is not None:
                    outs[dest] = sent
            counts = RuleCounts(
                _count(r["packets"], "packets"),
                _count(r["bytes"], "bytes"),
                _count(r["limited"], "limited"),
                outs,
                _count(r["looped"], "looped"),
                _count(r["expired"], "expired"),
            )
            key = rules.get(_count(r["rule"], "rule"))
            if key is not None:
                counted[key] = counts
        return Counts(
            _count(reply["received"], "received"),
            {k: _count(drops.get(k, 0), k) for k in DROP_REASONS},
            counted,
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed stats reply: {exc}") from None
