"""The counter model (mcrd.counters): counts adding up across generations, the
Ledger that carries them over worker restarts, rates from two samples, the
kernel's positional counts, and the checked parsing of a worker's stats reply."""

from __future__ import annotations

from typing import Any

import pytest

from mcrd.counters import (
    Counts,
    Ledger,
    OutputCounts,
    Rate,
    Rates,
    RuleCounts,
    add_rates,
    from_kernel,
    parse_stats,
)
from mcrd.packet import DROP_REASONS
from mcrd.rules import Destination, RuleKey

KEY_A = RuleKey("e0", "239.1.1.1", 5000, None)
KEY_B = RuleKey("e0", "239.1.1.2", 5000, "192.0.2.1")
OUT_1 = Destination("239.2.2.1", 6000, "e1", 1)
OUT_2 = Destination("198.51.100.2", 6000, None, 64)


def drops(**given: int) -> dict[str, int]:
    return {k: given.get(k, 0) for k in DROP_REASONS}


def one_rule(key: RuleKey, packets: int, octets: int, **outputs: tuple[int, int]) -> Counts:
    """Counts of one rule; outputs by name ("one", "two") as (packets, bytes)."""
    dests = {"one": OUT_1, "two": OUT_2}
    return Counts(
        packets,
        drops(),
        {
            key: RuleCounts(
                packets, octets, 0, {dests[n]: OutputCounts(p, b) for n, (p, b) in outputs.items()}
            )
        },
    )


# -- adding up -------------------------------------------------------------


def test_output_counts_add_across_generations() -> None:
    first = OutputCounts(10, 1000, 1, "ENOBUFS")
    second = OutputCounts(5, 500, 2, "EHOSTUNREACH")
    assert first + second == OutputCounts(15, 1500, 3, "EHOSTUNREACH")


def test_last_error_keeps_the_later_non_empty_one() -> None:
    failed = OutputCounts(1, 10, 1, "ENOBUFS")
    clean = OutputCounts(1, 10, 0, "")
    assert (failed + clean).last_error == "ENOBUFS"
    assert (clean + failed).last_error == "ENOBUFS"
    assert (failed + OutputCounts(last_error="EPERM")).last_error == "EPERM"
    assert (clean + clean).last_error == ""


def test_rule_counts_add_with_outputs_only_one_side_has() -> None:
    first = RuleCounts(10, 1000, 2, {OUT_1: OutputCounts(10, 1000)})
    second = RuleCounts(3, 300, 1, {OUT_1: OutputCounts(3, 300, 1, "x"), OUT_2: OutputCounts(3, 300)})
    total = first + second
    assert (total.packets, total.bytes, total.limited) == (13, 1300, 3)
    assert total.output(OUT_1) == OutputCounts(13, 1300, 1, "x")
    assert total.output(OUT_2) == OutputCounts(3, 300)
    assert RuleCounts().output(OUT_1) == OutputCounts()


def test_counts_add_drops_per_reason_and_rules_by_key() -> None:
    first = Counts(100, drops(truncated=1, unmatched=5), {KEY_A: RuleCounts(10, 100)})
    second = Counts(50, drops(unmatched=2, overflow=7), {KEY_B: RuleCounts(4, 40)})
    total = first + second
    assert total.received == 150
    assert total.drops == drops(truncated=1, unmatched=7, overflow=7)
    assert set(total.drops) == set(DROP_REASONS)
    assert total.rule(KEY_A) == RuleCounts(10, 100)
    assert total.rule(KEY_B) == RuleCounts(4, 40)


def test_counts_add_drops_a_side_lacks_as_zero() -> None:
    total = Counts(0, {"fragment": 3}, {}) + Counts(0, {}, {})
    assert total.drops == drops(fragment=3)


def test_counters_of_worker_generations_sum_packets_bytes_and_errors() -> None:
    """Ported from the old supervisor test: what each generation of a worker
    counted adds up, per rule and per output, errors included."""
    generations = [
        Counts(
            10,
            drops(malformed=1),
            {KEY_A: RuleCounts(10, 1000, 0, {OUT_1: OutputCounts(10, 1000, 1, "first")})},
        ),
        Counts(
            20,
            drops(malformed=2),
            {KEY_A: RuleCounts(20, 2000, 0, {OUT_1: OutputCounts(18, 1800, 2, "second")})},
        ),
        Counts(5, drops(), {KEY_A: RuleCounts(5, 500, 0, {OUT_1: OutputCounts(5, 500, 0, "")})}),
    ]
    total = Counts()
    for gen in generations:
        total = total + gen
    assert total.received == 35
    assert total.drops["malformed"] == 3
    rule = total.rule(KEY_A)
    assert (rule.packets, rule.bytes) == (35, 3500)
    assert rule.output(OUT_1) == OutputCounts(33, 3300, 3, "second")


def test_only_keeps_the_given_rules() -> None:
    counts = Counts(7, drops(fragment=1), {KEY_A: RuleCounts(1), KEY_B: RuleCounts(2)})
    kept = counts.only([KEY_B])
    assert set(kept.rules) == {KEY_B}
    assert (kept.received, kept.drops) == (7, drops(fragment=1))


# -- the ledger ------------------------------------------------------------


def test_record_keeps_the_last_two_samples() -> None:
    ledger = Ledger()
    for at, n in ((1.0, 1), (2.0, 2), (3.0, 3)):
        ledger.record(at, one_rule(KEY_A, n, n))
    assert [s.at for s in ledger.samples] == [2.0, 3.0]
    assert ledger.latest().rule(KEY_A).packets == 3
    assert ledger.total().rule(KEY_A).packets == 3  # samples are cumulative readings, not summed


def test_empty_ledger() -> None:
    ledger = Ledger()
    assert ledger.latest() == Counts()
    assert ledger.total() == Counts()
    assert ledger.rates() == {}


def test_retire_carries_the_latest_so_totals_never_go_back() -> None:
    ledger = Ledger()
    ledger.record(1.0, one_rule(KEY_A, 5, 50, one=(5, 50)))
    ledger.record(2.0, one_rule(KEY_A, 10, 100, one=(9, 90)))
    ledger.retire()  # the worker died
    assert ledger.samples == []
    assert ledger.total().rule(KEY_A).packets == 10
    # its successor starts counting from zero
    ledger.record(3.0, one_rule(KEY_A, 2, 20, one=(2, 20)))
    total = ledger.total().rule(KEY_A)
    assert (total.packets, total.bytes) == (12, 120)
    assert total.output(OUT_1) == OutputCounts(11, 110)
    assert ledger.total().received == 12
    # and no rate spans the restart
    assert ledger.rates() == {}


def test_retire_twice_does_not_count_twice() -> None:
    ledger = Ledger()
    ledger.record(1.0, one_rule(KEY_A, 5, 50))
    ledger.retire()
    ledger.retire()
    assert ledger.total().rule(KEY_A).packets == 5


def test_absorb_adds_to_what_is_carried() -> None:
    ledger = Ledger()
    ledger.record(1.0, one_rule(KEY_A, 5, 50))
    ledger.absorb(one_rule(KEY_A, 3, 30))
    ledger.absorb(one_rule(KEY_B, 1, 10))
    assert ledger.total().rule(KEY_A).packets == 8
    assert ledger.total().rule(KEY_B).packets == 1
    assert ledger.latest().rule(KEY_A).packets == 5  # the live reading is untouched


def test_retain_forgets_carried_counts_of_rules_that_are_gone() -> None:
    ledger = Ledger()
    ledger.absorb(one_rule(KEY_A, 5, 50) + one_rule(KEY_B, 7, 70))
    ledger.retain([KEY_B])
    assert KEY_A not in ledger.total().rules
    assert ledger.total().rule(KEY_B).packets == 7
    # a rule added again later starts from zero
    ledger.record(1.0, one_rule(KEY_A, 1, 10))
    assert ledger.total().rule(KEY_A).packets == 1


def test_forget_live_drops_rules_from_the_samples_only() -> None:
    ledger = Ledger()
    ledger.absorb(one_rule(KEY_A, 100, 1000))
    ledger.record(1.0, one_rule(KEY_A, 5, 50) + one_rule(KEY_B, 1, 10))
    ledger.record(2.0, one_rule(KEY_A, 6, 60) + one_rule(KEY_B, 2, 20))
    ledger.forget_live([KEY_A])
    assert all(KEY_A not in s.counts.rules for s in ledger.samples)
    assert [s.counts.rule(KEY_B).packets for s in ledger.samples] == [1, 2]
    assert [s.at for s in ledger.samples] == [1.0, 2.0]
    assert ledger.total().rule(KEY_A).packets == 100  # carried stays
    assert (KEY_A, None) not in ledger.rates()


# -- rates -----------------------------------------------------------------


def test_rates_over_two_samples() -> None:
    ledger = Ledger()
    ledger.record(10.0, one_rule(KEY_A, 100, 10_000, one=(100, 10_000), two=(50, 5_000)))
    ledger.record(12.0, one_rule(KEY_A, 300, 30_000, one=(300, 30_000), two=(50, 5_000)))
    rates = ledger.rates()
    assert rates[KEY_A, None] == Rate(100.0, 80_000.0)  # 200 packets, 20 kB over 2 s
    assert rates[KEY_A, OUT_1] == Rate(100.0, 80_000.0)
    assert rates[KEY_A, OUT_2] == Rate(0.0, 0.0)
    assert set(rates) == {(KEY_A, None), (KEY_A, OUT_1), (KEY_A, OUT_2)}


def test_rates_need_two_samples() -> None:
    ledger = Ledger()
    ledger.record(1.0, one_rule(KEY_A, 100, 1000))
    assert ledger.rates() == {}


def test_negative_deltas_clamp_to_zero() -> None:
    ledger = Ledger()
    ledger.record(1.0, one_rule(KEY_A, 100, 10_000, one=(100, 10_000)))
    ledger.record(2.0, one_rule(KEY_A, 40, 4_000, one=(40, 4_000)))  # a counter went back
    rates = ledger.rates()
    assert rates[KEY_A, None] == Rate(0.0, 0.0)
    assert rates[KEY_A, OUT_1] == Rate(0.0, 0.0)


def test_rate_of_a_rule_new_in_the_latest_sample_counts_from_zero() -> None:
    ledger = Ledger()
    ledger.record(1.0, Counts())
    ledger.record(2.0, one_rule(KEY_B, 10, 100))
    assert ledger.rates()[KEY_B, None] == Rate(10.0, 800.0)


def test_add_rates() -> None:
    lane1: Rates = {(KEY_A, None): Rate(10.0, 100.0), (KEY_A, OUT_1): Rate(10.0, 100.0)}
    lane2: Rates = {(KEY_A, None): Rate(5.0, 50.0), (KEY_B, None): Rate(1.0, 8.0)}
    assert add_rates([lane1, lane2]) == {
        (KEY_A, None): Rate(15.0, 150.0),
        (KEY_A, OUT_1): Rate(10.0, 100.0),
        (KEY_B, None): Rate(1.0, 8.0),
    }
    assert add_rates([]) == {}


# -- the kernel's counts ---------------------------------------------------


def test_from_kernel_maps_positions() -> None:
    counts = from_kernel(KEY_A, [OUT_1, OUT_2], [(10, 1000), (9, 900), (8, 800)])
    assert counts == RuleCounts(10, 1000, 0, {OUT_1: OutputCounts(9, 900), OUT_2: OutputCounts(8, 800)})


@pytest.mark.parametrize(
    ("kernel", "rule", "out1", "out2"),
    [
        ([], (0, 0), (0, 0), (0, 0)),
        ([(10, 1000)], (10, 1000), (0, 0), (0, 0)),
        ([(10, 1000), (9, 900)], (10, 1000), (9, 900), (0, 0)),
    ],
)
def test_from_kernel_too_short_pads_with_zero(
    kernel: list[tuple[int, int]], rule: tuple[int, int], out1: tuple[int, int], out2: tuple[int, int]
) -> None:
    counts = from_kernel(KEY_A, [OUT_1, OUT_2], kernel)
    assert (counts.packets, counts.bytes) == rule
    assert counts.output(OUT_1) == OutputCounts(*out1)
    assert counts.output(OUT_2) == OutputCounts(*out2)
    assert set(counts.outputs) == {OUT_1, OUT_2}


def test_from_kernel_too_long_ignores_the_extra() -> None:
    counts = from_kernel(KEY_A, [OUT_1], [(10, 1000), (9, 900), (8, 800), (7, 700)])
    assert counts == RuleCounts(10, 1000, 0, {OUT_1: OutputCounts(9, 900)})


# -- a worker's stats reply ------------------------------------------------

RULE_IDS = {1: KEY_A, 2: KEY_B}
OUTPUT_IDS = {7: OUT_1, 8: OUT_2}


def good_reply() -> dict[str, Any]:
    return {
        "received": 30,
        "drops": {"truncated": 1, "malformed": 0, "fragment": 2, "unmatched": 3, "overflow": 0},
        "rules": [
            {
                "rule": 1,
                "packets": 20,
                "bytes": 2000,
                "limited": 1,
                "looped": 4,
                "expired": 2,
                "outputs": [
                    {"output": 7, "packets": 20, "bytes": 2000, "errors": 0, "last_error": ""},
                    {"output": 8, "packets": 19, "bytes": 1900, "errors": 1, "last_error": "ENOBUFS"},
                ],
            },
            {"rule": 2, "packets": 4, "bytes": 40, "limited": 0, "looped": 0, "expired": 0, "outputs": []},
        ],
    }


def test_parse_stats_good_reply() -> None:
    counts = parse_stats(good_reply(), RULE_IDS, OUTPUT_IDS)
    assert counts == Counts(
        30,
        drops(truncated=1, fragment=2, unmatched=3),
        {
            KEY_A: RuleCounts(
                20,
                2000,
                1,
                {OUT_1: OutputCounts(20, 2000), OUT_2: OutputCounts(19, 1900, 1, "ENOBUFS")},
                looped=4,
                expired=2,
            ),
            KEY_B: RuleCounts(4, 40, 0, {}),
        },
    )


def test_parse_stats_leaves_out_unknown_rules_and_outputs() -> None:
    """A reply that crossed a reload names identities no longer given out."""
    counts = parse_stats(good_reply(), {1: KEY_A}, {8: OUT_2})
    assert set(counts.rules) == {KEY_A}
    assert set(counts.rule(KEY_A).outputs) == {OUT_2}


def test_parse_stats_cuts_a_long_last_error() -> None:
    reply = good_reply()
    reply["rules"][0]["outputs"][0]["last_error"] = "x" * 1000
    counts = parse_stats(reply, RULE_IDS, OUTPUT_IDS)
    assert counts.rule(KEY_A).output(OUT_1).last_error == "x" * 200


def test_parse_stats_missing_drop_reasons_are_zero() -> None:
    reply = good_reply()
    reply["drops"] = {"fragment": 4}
    assert parse_stats(reply, RULE_IDS, OUTPUT_IDS).drops == drops(fragment=4)


def _with(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    reply = good_reply()
    target: Any = reply
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return reply


def _without(path: tuple[str | int, ...]) -> dict[str, Any]:
    reply = good_reply()
    target: Any = reply
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return reply


MALFORMED: dict[str, object] = {
    "not a dict": "received",
    "a list": [],
    "None": None,
    "missing received": _without(("received",)),
    "missing drops": _without(("drops",)),
    "missing rules": _without(("rules",)),
    "missing rule id": _without(("rules", 0, "rule")),
    "missing rule packets": _without(("rules", 0, "packets")),
    "missing limited": _without(("rules", 0, "limited")),
    "missing looped": _without(("rules", 0, "looped")),
    "negative looped": _with(("rules", 0, "looped"), -1),
    "missing expired": _without(("rules", 0, "expired")),
    "missing outputs": _without(("rules", 0, "outputs")),
    "missing output id": _without(("rules", 0, "outputs", 0, "output")),
    "missing last_error": _without(("rules", 0, "outputs", 0, "last_error")),
    "string received": _with(("received",), "30"),
    "string rule packets": _with(("rules", 0, "packets"), "20"),
    "string output bytes": _with(("rules", 0, "outputs", 1, "bytes"), "1900"),
    "float count": _with(("rules", 0, "bytes"), 2000.0),
    "negative received": _with(("received",), -1),
    "negative output packets": _with(("rules", 0, "outputs", 0, "packets"), -5),
    "negative drop": _with(("drops", "unmatched"), -3),
    "negative rule id": _with(("rules", 0, "rule"), -1),
    "bool received": _with(("received",), True),
    "bool limited": _with(("rules", 0, "limited"), False),
    "bool drop": _with(("drops", "overflow"), True),
    "None errors": _with(("rules", 0, "outputs", 1, "errors"), None),
    "None last_error": _with(("rules", 0, "outputs", 1, "last_error"), None),
    "int last_error": _with(("rules", 0, "outputs", 1, "last_error"), 5),
    "rules an int": _with(("rules",), 3),
    "rules a dict of rules": _with(("rules",), {"1": good_reply()["rules"][0]}),
    "rules a string": _with(("rules",), "rules"),
    "rule not an object": _with(("rules", 0), [1, 20, 2000]),
    "output not an object": _with(("rules", 0, "outputs", 0), 7),
    "drops a list": _with(("drops",), [0, 0, 0, 0, 0]),
    "drops a number": _with(("drops",), 0),
}


@pytest.mark.parametrize("reply", list(MALFORMED.values()), ids=list(MALFORMED))
def test_parse_stats_refuses_malformed(reply: object) -> None:
    with pytest.raises(ValueError, match=r"malformed stats reply|is not a count"):
        parse_stats(reply, RULE_IDS, OUTPUT_IDS)


@pytest.mark.parametrize(
    "reply",
    [_with(("rules",), {}), _with(("rules",), ""), _with(("rules", 1, "outputs"), {})],
    ids=["rules an empty object", "rules an empty string", "outputs an empty object"],
)
def test_parse_stats_refuses_empty_non_list_rules(reply: object) -> None:
    with pytest.raises(ValueError):
        parse_stats(reply, RULE_IDS, OUTPUT_IDS)
