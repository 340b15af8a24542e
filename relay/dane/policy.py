"""TLS policy decision table: (security level, TLSA lookup state) -> what TLS to demand.

Pure. The table is literal data (STYLE.md 7.5 rule 5) and a unit test checks that
it covers every (level, state) pair. Decisions never raise: a deferral is a value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["POLICY_TABLE", "Decision", "TlsRequirement", "TlsaState", "decide", "wants_tlsa"]


class TlsRequirement(enum.Enum):
    NONE = "none"  # plaintext
    MAY = "may"  # opportunistic: STARTTLS if offered, plaintext if the handshake fails
    ENCRYPT = "encrypt"  # TLS mandatory, not authenticated
    DANE = "dane"  # TLS mandatory, peer chain must match a usable TLSA record


class TlsaState(enum.Enum):
    NOT_LOOKED_UP = "not_looked_up"  # level does not use DANE, or host addresses insecure
    LOOKUP_FAILED = "lookup_failed"  # SERVFAIL/bogus/timeout
    INSECURE = "insecure"  # TLSA RRset not validated
    SECURE_NONE = "secure_none"  # validated NODATA/NXDOMAIN
    SECURE_UNUSABLE = "secure_unusable"  # validated, but no usable record
    SECURE_MALFORMED = "secure_malformed"  # validated, none usable, some DANE records malformed
    SECURE_USABLE = "secure_usable"  # validated, at least one usable record


@dataclass(frozen=True, slots=True)
class Decision:
    requirement: TlsRequirement | None  # None: defer
    defer_reason: str = ""  # metrics/log token when deferring
    why: str = ""  # short explanation, logged with the decision


def _use(req: TlsRequirement, why: str) -> Decision:
    return Decision(req, "", why)


def _defer(reason: str, why: str) -> Decision:
    return Decision(None, reason, why)


_S = TlsaState
_R = TlsRequirement

_DANE_ROWS: dict[TlsaState, Decision] = {
    # RFC 7672 §2.2.2: DANE applies only if the host's address records are secure.
    _S.NOT_LOOKED_UP: _use(_R.MAY, "host addresses insecure: no DANE (RFC 7672 §2.2.2)"),
    # RFC 7672 §2.2: a failed TLSA lookup must not be taken as "no TLSA": defer.
    _S.LOOKUP_FAILED: _defer("tlsa_lookup", "TLSA lookup failed (RFC 7672 §2.2)"),
    # RFC 7672 §2.2: insecure TLSA RRsets are ignored; opportunistic TLS.
    _S.INSECURE: _use(_R.MAY, "TLSA insecure (RFC 7672 §2.2)"),
    # RFC 7672 §2.2: secure denial of existence of TLSA: opportunistic TLS.
    _S.SECURE_NONE: _use(_R.MAY, "no TLSA records (RFC 7672 §2.2)"),
    # RFC 7672 §3.1.3 / §2.2: secure but unusable TLSA: TLS required, not authenticated.
    _S.SECURE_UNUSABLE: _use(_R.ENCRYPT, "TLSA records all unusable (RFC 7672 §3.1.3)"),
    # Project rule (DESIGN "bad DNS data"): malformed DANE records with nothing usable
    # beside them are a publishing error: defer rather than fall back to encrypt-only.
    _S.SECURE_MALFORMED: _defer("tlsa_malformed", "TLSA records malformed (RFC 7671 §4.1)"),
    # RFC 7672 §2.2: secure usable TLSA: authenticated TLS is mandatory.
    _S.SECURE_USABLE: _use(_R.DANE, "secure usable TLSA (RFC 7672 §2.2)"),
}

_DANE_ONLY_ROWS: dict[TlsaState, Decision] = {
    state: (
        decision
        if decision.requirement in (None, _R.DANE)
        else _defer("dane_required", f"dane-only: {decision.why}")
    )
    for state, decision in _DANE_ROWS.items()
}

POLICY_TABLE: dict[tuple[str, TlsaState], Decision] = {
    **{("none", s): _use(_R.NONE, "level none") for s in TlsaState},
    **{("may", s): _use(_R.MAY, "level may") for s in TlsaState},
    **{("encrypt", s): _use(_R.ENCRYPT, "level encrypt") for s in TlsaState},
    **{("dane", s): d for s, d in _DANE_ROWS.items()},
    **{("dane-only", s): d for s, d in _DANE_ONLY_ROWS.items()},
}


def wants_tlsa(level: str, addresses_secure: bool) -> bool:
    """Whether to look up TLSA records for a host at this level.

    RFC 7672 §2.2.2: only when the host's address records are DNSSEC-secure.
    """
    return level in ("dane", "dane-only") and addresses_secure


def decide(level: str, state: TlsaState) -> Decision:
    """The TLS requirement (or deferral) for one MX host.

    Raises:
        KeyError: `level` is not a known security level (the configuration prevents this).
    """
    return POLICY_TABLE[(level, state)]
