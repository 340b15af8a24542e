"""`tlsa verify` and `tlsa generate`: offline DANE tools for operators (RFC 6698, 7671, 7672).

Owns:
    * ``add_parser(subparsers)``: registers the ``tlsa`` command and its ``verify`` and
      ``generate`` sub-commands on an argparse sub-parsers object (``dane-relay tlsa …``).
    * ``run(args) -> int``: carries out the parsed command and returns the exit status.
    * ``python -m relay.tlsatool tlsa …``: the same commands without the relay's CLI.

``tlsa verify`` judges a PEM chain (leaf first) against TLSA records exactly as the relay's
delivery engine does, through ``relay.dane.verify``: same usability rules, same DANE-EE(3)
and DANE-TA(2) checks, same reference-identifier matching. ``tlsa generate`` prints the
zone-file line an operator publishes for a certificate, and with ``--next-cert`` the pair
published before a key rollover (RFC 7671 §8.1: "current + next").

Exit status (sysexits(3)):
    0   verify: verified; generate: records printed
    1   verify: failed or unauthenticated (the relay would defer or send unauthenticated)
    64  EX_USAGE: an argument's value is wrong (TLSA text, PEM, time, host name, field range);
        the message names the argument and what was expected
    65  EX_DATAERR: generate cannot produce a record that would match (see ``_spki``)
    66  EX_NOINPUT: a certificate file does not exist or cannot be read
    argparse's own usage errors (a missing required option) exit 2, as for every command.

``--json`` (verify) prints one object with exactly the keys ``status`` (``verified``,
``failed`` or ``unauthenticated``), ``match_depth`` (int or null), ``matched`` (the full
``"U S M HEX"`` of the record that matched, or null) and ``reason``: the verdict's stable
token (``match``, ``no-match``, ``name-mismatch``, …), a colon, and the operator detail.

Does not: look anything up in DNS, connect anywhere (that is ``probe``), judge DNSSEC, or
read the system trust store. The certificates' DER content is judged by ``verify`` (as
bytes from a peer would be), not rejected as bad input: only the PEM wrapping is checked.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from relay.dane import (
    DaneStatus,
    DaneVerdict,
    Selector,
    TlsaRecord,
    Usage,
    parse_tlsa_text,
    select_usable,
    verify,
)

__all__ = ["EX_DATAERR", "EX_NOINPUT", "EX_NOT_VERIFIED", "EX_OK", "EX_USAGE", "add_parser", "run"]

EX_OK: Final = 0
EX_NOT_VERIFIED: Final = 1
EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOINPUT: Final = 66

_PEM_BLOCK: Final = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)-----END ([A-Z0-9 ]+)-----", re.DOTALL
)
_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_MAX_NAME: Final = 253
_FIELD_RANGES: Final = {
    "usage": (0, 3, " (2 DANE-TA or 3 DANE-EE for SMTP)"),
    "selector": (0, 1, " (0 Cert, 1 SPKI)"),
    "mtype": (0, 2, " (0 Full, 1 SHA2-256, 2 SHA2-512)"),
}
_TLSA_EXAMPLE: Final = "'usage selector mtype hexdata', e.g. '3 1 1 <64 hex digits>'"


class _InputError(Exception):
    """A bad argument value or unreadable file: message for stderr and exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tlsa verify`` and ``tlsa generate`` on ``subparsers``."""
    tlsa = subparsers.add_parser(
        "tlsa", help="offline TLSA tools: verify a chain, generate records"
    )
    commands = tlsa.add_subparsers(dest="tlsa_command", required=True)

    check = commands.add_parser(
        "verify",
        help="check a PEM chain against TLSA records as an RFC 7672 SMTP client would",
        description="Check a certificate chain (PEM, leaf first) against TLSA records as "
        "the relay does when it delivers (RFC 7672). Exit 0 only when verified.",
        epilog="exit status: 0 verified, 1 failed or unauthenticated, 64 bad argument value, "
        "66 unreadable file",
    )
    check.add_argument(
        "--chain",
        required=True,
        type=Path,
        metavar="CHAIN.pem",
        help="the server's certificates in PEM, leaf first",
    )
    check.add_argument(
        "--tlsa",
        required=True,
        action="append",
        metavar='"U S M HEX"',
        help="a TLSA record's data (repeat for an RRset); a whole zone-file line is accepted too",
    )
    check.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="HOST",
        help="a reference identifier for DANE-TA(2) name checks: TLSA base "
        "domain, MX host, next-hop domain (repeat; required with DANE-TA records)",
    )
    check.add_argument(
        "--at",
        metavar="ISO-TIME",
        help="validation time, e.g. 2025-06-01T12:00:00Z (default: now; no offset means UTC)",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")

    gen = commands.add_parser(
        "generate",
        help="print the TLSA zone-file line for a certificate",
        description="Print '_PORT._tcp.HOST. IN TLSA U S M HEX' for a certificate "
        "(default 3 1 1: DANE-EE, SPKI, SHA2-256, RFC 7671 §5.1).",
        epilog="exit status: 0 printed, 64 bad argument value, 65 SPKI(1) data cannot be "
        "derived (use --selector 0), 66 unreadable file",
    )
    gen.add_argument(
        "--cert",
        required=True,
        type=Path,
        metavar="CERT.pem",
        help="the certificate in PEM (the first one in the file is used)",
    )
    gen.add_argument("--usage", default="3", help="2 DANE-TA or 3 DANE-EE (default 3)")
    gen.add_argument("--selector", default="1", help="0 Cert or 1 SPKI (default 1)")
    gen.add_argument("--mtype", default="1", help="0 Full, 1 SHA2-256, 2 SHA2-512 (default 1)")
    gen.add_argument("--host", required=True, help="the MX host name, e.g. mx.example.com")
    gen.add_argument("--port", default="25", help="the TCP port (default 25)")
    gen.add_argument(
        "--next-cert",
        type=Path,
        metavar="NEXT.pem",
        help="rollover: also print the record for the next certificate or key",
    )


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``tlsa`` command; returns the exit status (module docstring)."""
    try:
        if args.tlsa_command == "verify":
            return _verify(args)
        return _generate(args)
    except _InputError as exc:
        print(f"dane-relay tlsa {args.tlsa_command}: {exc}", file=sys.stderr)
        return exc.status


# --- input ----------------------------------------------------------------------------------


def _read_pem_certificates(path: Path, option: str) -> list[bytes]:
    """The DER of every CERTIFICATE block in a PEM file, in file order (RFC 7468 §5).

    Text outside the blocks and blocks of other types (e.g. a private key) are skipped.
    """
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError as exc:
        raise _InputError(EX_NOINPUT, f"{option} {path}: no such file") from exc
    except OSError as exc:
        raise _InputError(EX_NOINPUT, f"{option} {path}: cannot read: {exc.strerror}") from exc
    certificates: list[bytes] = []
    for number, block in enumerate(_PEM_BLOCK.finditer(text), 1):
        label, body, end_label = block.groups()
        if label != end_label:
            raise _InputError(
                EX_USAGE,
                f"{option} {path}: PEM block {number} begins {label!r}, ends {end_label!r}",
            )
        if label != "CERTIFICATE":
            continue
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except binascii.Error as exc:
            raise _InputError(
                EX_USAGE, f"{option} {path}: PEM block {number} is not valid base64 ({exc})"
            ) from exc
        if not der:
            raise _InputError(EX_USAGE, f"{option} {path}: PEM block {number} is empty")
        certificates.append(der)
    unterminated = text.count("-----BEGIN ") - len(_PEM_BLOCK.findall(text))
    if unterminated:
        raise _InputError(EX_USAGE, f"{option} {path}: a PEM block has no matching -----END line")
    if not certificates:
        raise _InputError(
            EX_USAGE,
            f"{option} {path}: no '-----BEGIN CERTIFICATE-----' block; expected PEM "
            "(for DER, convert with 'openssl x509 -inform der')",
        )
    return certificates


def _parse_record(text: str) -> TlsaRecord:
    """``"U S M HEX"``, or a zone-file line whose RDATA follows the ``TLSA`` type."""
    tokens = text.split()
    types = [i for i, token in enumerate(tokens) if token.upper() == "TLSA"]
    rdata = " ".join(tokens[types[0] + 1 :]) if types else text
    try:
        return parse_tlsa_text(rdata)
    except ValueError as exc:
        raise _InputError(EX_USAGE, f"--tlsa {text!r}: {exc}; expected {_TLSA_EXAMPLE}") from exc


def _host_name(text: str, option: str) -> str:
    """A DNS host name in A-label form, without a trailing dot (RFC 1123 §2.1, RFC 5890)."""
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if len(name) > _MAX_NAME or not all(_LABEL.fullmatch(label) for label in labels):
        hint = " (give the xn-- A-label form)" if not text.isascii() else ""
        raise _InputError(
            EX_USAGE,
            f"{option} {text!r}: expected a DNS host name such as mx.example.com{hint}",
        )
    return name


def _parse_time(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _InputError(
            EX_USAGE, f"--at {text!r}: expected an ISO 8601 time such as 2025-06-01T12:00:00Z"
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _field(args: argparse.Namespace, name: str) -> int:
    low, high, meaning = _FIELD_RANGES[name]
    text = str(getattr(args, name))
    # ASCII digits only: str.isdigit() also accepts "²" and "٢", which int() rejects or maps.
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _InputError(EX_USAGE, f"--{name} {text!r}: expected {low}..{high}{meaning}")
    return int(text)


# --- tlsa verify ----------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    records = [_parse_record(text) for text in args.tlsa]
    names = [_host_name(text, "--name") for text in args.name]
    if not names and any(r.usage == Usage.DANE_TA for r in records):
        # RFC 7672 §3.2.3: a DANE-TA(2) match needs a reference identifier to check the leaf.
        raise _InputError(
            EX_USAGE,
            "--name: expected at least one host name with DANE-TA(2) "
            "records (the TLSA base domain, MX host or next-hop domain)",
        )
    now = _parse_time(args.at)
    chain = _read_pem_certificates(args.chain, "--chain")
    verdict = verify(records, chain, names, now)
    if args.json:
        print(json.dumps(_verdict_json(verdict)))
    else:
        _print_verdict(verdict, records, chain, now)
    return EX_OK if verdict.status is DaneStatus.VERIFIED else EX_NOT_VERIFIED


def _verdict_json(verdict: DaneVerdict) -> dict[str, object]:
    return {
        "status": verdict.status.value,
        "match_depth": verdict.match_depth,
        "matched": verdict.matched.to_text() if verdict.matched is not None else None,
        "reason": f"{verdict.reason}: {verdict.detail}",
    }


def _print_verdict(
    verdict: DaneVerdict, records: Sequence[TlsaRecord], chain: Sequence[bytes], now: datetime
) -> None:
    print(f"{verdict.status.value} ({verdict.reason}): {verdict.detail}")
    if verdict.matched is not None:
        print(f"  matched: {verdict.matched.to_text()}")
        print(f"  depth:   {verdict.match_depth}")
    selected = select_usable(records)
    for record in records:
        reason = record.unusable_reason()
        if reason is None and record not in selected:
            reason = "a stronger digest is published for this usage and selector (RFC 7671 §9)"
        if reason is not None:
            print(f"  ignored: {record}: {reason}")
    print(f"  at:      {now.isoformat()}")
    print(f"  chain:   {len(chain)} certificate(s), leaf first")
    for depth, der in enumerate(chain):
        print(f"    {depth}: {_describe(der)}")


def _describe(der: bytes) -> str:
    """One line about a certificate for people; never raises."""
    try:
        with warnings.catch_warnings():
            # The verdict already judged the serial number; the listing need not repeat it.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        issuer = cert.issuer.rfc4514_string() or "(empty issuer)"
        begin, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    except (ValueError, x509.InvalidVersion) as exc:
        return f"cannot be decoded ({exc}); sha256 {hashlib.sha256(der).hexdigest()}"
    return f"{subject}; issuer {issuer}; valid {begin:%Y-%m-%d} to {end:%Y-%m-%d}"


# --- tlsa generate --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Params:
    usage: int
    selector: int
    mtype: int
    owner: str


def _generate(args: argparse.Namespace) -> int:
    usage, selector, mtype = (_field(args, name) for name in ("usage", "selector", "mtype"))
    host = _host_name(args.host, "--host")
    port = str(args.port)
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise _InputError(EX_USAGE, f"--port {port!r}: expected a TCP port 1..65535")
    if len(f"_{int(port)}._tcp.{host}") > _MAX_NAME:
        # RFC 1035 §2.3.4: the TLSA owner name itself must fit in 253 characters.
        raise _InputError(
            EX_USAGE, f"--host {host!r}: _{int(port)}._tcp.{host} is longer than {_MAX_NAME}"
        )
    params = _Params(usage, selector, mtype, f"_{int(port)}._tcp.{host}.")
    if usage in (Usage.PKIX_TA, Usage.PKIX_EE):
        _warn(
            f"usage {usage} ({'PKIX-TA' if usage == 0 else 'PKIX-EE'}) is unusable for SMTP: "
            "SMTP clients ignore it (RFC 7672 §3.1.3); publish 3 (DANE-EE) or 2 (DANE-TA)"
        )
    records = [_record_for(args.cert, "--cert", params)]
    if args.next_cert is not None:
        following = _record_for(args.next_cert, "--next-cert", params)
        if following == records[0]:
            _warn("--next-cert gives the same record as --cert (same key): one record covers both")
        else:
            records.append(following)
    for record in records:
        print(f"{params.owner} IN TLSA {record.to_text()}")
    return EX_OK


def _record_for(path: Path, option: str, params: _Params) -> TlsaRecord:
    certificates = _read_pem_certificates(path, option)
    if len(certificates) > 1:
        _warn(f"{option} {path}: {len(certificates)} certificates; using the first")
    der = certificates[0]
    # Cert(0) needs only the bytes, so a certificate cryptography refuses can still be
    # published as DANE-EE(3) Cert(0), as relay.dane.verify can still match it.
    if params.usage == Usage.DANE_TA and not _is_ca(_decode(der, path, option)):
        _warn(
            f"{option} {path}: usage 2 (DANE-TA) names a trust anchor, but this certificate is "
            "not a CA (no basicConstraints cA=TRUE); the issuer's certificate or --usage 3 "
            "is probably meant"
        )
    selected = der if params.selector == Selector.CERT else _spki(der, path, option)
    if params.mtype == 1:
        selected = hashlib.sha256(selected).digest()
    elif params.mtype == 2:
        selected = hashlib.sha512(selected).digest()
    return TlsaRecord(params.usage, params.selector, params.mtype, selected)


def _decode(der: bytes, path: Path, option: str) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:
        raise _InputError(
            EX_USAGE, f"{option} {path}: not a decodable X.509 certificate ({exc})"
        ) from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.ca


def _spki(der: bytes, path: Path, option: str) -> bytes:
    """The SubjectPublicKeyInfo as the certificate encodes it (selector SPKI(1)).

    ``cryptography`` gives the key re-encoded, which can differ from the certificate's own
    bytes (a compressed EC point comes back uncompressed). The result is therefore checked
    with ``relay.dane.verify`` itself: a record this tool prints always matches.

    Raises:
        _InputError: EX_USAGE when cryptography cannot decode the certificate; EX_DATAERR
            when the re-encoded key is not the certificate's SPKI.
    """
    spki = (
        _decode(der, path, option)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    probe = TlsaRecord(Usage.DANE_EE, Selector.SPKI, 0, spki)
    if verify([probe], [der], [], datetime.now(UTC)).status is not DaneStatus.VERIFIED:
        raise _InputError(
            EX_DATAERR,
            f"{option} {path}: the certificate encodes its public key in a non-canonical "
            "form (e.g. a compressed EC point), so the SPKI(1) data cannot be derived "
            "reliably; use --selector 0",
        )
    return spki


def _warn(message: str) -> None:
    print(f"dane-relay tlsa generate: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m relay.tlsatool tlsa …`` (the relay's CLI wires ``add_parser``/``run``)."""
    parser = argparse.ArgumentParser(prog="python -m relay.tlsatool")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
