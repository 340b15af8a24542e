"""relay.delivery.planner: MX answer -> ordered hosts (RFC 5321 §5.1, RFC 7505)."""

from __future__ import annotations

import itertools
import random

from relay.delivery.planner import MAX_MX_HOSTS, MxHost, Plan, order_addresses, plan_hosts
from relay.lookup.results import AnswerKind, DnsAnswer, MxRecord, Security


def mx_answer(
    *records: tuple[int, str], security: Security = Security.SECURE
) -> DnsAnswer[MxRecord]:
    return DnsAnswer(
        "example.org",
        AnswerKind.DATA,
        security,
        tuple(MxRecord(pref, name) for pref, name in records),
    )


def names(plan: Plan) -> list[str]:
    return [h.name for h in plan.hosts]


def test_ordered_by_preference() -> None:
    answer = mx_answer((30, "c.example.org"), (10, "a.example.org"), (20, "b.example.org"))
    plan = plan_hosts("example.org", answer, random.Random(1))
    assert plan == Plan(
        (
            MxHost("a.example.org", 10),
            MxHost("b.example.org", 20),
            MxHost("c.example.org", 30),
        )
    )
    assert not plan.null_mx and not plan.no_domain


def test_equal_preferences_reach_every_permutation_and_stay_grouped() -> None:
    answer = mx_answer(
        (10, "a.example.org"),
        (10, "b.example.org"),
        (10, "c.example.org"),
        (5, "first.example.org"),
        (20, "last.example.org"),
    )
    seen = set()
    for seed in range(200):
        got = names(plan_hosts("example.org", answer, random.Random(seed)))
        assert got[0] == "first.example.org"
        assert got[-1] == "last.example.org"
        seen.add(tuple(got[1:4]))
    assert seen == set(itertools.permutations(["a.example.org", "b.example.org", "c.example.org"]))


def test_shuffle_is_determined_by_the_rng() -> None:
    answer = mx_answer(*((10, f"mx{i}.example.org") for i in range(8)))
    first = names(plan_hosts("example.org", answer, random.Random(42)))
    again = names(plan_hosts("example.org", answer, random.Random(42)))
    assert first == again
    assert sorted(first) == [f"mx{i}.example.org" for i in range(8)]


def test_answer_records_are_not_mutated() -> None:
    answer = mx_answer((10, "b.example.org"), (10, "a.example.org"))
    before = answer.records
    for seed in range(20):
        plan_hosts("example.org", answer, random.Random(seed))
    assert answer.records == before


def test_duplicates_removed() -> None:
    answer = mx_answer(
        (10, "a.example.org"),
        (10, "a.example.org"),
        (20, "b.example.org"),
        (20, "b.example.org"),
    )
    plan = plan_hosts("example.org", answer, random.Random(0))
    assert plan.hosts == (MxHost("a.example.org", 10), MxHost("b.example.org", 20))


def test_host_listed_at_two_preferences_is_tried_once_at_the_better_one() -> None:
    answer = mx_answer((20, "a.example.org"), (10, "b.example.org"), (10, "a.example.org"))
    for seed in range(10):
        plan = plan_hosts("example.org", answer, random.Random(seed))
        assert sorted(plan.hosts, key=lambda h: h.name) == [
            MxHost("a.example.org", 10),
            MxHost("b.example.org", 10),
        ]


def test_implicit_mx_on_nodata() -> None:
    for security in Security:
        answer: DnsAnswer[MxRecord] = DnsAnswer("example.org", AnswerKind.NODATA, security)
        assert plan_hosts("example.org", answer) == Plan((MxHost("example.org", 0, implicit=True),))


def test_null_mx() -> None:
    plan = plan_hosts("example.org", mx_answer((0, "")))
    assert plan == Plan((), null_mx=True)


def test_nxdomain() -> None:
    for security in Security:
        answer: DnsAnswer[MxRecord] = DnsAnswer("example.org", AnswerKind.NXDOMAIN, security)
        assert plan_hosts("example.org", answer) == Plan((), no_domain=True)


def test_at_most_max_mx_hosts_are_planned_the_most_preferred_ones() -> None:
    # F3: a 3,000-host MX RRset must not tie up a delivery slot for hours.
    answer = mx_answer(*((i, f"mx{i}.example.org") for i in range(3000, 0, -1)))
    plan = plan_hosts("example.org", answer, random.Random(1))
    assert MAX_MX_HOSTS == 10
    assert names(plan) == [f"mx{i}.example.org" for i in range(1, 11)]
    assert plan.dropped == 2990


def test_a_cut_inside_one_preference_keeps_a_random_subset() -> None:
    answer = mx_answer((5, "first.example.org"), *((10, f"mx{i}.example.org") for i in range(20)))
    seen: set[str] = set()
    for seed in range(50):
        plan = plan_hosts("example.org", answer, random.Random(seed))
        assert len(plan.hosts) == MAX_MX_HOSTS and plan.dropped == 11
        assert plan.hosts[0].name == "first.example.org"
        seen.update(names(plan)[1:])
    assert len(seen) == 20  # every host of the group gets its turn across attempts


def test_up_to_max_mx_hosts_nothing_is_dropped() -> None:
    answer = mx_answer(*((10, f"mx{i}.example.org") for i in range(MAX_MX_HOSTS)))
    plan = plan_hosts("example.org", answer, random.Random(1))
    assert (len(plan.hosts), plan.dropped) == (MAX_MX_HOSTS, 0)


def test_a_configured_host_limit_replaces_max_mx_hosts() -> None:
    answer = mx_answer(*((i, f"mx{i}.example.org") for i in range(1, 21)))
    plan = plan_hosts("example.org", answer, random.Random(1), limit=3)
    assert names(plan) == ["mx1.example.org", "mx2.example.org", "mx3.example.org"]
    assert plan.dropped == 17


# -- address order (delivery.address_preference, Postfix smtp_address_preference) --------

MIXED = ("192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2")


def test_any_keeps_the_order_dns_gave() -> None:
    assert order_addresses(MIXED, "any") == MIXED
    assert order_addresses(("2001:db8::1", "192.0.2.1"), "any") == ("2001:db8::1", "192.0.2.1")


def test_ipv6_first_keeps_each_family_in_order() -> None:
    assert order_addresses(MIXED, "ipv6") == (
        "2001:db8::1",
        "2001:db8::2",
        "192.0.2.1",
        "192.0.2.2",
    )


def test_ipv4_first() -> None:
    given = ("2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2")
    assert order_addresses(given, "ipv4") == (
        "192.0.2.1",
        "192.0.2.2",
        "2001:db8::1",
        "2001:db8::2",
    )


def test_one_family_or_none_is_unchanged() -> None:
    for preference in ("any", "ipv6", "ipv4"):
        assert order_addresses((), preference) == ()
        assert order_addresses(("192.0.2.1",), preference) == ("192.0.2.1",)
        assert order_addresses(("2001:db8::1",), preference) == ("2001:db8::1",)
