"""`dane-relay lookup` and `probe` when the relay is one of the domain's MX hosts: hosts at
or below its own preference are shown as skipped, with the reason, never as candidates,
and the probe never connects to them (RFC 5321 §5.1; delivery stops there too)."""

from __future__ import annotations

import json
import ssl
from functools import partial

import pytest
from test_report_policy import RefusingTransport, _mx_of

from relay.config import Endpoint
from relay.delivery.route import Myself
from relay.probe import probe
from relay.probe import render_json as probe_json
from relay.probe import render_text as probe_text
from relay.report import Outcome, lookup, render_json, render_text
from tests.component.test_report import Scripted, _addr

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

ME = partial(Myself.of, "relay.example.net", (Endpoint("192.0.2.25", 25),))
SKIP_20 = (
    "  skipped: MX preference 20 is not lower than this relay's own (20, relay.example.net): "
    "not tried (RFC 5321 §5.1)"
)
SKIP_30 = SKIP_20.replace("preference 20", "preference 30")


def resolver() -> Scripted:
    # alpha sorts before relay.example.net at the relay's own preference.
    return Scripted(
        _mx_of(
            "example.org",
            (10, "mx1.example.org"),
            (20, "alpha.example.org"),
            (20, "relay.example.net"),
            (30, "worse.example.org"),
        ),
        {
            "mx1.example.org": _addr("mx1.example.org", "192.0.2.10"),
            "alpha.example.org": _addr("alpha.example.org", "192.0.2.20"),
            "relay.example.net": _addr("relay.example.net", "198.51.100.1"),
            "worse.example.org": _addr("worse.example.org", "192.0.2.30"),
        },
        {},
    )


async def test_lookup_lists_hosts_at_or_below_the_relay_as_skipped() -> None:
    r = resolver()
    report = await lookup(r, "example.org", level="may", myself=ME)
    assert report.outcome is Outcome.ATTEMPT
    assert report.usable == ("mx1.example.org",)  # was: mx1, alpha, worse
    assert [(h.host.name, h.decision.reason) for h in report.hosts] == [
        ("mx1.example.org", "level"),
        ("alpha.example.org", "below_myself"),
        ("relay.example.net", "mail_loop"),
        ("worse.example.org", "below_myself"),
    ]
    assert "A worse.example.org" not in r.asked  # never looked up
    lines = render_text(report).splitlines()
    i = lines.index("host alpha.example.org (MX 20)")
    assert lines[i + 1] == SKIP_20
    assert lines[i + 2] == "host relay.example.net (MX 20)"
    j = lines.index("host worse.example.org (MX 30)")
    assert lines[j + 1 :] == [SKIP_30, "result: attempt delivery via mx1.example.org"]
    doc = json.loads(render_json(report))
    assert doc["result"]["hosts"] == ["mx1.example.org"]
    worse = doc["hosts"][3]
    assert worse["decision"]["tls"] == "not tried (this relay is a more preferred MX)"
    assert (worse["decision"]["reason"], worse["decision"]["rfc"]) == (
        "below_myself",
        "RFC 5321 §5.1",
    )
    assert worse["addresses"]["status"] == "not_looked_up"
    assert worse["error"]["kind"] == "mail_loop"


async def test_probe_never_contacts_hosts_at_or_below_the_relay() -> None:
    transport = RefusingTransport()
    report = await probe(
        resolver(),
        transport,  # type: ignore[arg-type]
        ssl.create_default_context(),
        "example.org",
        level="may",
        helo_name="relay.example.net",
        myself=ME,
    )
    assert transport.opened == [("192.0.2.10", 25)]  # was: also alpha and worse
    # mx1 refused: the relay's own entry comes next and stops the domain (deferred, 4.4.6).
    assert report.outcome is Outcome.DEFER
    assert report.reply.startswith("451 4.4.6 mail for example.org loops back to myself")
    lines = probe_text(report).splitlines()
    not_tried = (
        "  connect: not tried (its MX preference is not lower than this relay's, RFC 5321 §5.1)"
    )
    assert lines[lines.index(SKIP_20) + 1] == not_tried
    assert lines[lines.index(SKIP_30) + 1] == not_tried
    assert "  connect: not tried (the host is this relay)" in lines
    doc = json.loads(probe_json(report))
    assert [(h["name"], h["tried"]) for h in doc["hosts"]] == [
        ("mx1.example.org", True),
        ("alpha.example.org", False),
        ("relay.example.net", False),
        ("worse.example.org", False),
    ]
