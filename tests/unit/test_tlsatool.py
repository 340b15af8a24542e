"""relay.tlsatool: `tlsa verify` and `tlsa generate`, run in-process through ``main`` (and
once as ``python -m relay.tlsatool``), on certificates from ``certfactory``.

Expected TLSA data is computed here with hashlib over cryptography's DER, never by the tool.
"""

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from certfactory import MX_HOST, NEXT_HOP, Issued, Pki, _der, _elements
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relay import tlsatool

AT = "2025-06-01T12:00:00Z"  # certfactory.NOW
JSON_KEYS = ["status", "match_depth", "matched", "reason"]


@dataclass
class Result:
    status: int
    out: str
    err: str

    def json(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.out)
        return loaded


Tool = Callable[..., Result]


@pytest.fixture
def tool(capsys: pytest.CaptureFixture[str]) -> Tool:
    def call(*argv: str | Path) -> Result:
        status = tlsatool.main(["tlsa", *map(str, argv)])
        captured = capsys.readouterr()
        return Result(status, captured.out, captured.err)

    return call


def pem(*ders: bytes) -> str:
    return "".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM).decode()
        for d in ders
    )


def raw_pem(der: bytes) -> str:
    """PEM written by hand, for DER that cryptography refuses to load."""
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    def put(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return put


@pytest.fixture
def chain(pki: Pki, write: Callable[[str, str], Path]) -> Path:
    return write("chain.pem", pem(pki.leaf.der, pki.intermediate.der))


def spki_digest(issued: Issued, algorithm: str = "sha256") -> str:
    spki = issued.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.new(algorithm, spki).hexdigest()


def with_serial(cert: Issued, issuer: Issued, serial: bytes) -> bytes:
    """``cert`` re-signed with other serialNumber contents (cryptography will not build it)."""
    fields = _elements(cert.cert.tbs_certificate_bytes)
    fields[1] = _der(0x02, serial)
    tbs = _der(0x30, b"".join(fields))
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _der(0x30, tbs + _elements(cert.der)[1] + _der(0x03, b"\x00" + signature))


# --- tlsa verify: verdicts, exit status, JSON shape ------------------------------------------


def test_verify_dane_ee_json(tool: Tool, pki: Pki, chain: Path) -> None:
    record = f"3 1 1 {spki_digest(pki.leaf)}"
    result = tool("verify", "--chain", chain, "--tlsa", record, "--name", MX_HOST, "--json")
    assert result.status == 0
    assert list(result.json()) == JSON_KEYS
    assert result.json() == {
        "status": "verified",
        "match_depth": 0,
        "matched": record,
        "reason": f"match: DANE-EE(3) SPKI(1) SHA2-256(1) 3 1 1 {record[6:22]}\u2026 matched the "
        "leaf certificate",
    }
    assert result.out.endswith("}\n") and result.out.count("\n") == 1
    assert result.err == ""


def test_verify_dane_ta_json(tool: Tool, pki: Pki, chain: Path) -> None:
    record = f"2 1 2 {spki_digest(pki.intermediate, 'sha512')}"
    argv = ["--chain", chain, "--tlsa", record, "--name", MX_HOST, "--at", AT, "--json"]
    result = tool("verify", *argv)
    assert (result.status, result.json()["status"]) == (0, "verified")
    assert (result.json()["match_depth"], result.json()["matched"]) == (1, record)


def test_verify_failed_json(tool: Tool, pki: Pki, chain: Path) -> None:
    record = f"3 1 1 {spki_digest(pki.other_leaf)}"
    result = tool("verify", "--chain", chain, "--tlsa", record, "--name", MX_HOST, "--json")
    assert result.status == 1
    verdict = result.json()
    assert list(verdict) == JSON_KEYS
    assert verdict["status"] == "failed"
    assert verdict["match_depth"] is None and verdict["matched"] is None
    assert str(verdict["reason"]).startswith("no-match: ")


def test_verify_unauthenticated_json(tool: Tool, pki: Pki, chain: Path) -> None:
    # PKIX-EE(1) matches the leaf, but SMTP clients cannot use it (RFC 7672 §3.1.3).
    record = f"1 1 1 {spki_digest(pki.leaf)}"
    result = tool("verify", "--chain", chain, "--tlsa", record, "--name", MX_HOST, "--json")
    assert result.status == 1
    assert result.json() == {
        "status": "unauthenticated",
        "match_depth": None,
        "matched": None,
        "reason": f"no-usable-records: no usable TLSA records: 1 1 1 {record[6:22]}\u2026: usage "
        "PKIX-EE(1) is unusable for SMTP (RFC 7672 \u00a73.1.3)",
    }


def test_verify_names_are_reference_identifiers(tool: Tool, pki: Pki, chain: Path) -> None:
    record = f"2 1 1 {spki_digest(pki.intermediate)}"
    base = ["verify", "--chain", chain, "--tlsa", record, "--at", AT, "--json"]
    mismatch = tool(*base, "--name", NEXT_HOP)
    assert (mismatch.status, mismatch.json()["status"]) == (1, "failed")
    assert str(mismatch.json()["reason"]).startswith("name-mismatch: ")
    # Any --name may match; case and a trailing dot do not matter.
    assert tool(*base, "--name", NEXT_HOP, "--name", "MX.Example.NET.").status == 0


def test_verify_time_naive_means_utc_and_offsets_count(
    tool: Tool, pki: Pki, write: Callable[[str, str], Path]
) -> None:
    chain = write("expired.pem", pem(pki.expired_leaf.der, pki.intermediate.der))
    end = pki.expired_leaf.cert.not_valid_after_utc  # 2025-05-31 12:00 UTC
    assert end.isoformat() == "2025-05-31T12:00:00+00:00"
    record = f"2 1 1 {spki_digest(pki.intermediate)}"
    base = ["verify", "--chain", chain, "--tlsa", record, "--name", MX_HOST, "--json", "--at"]
    assert tool(*base, "2025-05-31T12:00:00").status == 0
    assert tool(*base, "2025-05-31T12:00:00+00:00").status == 0
    late = tool(*base, "2025-05-31T12:00:00-01:00")  # 13:00 UTC: an hour after notAfter
    assert late.status == 1
    assert str(late.json()["reason"]).startswith("expired: ")


def test_verify_default_time_is_now(
    tool: Tool, pki: Pki, write: Callable[[str, str], Path]
) -> None:
    # DANE-EE(3) ignores dates, so the wall clock cannot change this outcome.
    chain = write("leaf.pem", pem(pki.expired_leaf.der))
    record = f"3 1 1 {spki_digest(pki.expired_leaf)}"
    assert tool("verify", "--chain", chain, "--tlsa", record, "--name", MX_HOST).status == 0


def test_verify_human_output(tool: Tool, pki: Pki, chain: Path) -> None:
    good = f"2 1 1 {spki_digest(pki.intermediate)}"
    weaker = f"3 1 1 {spki_digest(pki.leaf)}"
    stronger = f"3 1 2 {spki_digest(pki.other_leaf, 'sha512')}"
    pkix = f"0 0 1 {'00' * 32}"
    argv = ["--chain", chain, "--name", MX_HOST, "--at", AT]
    result = tool(
        "verify", *argv, "--tlsa", good, "--tlsa", weaker, "--tlsa", stronger, "--tlsa", pkix
    )
    assert result.status == 0
    lines = result.out.splitlines()
    assert lines[0].startswith("verified (match): DANE-TA(2) SPKI(1) SHA2-256(1)")
    assert f"  matched: {good}" in lines
    assert "  depth:   1" in lines
    assert (
        f"  ignored: 3 1 1 {weaker[6:22]}\u2026: a stronger digest is published for this "
        "usage and selector (RFC 7671 \u00a79)" in lines
    )
    assert any(line.startswith("  ignored: 0 0 1 0000000000000000") for line in lines)
    assert "  at:      2025-06-01T12:00:00+00:00" in lines
    assert "  chain:   2 certificate(s), leaf first" in lines
    assert lines[-2].startswith("    0: CN=mx.example.net; issuer CN=Test Issuing CA; valid ")
    assert lines[-1].startswith("    1: CN=Test Issuing CA; issuer CN=Test Root CA; valid ")


def test_verify_accepts_a_zone_file_line_and_mnemonics(tool: Tool, pki: Pki, chain: Path) -> None:
    digest = spki_digest(pki.leaf)
    for text in (
        f"_25._tcp.mx.example.net. 3600 IN TLSA 3 1 1 {digest}",
        f"DANE-EE SPKI SHA2-256 {digest[:32]} {digest[32:].upper()}",
    ):
        result = tool("verify", "--chain", chain, "--tlsa", text, "--name", MX_HOST, "--json")
        assert (result.status, result.json()["matched"]) == (0, f"3 1 1 {digest}")


def test_verify_pem_with_text_and_other_blocks(
    tool: Tool, pki: Pki, write: Callable[[str, str], Path]
) -> None:
    key = pki.leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    text = f"subject=CN=mx\n{pem(pki.leaf.der)}\n{key}issuer=...\n{pem(pki.intermediate.der)}"
    chain = write("bundle.pem", text)
    record = f"2 1 1 {spki_digest(pki.intermediate)}"
    result = tool("verify", "--chain", chain, "--tlsa", record, "--name", MX_HOST, "--at", AT)
    assert result.status == 0, result.out
    assert "  chain:   2 certificate(s), leaf first" in result.out.splitlines()


# --- issue 4 item 6: a certificate cryptography refuses ------------------------------------


def test_verify_refused_leaf(tool: Tool, pki: Pki, write: Callable[[str, str], Path]) -> None:
    # A non-minimal serialNumber INTEGER: cryptography 50 raises ValueError on load.
    leaf = with_serial(pki.leaf, pki.intermediate, b"\x00\x01")
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(leaf)
    chain = write("refused.pem", raw_pem(leaf) + pem(pki.intermediate.der))
    base = ["verify", "--chain", chain, "--name", MX_HOST, "--at", AT]
    ee = tool(*base, "--tlsa", f"3 1 1 {spki_digest(pki.leaf)}", "--json")
    assert (ee.status, ee.json()["status"], ee.json()["match_depth"]) == (0, "verified", 0)
    cert_ee = tool(*base, "--tlsa", f"3 0 1 {hashlib.sha256(leaf).hexdigest()}", "--json")
    assert cert_ee.status == 0
    ta = tool(*base, "--tlsa", f"2 1 1 {spki_digest(pki.intermediate)}", "--json")
    assert (ta.status, ta.json()["status"]) == (1, "failed")
    assert str(ta.json()["reason"]).startswith("bad-certificate: certificate 0: unusable for")
    # The human listing says so instead of crashing.
    human = tool(*base, "--tlsa", f"3 1 1 {spki_digest(pki.leaf)}")
    assert human.status == 0
    assert "    0: cannot be decoded (" in human.out


def test_verify_negative_serial_leaf_emits_no_warning(
    tool: Tool, pki: Pki, write: Callable[[str, str], Path]
) -> None:
    leaf = with_serial(pki.leaf, pki.intermediate, b"\xff\x01")
    chain = write("negative.pem", raw_pem(leaf) + pem(pki.intermediate.der))
    base = ["verify", "--chain", chain, "--name", MX_HOST, "--at", AT]
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        assert tool(*base, "--tlsa", f"3 1 1 {spki_digest(pki.leaf)}").status == 0
        assert tool(*base, "--tlsa", f"2 1 1 {spki_digest(pki.intermediate)}").status == 1
    assert [str(w.message) for w in recorded] == []


# --- tlsa verify: bad input is EX_USAGE (64) / EX_NOINPUT (66), nothing on stdout --------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--tlsa", "3 1 1 zz", "--tlsa '3 1 1 zz': TLSA association data is not hexadecimal"),
        ("--tlsa", "3 1 abc", "--tlsa '3 1 abc': TLSA text needs 'usage selector mtype hexdata'"),
        ("--tlsa", "3 1 1 abc", "odd number of hex digits"),
        ("--tlsa", "256 1 1 00", "TLSA usage must be a number 0..255"),
        ("--tlsa", "3 1 1 00", None),
        ("--name", "mx example.net", "--name 'mx example.net': expected a DNS host name"),
        ("--name", "*.example.net", "--name '*.example.net': expected a DNS host name"),
        ("--name", "bücher.example", "(give the xn-- A-label form)"),
        ("--name", ".", "--name '.': expected a DNS host name"),
        ("--at", "yesterday", "--at 'yesterday': expected an ISO 8601 time such as"),
        ("--at", "2025-13-01", "--at '2025-13-01': expected an ISO 8601 time"),
    ],
)
def test_verify_bad_arguments(
    tool: Tool, chain: Path, option: str, value: str, message: str | None
) -> None:
    args = {"--tlsa": "3 1 1 " + "00" * 32, "--name": MX_HOST, "--at": AT} | {option: value}
    argv = [item for pair in args.items() for item in pair]
    result = tool("verify", "--chain", chain, "--json", *argv)
    if message is None:  # a syntactically fine record that simply does not match
        assert result.status == 1
        return
    assert (result.status, result.out) == (64, "")
    assert result.err.startswith("dane-relay tlsa verify: ")
    assert message in result.err
    if option == "--tlsa":
        assert "expected 'usage selector mtype hexdata'" in result.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no '-----BEGIN CERTIFICATE-----' block; expected PEM"),
        ("\x30\x82\x01\x00binary", "(for DER, convert with 'openssl x509 -inform der')"),
        ("-----BEGIN CERTIFICATE-----\nMII*\n-----END CERTIFICATE-----\n", "not valid base64"),
        ("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", "PEM block 1 is empty"),
        ("-----BEGIN CERTIFICATE-----\nMIIB\n", "has no matching -----END line"),
        ("-----BEGIN CERTIFICATE-----\nAA==\n-----END X509 CRL-----\n", "ends 'X509 CRL'"),
        ("-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n", "no '-----BEGIN CERT"),
    ],
)
def test_verify_bad_pem(
    tool: Tool, write: Callable[[str, str], Path], text: str, message: str
) -> None:
    chain = write("bad.pem", text)
    result = tool("verify", "--chain", chain, "--tlsa", "3 1 1 " + "00" * 32, "--name", MX_HOST)
    assert (result.status, result.out) == (64, "")
    assert result.err.startswith(f"dane-relay tlsa verify: --chain {chain}: ")
    assert message in result.err


def test_verify_undecodable_der_is_a_verdict_not_a_usage_error(
    tool: Tool, write: Callable[[str, str], Path]
) -> None:
    # Valid PEM around junk: judged like junk bytes from a peer (bad-certificate), exit 1.
    chain = write("junk.pem", "-----BEGIN CERTIFICATE-----\nanVuaw==\n-----END CERTIFICATE-----\n")
    argv = ["--chain", chain, "--tlsa", "3 1 1 " + "00" * 32, "--name", MX_HOST, "--json"]
    result = tool("verify", *argv)
    assert (result.status, result.json()["status"]) == (1, "failed")
    assert str(result.json()["reason"]).startswith("bad-certificate: ")


def test_verify_missing_or_unreadable_chain(tool: Tool, tmp_path: Path) -> None:
    argv = ["--tlsa", "3 1 1 " + "00" * 32, "--name", MX_HOST]
    missing = tool("verify", "--chain", tmp_path / "nope.pem", *argv)
    assert (missing.status, missing.out) == (66, "")
    assert missing.err == f"dane-relay tlsa verify: --chain {tmp_path / 'nope.pem'}: no such file\n"
    directory = tool("verify", "--chain", tmp_path, *argv)
    assert directory.status == 66
    assert f"--chain {tmp_path}: cannot read: " in directory.err


def test_verify_missing_required_option_is_argparse_usage(tool: Tool, chain: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        tool("verify", "--chain", chain, "--name", MX_HOST)
    assert exited.value.code == 2


def test_verify_dane_ee_needs_no_name(tool: Tool, pki: Pki, chain: Path) -> None:
    # RFC 7672 §3.1.1: DANE-EE(3) ignores names, so --name may be left out.
    record = f"3 1 1 {spki_digest(pki.leaf)}"
    result = tool("verify", "--chain", chain, "--tlsa", record, "--json")
    assert (result.status, result.json()["status"], result.err) == (0, "verified", "")


def test_verify_dane_ta_without_a_name_is_a_usage_error(tool: Tool, pki: Pki, chain: Path) -> None:
    result = tool("verify", "--chain", chain, "--tlsa", f"2 1 1 {spki_digest(pki.intermediate)}")
    assert result.status == 64
    assert result.out == ""
    assert "--name: expected at least one host name with DANE-TA(2) records" in result.err


# --- tlsa generate ---------------------------------------------------------------------------


@pytest.fixture
def leaf_pem(pki: Pki, write: Callable[[str, str], Path]) -> Path:
    return write("leaf.pem", pem(pki.leaf.der))


def test_generate_default_is_3_1_1(tool: Tool, pki: Pki, leaf_pem: Path) -> None:
    result = tool("generate", "--cert", leaf_pem, "--host", MX_HOST)
    expected = f"_25._tcp.mx.example.net. IN TLSA 3 1 1 {spki_digest(pki.leaf)}\n"
    assert (result.status, result.out, result.err) == (0, expected, "")


@pytest.mark.parametrize(
    ("selector", "mtype", "data"),
    [
        ("0", "0", lambda i: i.der.hex()),
        ("0", "1", lambda i: hashlib.sha256(i.der).hexdigest()),
        ("0", "2", lambda i: hashlib.sha512(i.der).hexdigest()),
        (
            "1",
            "0",
            lambda i: (
                i.cert.public_key()
                .public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                .hex()
            ),
        ),
        ("1", "1", lambda i: spki_digest(i)),
        ("1", "2", lambda i: spki_digest(i, "sha512")),
    ],
)
def test_generate_every_selector_and_mtype(
    tool: Tool,
    pki: Pki,
    leaf_pem: Path,
    selector: str,
    mtype: str,
    data: Callable[[Issued], str],
) -> None:
    argv = ["--cert", leaf_pem, "--host", "mx.example.net.", "--port", "465"]
    result = tool("generate", *argv, "--selector", selector, "--mtype", mtype)
    expected = f"_465._tcp.mx.example.net. IN TLSA 3 {selector} {mtype} {data(pki.leaf)}\n"
    assert (result.status, result.out, result.err) == (0, expected, "")


def test_generate_dane_ta_from_a_ca_certificate(
    tool: Tool, pki: Pki, write: Callable[[str, str], Path]
) -> None:
    ca = write("ca.pem", pem(pki.intermediate.der))
    result = tool("generate", "--cert", ca, "--usage", "2", "--host", MX_HOST)
    expected = f"_25._tcp.mx.example.net. IN TLSA 2 1 1 {spki_digest(pki.intermediate)}\n"
    assert (result.status, result.out, result.err) == (0, expected, "")


def test_generate_dane_ta_from_a_leaf_warns(tool: Tool, pki: Pki, leaf_pem: Path) -> None:
    result = tool("generate", "--cert", leaf_pem, "--usage", "2", "--host", MX_HOST)
    assert result.status == 0
    assert result.out == f"_25._tcp.mx.example.net. IN TLSA 2 1 1 {spki_digest(pki.leaf)}\n"
    assert result.err.startswith("dane-relay tlsa generate: warning: --cert ")
    assert "usage 2 (DANE-TA) names a trust anchor, but this certificate is not a CA" in result.err


@pytest.mark.parametrize(("usage", "name"), [("0", "PKIX-TA"), ("1", "PKIX-EE")])
def test_generate_pkix_usages_warn_but_print(
    tool: Tool, pki: Pki, leaf_pem: Path, usage: str, name: str
) -> None:
    result = tool("generate", "--cert", leaf_pem, "--usage", usage, "--host", MX_HOST)
    assert result.status == 0
    assert result.out == f"_25._tcp.mx.example.net. IN TLSA {usage} 1 1 {spki_digest(pki.leaf)}\n"
    assert f"usage {usage} ({name}) is unusable for SMTP" in result.err
    assert "RFC 7672 §3.1.3" in result.err


def test_generate_rollover_prints_current_then_next(
    tool: Tool, pki: Pki, leaf_pem: Path, write: Callable[[str, str], Path]
) -> None:
    following = write("next.pem", pem(pki.other_leaf.der))
    result = tool("generate", "--cert", leaf_pem, "--next-cert", following, "--host", MX_HOST)
    assert (result.status, result.err) == (0, "")
    assert result.out == (
        f"_25._tcp.mx.example.net. IN TLSA 3 1 1 {spki_digest(pki.leaf)}\n"
        f"_25._tcp.mx.example.net. IN TLSA 3 1 1 {spki_digest(pki.other_leaf)}\n"
    )


def test_generate_rollover_with_the_same_key_prints_one_record(
    tool: Tool, pki: Pki, leaf_pem: Path, write: Callable[[str, str], Path]
) -> None:
    # A renewal that keeps the key: 3 1 1 does not change, 3 0 1 does.
    renewed = with_serial(pki.leaf, pki.intermediate, b"\x05")
    following = write("renewed.pem", pem(renewed))
    argv = ["--cert", leaf_pem, "--next-cert", following, "--host", MX_HOST]
    same = tool("generate", *argv)
    assert same.out == f"_25._tcp.mx.example.net. IN TLSA 3 1 1 {spki_digest(pki.leaf)}\n"
    assert "same record as --cert (same key): one record covers both" in same.err
    whole = tool("generate", *argv, "--selector", "0")
    assert whole.out.splitlines() == [
        f"_25._tcp.mx.example.net. IN TLSA 3 0 1 {hashlib.sha256(d).hexdigest()}"
        for d in (pki.leaf.der, renewed)
    ]


def test_generate_uses_the_first_certificate_of_a_bundle(tool: Tool, pki: Pki, chain: Path) -> None:
    result = tool("generate", "--cert", chain, "--host", MX_HOST)
    assert result.out == f"_25._tcp.mx.example.net. IN TLSA 3 1 1 {spki_digest(pki.leaf)}\n"
    assert "2 certificates; using the first" in result.err


def test_generate_then_verify_round_trip(tool: Tool, pki: Pki, chain: Path, tmp_path: Path) -> None:
    for usage, issued in (("3", pki.leaf), ("2", pki.intermediate)):
        cert = tmp_path / f"u{usage}.pem"
        cert.write_text(pem(issued.der))
        for selector in "01":
            for mtype in "012":
                fields = ["--usage", usage, "--selector", selector, "--mtype", mtype]
                line = tool("generate", "--cert", cert, "--host", MX_HOST, *fields).out.strip()
                result = tool(
                    "verify",
                    "--chain",
                    chain,
                    "--tlsa",
                    line,
                    "--name",
                    MX_HOST,
                    "--at",
                    AT,
                    "--json",
                )
                assert result.status == 0, (line, result.out)
                assert result.json()["match_depth"] == (0 if usage == "3" else 1)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--usage", "4", "--usage '4': expected 0..3 (2 DANE-TA or 3 DANE-EE for SMTP)"),
        ("--usage", "DANE-EE", "--usage 'DANE-EE': expected 0..3"),
        ("--selector", "2", "--selector '2': expected 0..1 (0 Cert, 1 SPKI)"),
        ("--mtype", "3", "--mtype '3': expected 0..2 (0 Full, 1 SHA2-256, 2 SHA2-512)"),
        ("--mtype", "-1", "--mtype '-1': expected 0..2"),
        ("--port", "0", "--port '0': expected a TCP port 1..65535"),
        ("--port", "65536", "--port '65536': expected a TCP port"),
        ("--host", "mx_.-bad", "--host 'mx_.-bad': expected a DNS host name"),
        # Non-ASCII digits: "²".isdigit() is true, but it is no port or field value.
        ("--usage", "\u00b2", "--usage '\u00b2': expected 0..3"),
        ("--port", "\u0662\u0665", "--port '\u0662\u0665': expected a TCP port 1..65535"),
        # The owner name _25._tcp.<host> must fit in 253 characters (RFC 1035 §2.3.4).
        ("--host", ".".join(["a" * 62] * 4), "--host '" + ".".join(["a" * 62] * 4) + "': _25"),
    ],
)
def test_generate_bad_arguments(
    tool: Tool, leaf_pem: Path, option: str, value: str, message: str
) -> None:
    args = {"--host": MX_HOST} | {option: value}
    argv = [item for pair in args.items() for item in pair]
    result = tool("generate", "--cert", leaf_pem, *argv)
    assert (result.status, result.out) == (64, "")
    assert result.err.startswith(f"dane-relay tlsa generate: {message}")
    assert result.err.count("\n") == 1


def test_generate_missing_files(tool: Tool, leaf_pem: Path, tmp_path: Path) -> None:
    missing = tool("generate", "--cert", tmp_path / "no.pem", "--host", MX_HOST)
    assert (missing.status, missing.out) == (66, "")
    assert "--cert " in missing.err and "no such file" in missing.err
    argv = ["--cert", leaf_pem, "--next-cert", tmp_path / "no.pem", "--host", MX_HOST]
    missing_next = tool("generate", *argv)
    assert (missing_next.status, missing_next.out) == (66, "")
    assert "--next-cert " in missing_next.err


def test_generate_for_a_certificate_cryptography_refuses(
    tool: Tool, pki: Pki, write: Callable[[str, str], Path]
) -> None:
    refused = with_serial(pki.leaf, pki.intermediate, b"\x00\x01")
    cert = write("refused.pem", raw_pem(refused))
    # Cert(0) needs only the bytes...
    whole = tool("generate", "--cert", cert, "--host", MX_HOST, "--selector", "0")
    expected = f"_25._tcp.mx.example.net. IN TLSA 3 0 1 {hashlib.sha256(refused).hexdigest()}\n"
    assert (whole.status, whole.out) == (0, expected)
    # ...SPKI(1) needs the certificate decoded.
    spki = tool("generate", "--cert", cert, "--host", MX_HOST)
    assert (spki.status, spki.out) == (64, "")
    assert f"--cert {cert}: not a decodable X.509 certificate (" in spki.err


def test_generate_refuses_spki_it_cannot_reproduce(
    tool: Tool, pki: Pki, write: Callable[[str, str], Path]
) -> None:
    # The leaf's key as a compressed EC point: cryptography loads it but re-encodes the
    # SPKI uncompressed, so a record built from its output would never match.
    fields = _elements(pki.leaf.cert.tbs_certificate_bytes)
    point = pki.leaf.key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    fields[6] = _der(0x30, _elements(fields[6])[0] + _der(0x03, b"\x00" + point))
    tbs = _der(0x30, b"".join(fields))
    signature = pki.intermediate.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    compressed = _der(0x30, tbs + _elements(pki.leaf.der)[1] + _der(0x03, b"\x00" + signature))
    cert = write("compressed.pem", pem(compressed))
    result = tool("generate", "--cert", cert, "--host", MX_HOST)
    assert (result.status, result.out) == (65, "")
    assert "non-canonical form (e.g. a compressed EC point)" in result.err
    assert "use --selector 0" in result.err
    whole = tool("generate", "--cert", cert, "--host", MX_HOST, "--selector", "0")
    assert whole.status == 0


# --- python -m relay (the dane-relay CLI) ---------------------------------------------------


def test_module_entry_point(pki: Pki, chain: Path) -> None:
    argv = ["--chain", str(chain), "--name", MX_HOST, "--at", AT, "--json"]
    for record, status in ((f"3 1 1 {spki_digest(pki.leaf)}", 0), ("3 1 1 " + "00" * 32, 1)):
        done = subprocess.run(
            [sys.executable, "-m", "relay", "tlsa", "verify", *argv, "--tlsa", record],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == status, done.stderr
        assert list(json.loads(done.stdout)) == JSON_KEYS
