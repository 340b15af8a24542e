"""relay.metrics: the queue gauges by state and the oldest message's age, which is computed
when /metrics is read (so it grows between queue changes)."""

from __future__ import annotations

from relay.metrics import Metrics


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_queue_states_start_at_zero_and_the_empty_queue_has_age_zero() -> None:
    metrics = Metrics(clock=Clock(1_000.0))
    for state in ("active", "deferred", "held"):
        assert _sample(metrics, "dane_relay_queue_messages", state=state) == 0
    assert _sample(metrics, "dane_relay_queue_oldest_message_age_seconds") == 0


def test_oldest_age_is_computed_at_scrape_time() -> None:
    clock = Clock(1_000.0)
    metrics = Metrics(clock=clock)
    metrics.set_queue(active=1, deferred=2, held=3, oldest_received=900.0)
    assert [
        _sample(metrics, "dane_relay_queue_messages", state=s)
        for s in ("active", "deferred", "held")
    ] == [1, 2, 3]
    assert _sample(metrics, "dane_relay_queue_oldest_message_age_seconds") == 100
    clock.now = 1_060.5
    assert _sample(metrics, "dane_relay_queue_oldest_message_age_seconds") == 160.5
    # A message received "in the future" (clock step back) does not make the age negative.
    metrics.set_queue(active=1, deferred=0, held=0, oldest_received=2_000.0)
    assert _sample(metrics, "dane_relay_queue_oldest_message_age_seconds") == 0
    metrics.set_queue(active=0, deferred=0, held=0, oldest_received=None)
    assert _sample(metrics, "dane_relay_queue_oldest_message_age_seconds") == 0


def test_dane_reasons_use_the_issue_vocabulary() -> None:
    metrics = Metrics()
    for reason in ("no-match", "handshake", "no-usable-records", "tlsa_lookup", "expired"):
        metrics.dane_result("failed", reason)
    assert {
        labels["reason"]
        for family in metrics.registry.collect()
        if family.name == "dane_relay_dane_verifications"
        for sample in family.samples
        if sample.name.endswith("_total")
        for labels in [sample.labels]
    } == {"mismatch", "handshake-error", "unusable-tlsa", "tlsa-lookup-error", "expired"}
