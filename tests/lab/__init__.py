"""The integration-test lab: real nsd, unbound, TLS SMTP receivers and the relay process.

Everything runs on loopback in 127.R.0.0/16 (R chosen per session, see `network`), is
owned by the test session, and is stopped by pid when the session (or test) ends. See
tests/integration/conftest.py for the fixtures built on these modules.
"""

from .certs import CA, Leaf, make_ca, make_self_signed, spki_der, tlsa_data
from .dnslab import DnsLab, start_dns_lab
from .dnsservers import LabStartError
from .network import AddressPlan
from .receivers import ReceivedMessage, Receiver, ReceiverPool, StallReceiver
from .relayproc import (
    RelayProcess,
    SmtpReply,
    send_mail,
    split_hostport,
    stop_all_relays,
    write_relay_config,
)
from .scenarios import (
    NULL_MX,
    SCENARIOS,
    SMTP_PORT,
    HostSpec,
    MxHost,
    Scenario,
    ScenarioSpec,
    TlsaRecord,
    TlsaSpec,
)
from .waiting import LabTimeout, poll_until

__all__ = [
    "CA",
    "NULL_MX",
    "SCENARIOS",
    "SMTP_PORT",
    "AddressPlan",
    "DnsLab",
    "HostSpec",
    "LabStartError",
    "LabTimeout",
    "Leaf",
    "MxHost",
    "ReceivedMessage",
    "Receiver",
    "ReceiverPool",
    "RelayProcess",
    "Scenario",
    "ScenarioSpec",
    "SmtpReply",
    "StallReceiver",
    "TlsaRecord",
    "TlsaSpec",
    "make_ca",
    "make_self_signed",
    "poll_until",
    "send_mail",
    "spki_der",
    "split_hostport",
    "start_dns_lab",
    "stop_all_relays",
    "tlsa_data",
    "write_relay_config",
]
