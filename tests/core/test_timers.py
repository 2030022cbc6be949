"""Connection deadlines as plain arithmetic: no clock, no sleeping."""

from midway.core.observer import CloseReason
from midway.core.timers import ConnectionTimers


def test_idle_deadline_moves_with_activity() -> None:
    t = ConnectionTimers(idle_timeout_s=10, half_close_timeout_s=0, now=100.0)
    assert t.next_deadline() == 110.0
    assert t.expired(109.999) is None
    t.activity(105.0)
    assert t.next_deadline() == 115.0
    assert t.expired(110.0) is None
    assert t.expired(115.0) is CloseReason.IDLE_TIMEOUT


def test_zero_disables_both() -> None:
    t = ConnectionTimers(idle_timeout_s=0, half_close_timeout_s=0, now=0.0)
    t.half_closed(1.0)
    assert t.next_deadline() is None
    assert t.expired(1e9) is None


def test_half_close_deadline_counts_from_the_first_fin_only() -> None:
    t = ConnectionTimers(idle_timeout_s=0, half_close_timeout_s=5, now=0.0)
    assert t.next_deadline() is None
    t.half_closed(2.0)
    t.half_closed(4.0)  # a later FIN does not extend it
    assert t.next_deadline() == 7.0
    t.activity(6.5)  # traffic on the other direction does not extend it either
    assert t.expired(6.99) is None
    assert t.expired(7.0) is CloseReason.HALF_CLOSE_TIMEOUT


def test_earliest_deadline_wins() -> None:
    t = ConnectionTimers(idle_timeout_s=3, half_close_timeout_s=60, now=0.0)
    t.half_closed(1.0)
    assert t.next_deadline() == 3.0
    assert t.expired(3.0) is CloseReason.IDLE_TIMEOUT
    t.activity(2.9)
    t.activity(50.0)
    assert t.next_deadline() == 53.0
    assert t.expired(61.0) is CloseReason.HALF_CLOSE_TIMEOUT
