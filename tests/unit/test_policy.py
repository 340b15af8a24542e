"""relay.dane.policy: the routing decision table, against a golden file and by its invariants.

The golden file tests/data/dane_policy.tsv is the rule table expanded to every combination
of (level, MX status, address status, TLSA state, insecure_mx_policy). After a deliberate
change to the rules, rewrite it with `.venv/bin/python tests/unit/test_policy.py --write`
and review the diff line by line.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from relay.config import INSECURE_MX_POLICIES, TLS_LEVELS
from relay.dane import policy
from relay.dane.policy import (
    DANE_LEVELS,
    PKIX_LEVELS,
    POLICY_TABLE,
    RULES,
    Action,
    AddressStatus,
    Decision,
    MxStatus,
    PolicyKey,
    Rule,
    TlsaState,
    TlsRequirement,
    decide,
    expand_rules,
    wants_tlsa,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "dane_policy.tsv"
COLUMNS = [
    "level", "mx", "addresses", "tlsa", "insecure_mx_policy", "action", "tls", "reason", "rfc",
]  # fmt: skip
HEADER = """\
# Golden routing decision table (relay.dane.policy): one row per combination of
# (level, MX status, address status, TLSA state, insecure_mx_policy), in that order.
# action: dane (use the host, DANE required) / no_dane (use it, TLS as in column tls) /
# skip_host (try the next MX) / defer_domain. Rewrite after a reviewed rule change with
#   .venv/bin/python tests/unit/test_policy.py --write
"""

ALL_KEYS: list[PolicyKey] = list(
    itertools.product(TLS_LEVELS, MxStatus, AddressStatus, TlsaState, INSECURE_MX_POLICIES)
)
SECURE_TLSA = {TlsaState.SECURE_USABLE, TlsaState.SECURE_UNUSABLE, TlsaState.SECURE_MALFORMED}


def render_row(key: PolicyKey, decision: Decision) -> str:
    level, mx, addresses, tlsa, insecure_mx = key
    tls = decision.requirement.value if decision.requirement else "-"
    return "\t".join(
        [
            level,
            mx.value,
            addresses.value,
            tlsa.value,
            insecure_mx,
            decision.action.value,
            tls,
            decision.reason,
            decision.rfc,
        ]
    )


def render_table() -> list[str]:
    return ["\t".join(COLUMNS)] + [render_row(key, POLICY_TABLE[key]) for key in ALL_KEYS]


def golden_lines() -> list[str]:
    return [
        line
        for line in GOLDEN.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]


# -- the whole table ------------------------------------------------------------------------


def test_table_matches_golden_file() -> None:
    expected = golden_lines()
    actual = render_table()
    assert expected[0] == actual[0]
    # Compare row by row so that a failure names the combinations that changed.
    changed = [(e, a) for e, a in zip(expected, actual, strict=True) if e != a]
    assert changed == []


def test_golden_file_has_one_row_per_combination() -> None:
    keys = [tuple(line.split("\t")[:5]) for line in golden_lines()[1:]]
    assert len(keys) == len(set(keys)) == 7 * 3 * 4 * 7 * 3 == len(ALL_KEYS)


def test_table_covers_every_combination() -> None:
    assert set(POLICY_TABLE) == set(ALL_KEYS)


def test_levels_and_policies_match_the_configuration() -> None:
    assert policy.LEVELS == TLS_LEVELS
    assert policy.INSECURE_MX_POLICIES == INSECURE_MX_POLICIES


def test_overlapping_rules_are_refused() -> None:
    extra = Rule("none", "secure", "secure", "*", "*", RULES[0].decision)
    with pytest.raises(ValueError, match="overlap"):
        expand_rules((*RULES, extra))


def test_missing_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="combination"):
        expand_rules(RULES[1:])


def test_unknown_values_in_a_rule_are_refused() -> None:
    bad = Rule("fortify", "secure", "secure", "*", "*", RULES[0].decision)
    with pytest.raises(ValueError, match="unknown level"):
        expand_rules((bad,))


@pytest.mark.parametrize("decision", sorted(set(POLICY_TABLE.values()), key=repr), ids=repr)
def test_every_decision_is_consistent_and_cites_its_source(decision: Decision) -> None:
    assert decision.reason and decision.why
    assert decision.rfc.startswith(("RFC ", "Postfix "))
    match decision.action:
        case Action.DANE:
            assert decision.requirement is TlsRequirement.DANE
        case Action.NO_DANE:
            assert decision.requirement in (
                TlsRequirement.NONE,
                TlsRequirement.MAY,
                TlsRequirement.ENCRYPT,
                TlsRequirement.VERIFY,
                TlsRequirement.SECURE,
            )
        case Action.SKIP_HOST | Action.DEFER_DOMAIN:
            assert decision.requirement is None


# -- invariants over every combination -------------------------------------------------------


def test_mx_lookup_failure_always_defers_the_domain() -> None:
    """RFC 7672 §2.1, §2.2.1: never fall back to the domain's own address."""
    for key, decision in POLICY_TABLE.items():
        if key[1] is MxStatus.FAILED:
            assert decision.action is Action.DEFER_DOMAIN, key
        else:
            assert decision.action is not Action.DEFER_DOMAIN, key


def test_a_host_without_usable_addresses_is_always_skipped() -> None:
    for (level, mx, addresses, tlsa, imp), decision in POLICY_TABLE.items():
        if mx is not MxStatus.FAILED and addresses in (AddressStatus.FAILED, AddressStatus.NONE):
            assert decision.action is Action.SKIP_HOST, (level, mx, addresses, tlsa, imp)


def test_tlsa_lookup_failure_never_leads_to_delivery_without_dane() -> None:
    """RFC 7672 §2.1: a failed TLSA lookup skips the host at every level that looks TLSA up."""
    for (level, mx, addresses, tlsa, imp), decision in POLICY_TABLE.items():
        if level in DANE_LEVELS and tlsa is TlsaState.LOOKUP_FAILED:
            assert decision.action in (Action.SKIP_HOST, Action.DEFER_DOMAIN)
            if addresses is AddressStatus.SECURE and mx is not MxStatus.FAILED:
                assert decision.reason == "tlsa_lookup", (level, mx, imp)


def test_dane_levels_never_yield_plaintext_only() -> None:
    for key, decision in POLICY_TABLE.items():
        if key[0] in DANE_LEVELS:
            assert decision.requirement is not TlsRequirement.NONE, key


def test_pkix_levels_authenticate_and_never_use_tlsa() -> None:
    """Postfix TLS_README: verify/secure are PKIX levels; TLSA plays no part in them."""
    for (level, mx, addresses, tlsa, imp), decision in POLICY_TABLE.items():
        if level not in PKIX_LEVELS:
            continue
        assert not wants_tlsa(level, addresses)
        assert decision == decide(level, mx, addresses, TlsaState.NOT_LOOKED_UP, "dane")
        if decision.action is Action.NO_DANE:
            expected = TlsRequirement.VERIFY if level == "verify" else TlsRequirement.SECURE
            assert decision.requirement is expected, (level, mx, addresses, tlsa, imp)


def test_dane_only_never_uses_a_host_without_dane() -> None:
    for key, decision in POLICY_TABLE.items():
        if key[0] == "dane-only":
            assert decision.action is not Action.NO_DANE, key


def test_dane_needs_secure_addresses_and_secure_usable_tlsa() -> None:
    """RFC 7672 §2.2.2/§2.2.3: DANE only through secure addresses and secure usable TLSA."""
    for (level, mx, addresses, tlsa, _imp), decision in POLICY_TABLE.items():
        if decision.action is Action.DANE:
            assert level in DANE_LEVELS
            assert addresses is AddressStatus.SECURE and tlsa is TlsaState.SECURE_USABLE
            assert mx is not MxStatus.FAILED
            assert decision.reason == ("dane" if mx is MxStatus.SECURE else "insecure_mx")


def test_insecure_mx_policy_matters_only_for_secure_tlsa_via_an_insecure_mx_at_level_dane() -> None:
    for level, mx, addresses, tlsa in itertools.product(
        TLS_LEVELS, MxStatus, AddressStatus, TlsaState
    ):
        by_policy = {decide(level, mx, addresses, tlsa, imp) for imp in INSECURE_MX_POLICIES}
        relevant = (
            level == "dane"
            and mx is MxStatus.INSECURE
            and addresses is AddressStatus.SECURE
            and tlsa in SECURE_TLSA
        )
        assert (len(by_policy) > 1) is relevant, (level, mx, addresses, tlsa)


def test_skip_and_defer_reasons_are_a_closed_set() -> None:
    reasons = {
        d.reason
        for d in POLICY_TABLE.values()
        if d.action in (Action.SKIP_HOST, Action.DEFER_DOMAIN)
    }
    assert reasons == {
        "mx_lookup",
        "address_lookup",
        "no_address",
        "tlsa_lookup",
        "tlsa_malformed",
        "dane_required",
    }


# -- the acceptance table, written out by hand -----------------------------------------------

SEC, INS, FAIL = "secure", "insecure", "failed"
DANE, USE, SKIP, DEFER = Action.DANE, Action.NO_DANE, Action.SKIP_HOST, Action.DEFER_DOMAIN
MAY, ENCRYPT = TlsRequirement.MAY, TlsRequirement.ENCRYPT


@pytest.mark.parametrize(
    ("level", "mx", "addresses", "tlsa", "imp", "action", "requirement", "reason"),
    [
        # level dane
        ("dane", SEC, SEC, "secure_usable", "dane", DANE, TlsRequirement.DANE, "dane"),
        ("dane", INS, SEC, "secure_usable", "dane", DANE, TlsRequirement.DANE, "insecure_mx"),
        ("dane", INS, SEC, "secure_usable", "encrypt", USE, ENCRYPT, "insecure_mx"),
        ("dane", INS, SEC, "secure_usable", "may", USE, MAY, "insecure_mx"),
        ("dane", INS, SEC, "secure_unusable", "dane", USE, ENCRYPT, "tlsa_unusable"),
        ("dane", INS, SEC, "secure_unusable", "may", USE, MAY, "insecure_mx"),
        ("dane", SEC, SEC, "secure_unusable", "may", USE, ENCRYPT, "tlsa_unusable"),
        ("dane", SEC, SEC, "secure_malformed", "dane", SKIP, None, "tlsa_malformed"),
        ("dane", INS, SEC, "secure_malformed", "encrypt", USE, ENCRYPT, "insecure_mx"),
        ("dane", SEC, SEC, "secure_none", "dane", USE, MAY, "no_tlsa"),
        ("dane", SEC, SEC, "insecure", "dane", USE, MAY, "tlsa_insecure"),
        ("dane", SEC, SEC, "lookup_failed", "dane", SKIP, None, "tlsa_lookup"),
        ("dane", INS, SEC, "lookup_failed", "may", SKIP, None, "tlsa_lookup"),
        ("dane", SEC, INS, "not_looked_up", "dane", USE, MAY, "addresses_insecure"),
        ("dane", SEC, FAIL, "not_looked_up", "dane", SKIP, None, "address_lookup"),
        ("dane", SEC, "none", "not_looked_up", "dane", SKIP, None, "no_address"),
        ("dane", FAIL, "none", "not_looked_up", "dane", DEFER, None, "mx_lookup"),
        # level dane-only
        ("dane-only", SEC, SEC, "secure_usable", "dane", DANE, TlsRequirement.DANE, "dane"),
        ("dane-only", INS, SEC, "secure_usable", "may", DANE, TlsRequirement.DANE, "insecure_mx"),
        ("dane-only", SEC, SEC, "secure_none", "dane", SKIP, None, "dane_required"),
        ("dane-only", SEC, SEC, "secure_unusable", "dane", SKIP, None, "dane_required"),
        ("dane-only", SEC, INS, "not_looked_up", "dane", SKIP, None, "dane_required"),
        ("dane-only", SEC, SEC, "lookup_failed", "dane", SKIP, None, "tlsa_lookup"),
        ("dane-only", FAIL, SEC, "secure_usable", "dane", DEFER, None, "mx_lookup"),
        # levels that ignore TLSA
        ("encrypt", INS, INS, "not_looked_up", "dane", USE, ENCRYPT, "level"),
        ("may", SEC, SEC, "not_looked_up", "dane", USE, MAY, "level"),
        ("none", SEC, SEC, "not_looked_up", "dane", USE, TlsRequirement.NONE, "level"),
        ("none", SEC, "none", "not_looked_up", "dane", SKIP, None, "no_address"),
        ("may", FAIL, SEC, "not_looked_up", "dane", DEFER, None, "mx_lookup"),
    ],
)
def test_decide(
    level: str,
    mx: str,
    addresses: str,
    tlsa: str,
    imp: str,
    action: Action,
    requirement: TlsRequirement | None,
    reason: str,
) -> None:
    decision = decide(level, MxStatus(mx), AddressStatus(addresses), TlsaState(tlsa), imp)
    assert (decision.action, decision.requirement, decision.reason) == (
        action,
        requirement,
        reason,
    )


def test_decide_reads_the_table() -> None:
    for key, decision in POLICY_TABLE.items():
        assert decide(*key) is decision


@pytest.mark.parametrize(
    ("level", "imp"), [("fortify", "dane"), ("dane", "verify")], ids=["level", "policy"]
)
def test_decide_unknown_values(level: str, imp: str) -> None:
    with pytest.raises(KeyError):
        decide(level, MxStatus.SECURE, AddressStatus.SECURE, TlsaState.SECURE_USABLE, imp)


@pytest.mark.parametrize(
    ("level", "addresses", "expected"),
    [
        ("dane", AddressStatus.SECURE, True),
        ("dane-only", AddressStatus.SECURE, True),
        ("dane", AddressStatus.INSECURE, False),  # RFC 7672 §2.2.2
        ("dane-only", AddressStatus.INSECURE, False),
        ("dane", AddressStatus.FAILED, False),
        ("dane", AddressStatus.NONE, False),
        ("none", AddressStatus.SECURE, False),
        ("may", AddressStatus.SECURE, False),
        ("encrypt", AddressStatus.SECURE, False),
    ],
)
def test_wants_tlsa(level: str, addresses: AddressStatus, expected: bool) -> None:
    assert wants_tlsa(level, addresses) is expected


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (rewrites {GOLDEN})")
    GOLDEN.write_text(HEADER + "\n".join(render_table()) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: {len(ALL_KEYS)} rows")
