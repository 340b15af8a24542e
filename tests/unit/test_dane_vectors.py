"""Conformance: relay.dane.verify against the external DANE vectors (shared/conformance).

The vectors come from OpenSSL, GnuTLS and Stalwart test data; ``expected_smtp`` is the
RFC 7672 outcome. The file is read in place (never copied into the project): by default
``<repo root>/../shared/conformance/dane-vectors/vectors.json``, or ``$DANE_VECTORS``.
A missing file fails the run; it is never skipped.
"""

import json
import os
import ssl
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from relay.dane import DaneStatus, TlsaRecord, verify

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "conformance" / "dane-vectors" / "vectors.json"
VECTORS_PATH = Path(os.environ.get("DANE_VECTORS", DEFAULT_PATH))
MISSING = "<vectors.json missing>"


@cache
def load_vectors() -> dict[str, dict[str, Any]]:
    with VECTORS_PATH.open(encoding="utf-8") as handle:
        vectors: list[dict[str, Any]] = json.load(handle)
    return {vector["id"]: vector for vector in vectors}


def vector_ids() -> list[str]:
    try:
        return list(load_vectors())
    except FileNotFoundError:
        return [MISSING]


def test_vector_file_is_readable_and_ids_unique() -> None:
    if not VECTORS_PATH.is_file():
        pytest.fail(f"DANE conformance vectors not found at {VECTORS_PATH} (set DANE_VECTORS)")
    with VECTORS_PATH.open(encoding="utf-8") as handle:
        ids = [vector["id"] for vector in json.load(handle)]
    assert ids and len(ids) == len(set(ids))


@pytest.mark.parametrize("vector_id", vector_ids())
def test_vector(vector_id: str) -> None:
    if vector_id == MISSING:
        pytest.fail(f"DANE conformance vectors not found at {VECTORS_PATH} (set DANE_VECTORS)")
    vector = load_vectors()[vector_id]
    records = [
        TlsaRecord(r["usage"], r["selector"], r["mtype"], bytes.fromhex(r["data_hex"]))
        for r in vector["tlsa"]
    ]
    chain = [ssl.PEM_cert_to_DER_cert(pem) for pem in vector["chain_pem"]]
    now = datetime.fromisoformat(vector["validation_time"].replace("Z", "+00:00"))
    expected = vector["expected_smtp"]

    verdict = verify(records, chain, vector["reference_names"], now)

    context = f"{vector['description']}\nverdict: {verdict}"
    assert verdict.status is DaneStatus(expected["status"]), context
    if verdict.status is DaneStatus.VERIFIED:
        assert verdict.match_depth == expected["match_depth"], context
