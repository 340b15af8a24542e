"""Routing decision table (RFC 7672 §2.2): what to do with one MX host. Pure, no I/O.

Input: the destination's security level, the MX RRset status, the host's address status,
its TLSA state and `insecure_mx_policy` (Postfix `smtp_tls_dane_insecure_mx_policy`).
Output: a `Decision` — use the host with DANE, use it without DANE (with TLS requirement
none/may/encrypt), skip the host (try the next MX), or defer the whole domain.

Theory of operation:
    `RULES` is the table, written as literal rows. A column holds one value, several
    values joined by "|", or "*" for any value. Every combination of inputs matches exactly
    one row: `POLICY_TABLE` expands the rows into one `Decision` per combination at import
    time and refuses a gap or an overlap (a `ValueError` at import, so a broken table never
    ships). tests/data/dane_policy.tsv holds the expanded table as a golden file.

    The caller (relay.delivery.route) turns DNS answers into these inputs. A resolver that
    does not validate makes every answer insecure before the table is consulted, so the
    table needs no column for it (RFC 7672 §2.1).

Guarantees: `decide` never raises for valid inputs, and a deferral is a value. For the
levels that use DANE, no row yields plaintext, and a failed TLSA lookup never yields a
host without DANE (it is skipped). Does not: look anything up, log, or raise SMTP errors.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "DANE_LEVELS",
    "INSECURE_MX_POLICIES",
    "LEVELS",
    "PKIX_LEVELS",
    "POLICY_TABLE",
    "RULES",
    "Action",
    "AddressStatus",
    "Decision",
    "MxStatus",
    "PolicyKey",
    "Rule",
    "TlsRequirement",
    "TlsaState",
    "decide",
    "expand_rules",
    "wants_tlsa",
]

# Same values as relay.config.TLS_LEVELS / INSECURE_MX_POLICIES (a unit test checks it);
# repeated here so that this pure module depends on nothing.
LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "verify", "secure")
DANE_LEVELS = ("dane", "dane-only")
# Levels that authenticate the peer with PKIX (WebPKI trust store or tls.ca_file), no TLSA.
PKIX_LEVELS = ("verify", "secure")
INSECURE_MX_POLICIES = ("dane", "encrypt", "may")


class TlsRequirement(enum.Enum):
    NONE = "none"  # plaintext
    MAY = "may"  # opportunistic: STARTTLS if offered, plaintext if the handshake fails
    ENCRYPT = "encrypt"  # TLS mandatory, not authenticated
    DANE = "dane"  # TLS mandatory, peer chain must match a usable TLSA record
    VERIFY = "verify"  # TLS mandatory, PKIX chain, certificate names the MX host
    SECURE = "secure"  # TLS mandatory, PKIX chain, certificate names the next-hop domain


class MxStatus(enum.Enum):
    SECURE = "secure"  # validated MX RRset (or the implicit MX: the next-hop domain itself)
    INSECURE = "insecure"  # provably unsigned, or the resolver does not validate
    FAILED = "failed"  # SERVFAIL/bogus/timeout: never read as "no MX"


class AddressStatus(enum.Enum):
    SECURE = "secure"  # validated A/AAAA (and every CNAME leading to them)
    INSECURE = "insecure"
    FAILED = "failed"  # the lookup failed for every address family
    NONE = "none"  # NXDOMAIN/NODATA: the host has no address


class TlsaState(enum.Enum):
    NOT_LOOKED_UP = "not_looked_up"  # level does not use DANE, or host addresses insecure
    LOOKUP_FAILED = "lookup_failed"  # SERVFAIL/bogus/timeout
    INSECURE = "insecure"  # TLSA RRset not validated
    SECURE_NONE = "secure_none"  # validated NODATA/NXDOMAIN
    SECURE_UNUSABLE = "secure_unusable"  # validated, but no usable record
    SECURE_MALFORMED = "secure_malformed"  # validated, none usable, some DANE records malformed
    SECURE_USABLE = "secure_usable"  # validated, at least one usable record


class Action(enum.Enum):
    DANE = "dane"  # use the host; the peer must authenticate against the TLSA records
    NO_DANE = "no_dane"  # use the host with TLS requirement none, may or encrypt
    SKIP_HOST = "skip_host"  # do not use this host; try the next MX
    DEFER_DOMAIN = "defer_domain"  # try no host at all; the domain is deferred


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    requirement: TlsRequirement | None  # None when the host is not used
    reason: str  # token for logs; for SKIP_HOST/DEFER_DOMAIN it names the failure
    rfc: str  # the section (or Postfix parameter) this row follows
    why: str  # one short sentence, for the log and `dane-relay lookup`


PolicyKey = tuple[str, MxStatus, AddressStatus, TlsaState, str]


@dataclass(frozen=True, slots=True)
class Rule:
    """One literal row: each column is a value, "a|b" alternatives, or "*" (any)."""

    level: str
    mx: str
    addresses: str
    tlsa: str
    insecure_mx: str
    decision: Decision


_R = TlsRequirement


def _dane(reason: str, rfc: str, why: str) -> Decision:
    return Decision(Action.DANE, _R.DANE, reason, rfc, why)


def _use(req: TlsRequirement, reason: str, rfc: str, why: str) -> Decision:
    return Decision(Action.NO_DANE, req, reason, rfc, why)


def _skip(reason: str, rfc: str, why: str) -> Decision:
    return Decision(Action.SKIP_HOST, None, reason, rfc, why)


def _defer(reason: str, rfc: str, why: str) -> Decision:
    return Decision(Action.DEFER_DOMAIN, None, reason, rfc, why)


_ANY = "*"
_OK = "secure|insecure"  # an MX or address lookup that answered
_SECURE_TLSA = "secure_usable|secure_unusable|secure_malformed"
_NOT_FAILED = "not_looked_up|insecure|secure_none|" + _SECURE_TLSA  # every TLSA state but a failure

# fmt: off
RULES: tuple[Rule, ...] = (
    # --- every level: lookups that did not answer ------------------------------------------
    # RFC 7672 §2.1, §2.2.1: a failed MX lookup defers the domain; never its own address.
    Rule("*", "failed", "*", "*", "*", _defer(
        "mx_lookup", "RFC 7672 §2.1, §2.2.1",
        "MX lookup failed: defer, never fall back to the domain's address")),
    # RFC 7672 §2.1: a failed address lookup is not a denial; this host cannot be used.
    Rule("*", _OK, "failed", "*", "*", _skip(
        "address_lookup", "RFC 7672 §2.1", "address lookup failed: try the next MX host")),
    # RFC 5321 §5.1: a host name without addresses is skipped.
    Rule("*", _OK, "none", "*", "*", _skip(
        "no_address", "RFC 5321 §5.1", "host has no address: try the next MX host")),

    # --- levels that never look up TLSA --------------------------------------------------
    # RFC 3207 §4.1: the client chooses the protection it needs; here none.
    Rule("none", _OK, _OK, "*", "*", _use(
        _R.NONE, "level", "RFC 3207 §4.1", "level none: plaintext")),
    # RFC 7435 §3: opportunistic security, unauthenticated, with a plaintext fallback.
    Rule("may", _OK, _OK, "*", "*", _use(
        _R.MAY, "level", "RFC 7435 §3", "level may: opportunistic TLS")),
    # RFC 3207 §4.1: TLS required (QUIT if not offered), not authenticated.
    Rule("encrypt", _OK, _OK, "*", "*", _use(
        _R.ENCRYPT, "level", "RFC 3207 §4.1", "level encrypt: TLS required")),
    # Postfix TLS_README "verify": PKIX, smtp_tls_verify_cert_match = hostname; no TLSA.
    Rule("verify", _OK, _OK, "*", "*", _use(
        _R.VERIFY, "level", "Postfix smtp_tls_verify_cert_match",
        "level verify: TLS required, PKIX chain, certificate names the MX host")),
    # Postfix TLS_README "secure": PKIX, smtp_tls_secure_cert_match = nexthop, dot-nexthop.
    Rule("secure", _OK, _OK, "*", "*", _use(
        _R.SECURE, "level", "Postfix smtp_tls_secure_cert_match",
        "level secure: TLS required, PKIX chain, certificate names the next-hop domain")),

    # --- level dane --------------------------------------------------------------------------
    # RFC 7672 §2.2.2: DANE applies only when the host's addresses are secure.
    Rule("dane", _OK, "insecure", _NOT_FAILED, "*", _use(
        _R.MAY, "addresses_insecure", "RFC 7672 §2.2.2",
        "host addresses insecure: TLSA not used, opportunistic TLS")),
    # RFC 7672 §2.2.3: no TLSA RRset was obtained, so DANE cannot apply.
    Rule("dane", _OK, "secure", "not_looked_up", "*", _use(
        _R.MAY, "tlsa_not_looked_up", "RFC 7672 §2.2.3",
        "TLSA not looked up: opportunistic TLS")),
    # RFC 7672 §2.1, §2.2.3: a failed TLSA lookup is never "no TLSA": skip the host (even
    # with insecure addresses, where no lookup should have been made: fail closed).
    Rule("dane", _OK, _OK, "lookup_failed", "*", _skip(
        "tlsa_lookup", "RFC 7672 §2.1, §2.2.3", "TLSA lookup failed: try the next MX host")),
    # RFC 7672 §2.2.3: insecure TLSA records are ignored.
    Rule("dane", _OK, "secure", "insecure", "*", _use(
        _R.MAY, "tlsa_insecure", "RFC 7672 §2.2.3", "TLSA insecure: opportunistic TLS")),
    # RFC 7672 §2.2.3: secure denial of TLSA: no DANE for this host.
    Rule("dane", _OK, "secure", "secure_none", "*", _use(
        _R.MAY, "no_tlsa", "RFC 7672 §2.2.3", "no TLSA records: opportunistic TLS")),
    # RFC 7672 §2.2: secure usable TLSA via a secure MX RRset: authenticated TLS, "verified".
    Rule("dane", "secure", "secure", "secure_usable", "*", _dane(
        "dane", "RFC 7672 §2.2", "secure usable TLSA: DANE required")),
    # RFC 7672 §3.1.3: secure TLSA, none usable: TLS required without authentication.
    Rule("dane", "secure", "secure", "secure_unusable", "*", _use(
        _R.ENCRYPT, "tlsa_unusable", "RFC 7672 §3.1.3",
        "TLSA records all unusable: TLS required, not authenticated")),
    # RFC 7671 §4.1 (project rule): only malformed DANE records is a publishing error.
    Rule("dane", "secure", "secure", "secure_malformed", "*", _skip(
        "tlsa_malformed", "RFC 7671 §4.1", "TLSA records malformed: try the next MX host")),
    # RFC 7672 §2.2.1 (Postfix insecure_mx_policy=dane): DANE via an insecure MX, "trusted".
    Rule("dane", "insecure", "secure", "secure_usable", "dane", _dane(
        "insecure_mx", "RFC 7672 §2.2.1",
        "secure usable TLSA via insecure MX: DANE required, MX name not authenticated")),
    # RFC 7672 §3.1.3 with insecure_mx_policy=dane: as for a secure MX RRset.
    Rule("dane", "insecure", "secure", "secure_unusable", "dane", _use(
        _R.ENCRYPT, "tlsa_unusable", "RFC 7672 §3.1.3",
        "TLSA records all unusable: TLS required, not authenticated")),
    # RFC 7671 §4.1 (project rule) with insecure_mx_policy=dane: as for a secure MX RRset.
    Rule("dane", "insecure", "secure", "secure_malformed", "dane", _skip(
        "tlsa_malformed", "RFC 7671 §4.1", "TLSA records malformed: try the next MX host")),
    # RFC 7672 §2.2.1 (Postfix insecure_mx_policy=encrypt): secure TLSA signal TLS only.
    Rule("dane", "insecure", "secure", _SECURE_TLSA, "encrypt", _use(
        _R.ENCRYPT, "insecure_mx", "RFC 7672 §2.2.1",
        "secure TLSA via insecure MX: TLS required, not authenticated (insecure_mx_policy)")),
    # RFC 7672 §2.2.1 (Postfix insecure_mx_policy=may): TLSA via an insecure MX ignored.
    Rule("dane", "insecure", "secure", _SECURE_TLSA, "may", _use(
        _R.MAY, "insecure_mx", "RFC 7672 §2.2.1",
        "secure TLSA via insecure MX ignored: opportunistic TLS (insecure_mx_policy)")),

    # --- level dane-only ---------------------------------------------------------------------
    # RFC 7672 §2.2.2, §6: insecure addresses cannot have DANE, which is mandatory here.
    Rule("dane-only", _OK, "insecure", _NOT_FAILED, "*", _skip(
        "dane_required", "RFC 7672 §2.2.2, §6",
        "dane-only: host addresses insecure, no DANE possible")),
    # RFC 7672 §6: mandatory DANE; a host without secure usable TLSA is not used.
    Rule("dane-only", _OK, "secure", "not_looked_up|insecure|secure_none|secure_unusable", "*",
         _skip("dane_required", "RFC 7672 §6", "dane-only: no secure usable TLSA records")),
    # RFC 7672 §2.1, §2.2.3: a failed TLSA lookup skips the host.
    Rule("dane-only", _OK, _OK, "lookup_failed", "*", _skip(
        "tlsa_lookup", "RFC 7672 §2.1, §2.2.3", "TLSA lookup failed: try the next MX host")),
    # RFC 7671 §4.1 (project rule): malformed records only.
    Rule("dane-only", _OK, "secure", "secure_malformed", "*", _skip(
        "tlsa_malformed", "RFC 7671 §4.1", "TLSA records malformed: try the next MX host")),
    # RFC 7672 §2.2: secure usable TLSA via a secure MX RRset: "verified".
    Rule("dane-only", "secure", "secure", "secure_usable", "*", _dane(
        "dane", "RFC 7672 §2.2", "secure usable TLSA: DANE required")),
    # RFC 7672 §2.2.1, §6: dane-only stays DANE-mandatory whatever insecure_mx_policy says.
    Rule("dane-only", "insecure", "secure", "secure_usable", "*", _dane(
        "insecure_mx", "RFC 7672 §2.2.1, §6",
        "secure usable TLSA via insecure MX: DANE required, MX name not authenticated")),
)
# fmt: on

_DOMAINS: dict[str, tuple[str, ...]] = {
    "level": LEVELS,
    "mx": tuple(s.value for s in MxStatus),
    "addresses": tuple(s.value for s in AddressStatus),
    "tlsa": tuple(s.value for s in TlsaState),
    "insecure_mx": INSECURE_MX_POLICIES,
}


def _values(column: str, cell: str) -> tuple[str, ...]:
    domain = _DOMAINS[column]
    if cell == _ANY:
        return domain
    values = tuple(cell.split("|"))
    unknown = [v for v in values if v not in domain]
    if unknown:
        raise ValueError(f"policy rule: unknown {column} value(s) {unknown}")
    return values


def _expand(rule: Rule) -> Iterator[PolicyKey]:
    for level, mx, addresses, tlsa, insecure_mx in itertools.product(
        _values("level", rule.level),
        _values("mx", rule.mx),
        _values("addresses", rule.addresses),
        _values("tlsa", rule.tlsa),
        _values("insecure_mx", rule.insecure_mx),
    ):
        yield level, MxStatus(mx), AddressStatus(addresses), TlsaState(tlsa), insecure_mx


def expand_rules(rules: tuple[Rule, ...]) -> dict[PolicyKey, Decision]:
    """One decision per combination of inputs.

    Raises:
        ValueError: a rule names an unknown value, two rules overlap, or a combination
            is matched by no rule.
    """
    table: dict[PolicyKey, Decision] = {}
    for rule in rules:
        for key in _expand(rule):
            if key in table:
                raise ValueError(f"policy rules overlap at {key}")
            table[key] = rule.decision
    expected = itertools.product(LEVELS, MxStatus, AddressStatus, TlsaState, INSECURE_MX_POLICIES)
    missing = [key for key in expected if key not in table]
    if missing:
        raise ValueError(f"policy rules leave {len(missing)} combination(s) out: {missing[0]}")
    return table


POLICY_TABLE: dict[PolicyKey, Decision] = expand_rules(RULES)


def wants_tlsa(level: str, addresses: AddressStatus) -> bool:
    """Whether to look up TLSA records for a host at this level.

    RFC 7672 §2.2.2: only when the host's address records are DNSSEC-secure.
    """
    return level in DANE_LEVELS and addresses is AddressStatus.SECURE


def decide(
    level: str,
    mx: MxStatus,
    addresses: AddressStatus,
    tlsa: TlsaState,
    insecure_mx_policy: str = "dane",
) -> Decision:
    """What to do with one MX host.

    Raises:
        KeyError: `level` or `insecure_mx_policy` is not a known value (the configuration
            prevents this).
    """
    return POLICY_TABLE[(level, mx, addresses, tlsa, insecure_mx_policy)]
