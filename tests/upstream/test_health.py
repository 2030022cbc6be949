"""The health state machine on a manual clock: HAProxy's rise/fall, passive
ejection and its cool-down, probation, the log lines, and check scheduling."""

from __future__ import annotations

import random

import pytest

from midway.upstream.health import CheckSchedule, HealthChange, HealthMachine, HealthSettings

from .fakes import ManualClock

LABEL = "upstream 10.0.0.6:6379 of proxy redis"


def machine(**kw: object) -> tuple[HealthMachine, ManualClock, list[HealthChange]]:
    clock = ManualClock()
    changes: list[HealthChange] = []
    m = HealthMachine(HealthSettings(**kw), LABEL, clock.now, changes.append)  # type: ignore[arg-type]
    return m, clock, changes


CHECKS = {"interval_s": 2.0, "rise": 2, "fall": 3}


def test_starts_up_and_the_first_failing_check_takes_it_down() -> None:
    m, _, changes = machine(**CHECKS)
    assert m.up  # before any check, as HAProxy's default init-state "up"
    change = m.check_failed("connection refused")
    assert not m.up and change is not None
    assert change.text == f"{LABEL} is down: connection refused (1 check)"
    assert changes == [change]


def test_a_proven_upstream_needs_fall_consecutive_failures() -> None:
    m, _, changes = machine(**CHECKS)
    m.check_passed()
    assert m.check_failed("timed out") is None
    assert m.check_failed("timed out") is None
    m.check_passed()  # a pass in between starts the count over
    m.check_failed("timed out")
    m.check_failed("timed out")
    assert m.up and changes == []
    change = m.check_failed("connection refused")
    assert not m.up
    assert change is not None
    assert change.text == f"{LABEL} is down: connection refused (3 checks)"


def test_a_down_upstream_needs_rise_consecutive_passes() -> None:
    m, _, changes = machine(**CHECKS)
    m.check_failed("connection refused")
    m.check_failed("connection refused")
    assert m.check_passed() is None and not m.up
    m.check_failed("connection refused")  # a failure in between starts over
    assert m.check_passed() is None and not m.up
    change = m.check_passed()
    assert m.up and change is not None
    assert change.text == f"{LABEL} is up: check passed (2 checks)"
    assert [c.up for c in changes] == [False, True]


def test_rise_and_fall_of_one_flip_at_once() -> None:
    m, _, _ = machine(interval_s=1.0, rise=1, fall=1)
    for _ in range(3):
        m.check_failed("x")
        assert not m.up
        m.check_passed()
        assert m.up


def test_last_check_is_recorded_with_its_time() -> None:
    m, clock, _ = machine(**CHECKS)
    assert m.last_check is None
    clock.t = 1005.0
    m.check_failed("no '+PONG' in the reply within the timeout (no reply)")
    assert m.last_check == (1005.0, False, "no '+PONG' in the reply within the timeout (no reply)")


def test_passive_ejection_and_cool_down_without_checks() -> None:
    m, clock, changes = machine(eject_after=3, eject_s=10.0)
    m.connect_failed("connection refused")
    m.connect_failed("connection refused")
    assert m.up
    m.connect_failed("connection refused")
    assert not m.up
    assert changes[-1].text == (f"{LABEL} is down: connection refused (3 connects failed in a "
                                "row); ejected for 10 s")
    clock.t += 9.999
    assert not m.up
    clock.t += 0.001
    assert m.up  # tried again
    assert changes[-1].text == f"{LABEL} is up: trying it again after 10 s ejected"
    assert changes[-1].at == clock.t


def test_after_a_cool_down_one_failure_ejects_again_until_a_good_connection() -> None:
    m, clock, changes = machine(eject_after=3, eject_s=10.0)
    for _ in range(3):
        m.connect_failed("connection refused")
    clock.t += 10
    assert m.up
    m.connect_failed("connection refused")  # probation: once is enough
    assert not m.up
    # The line says what happened: one failure, not three in a row.
    assert changes[-1].text == (f"{LABEL} is down: connection refused (failed again on "
                                "probation); ejected for 10 s")
    clock.t += 10
    assert m.up
    m.connection_ok()  # a good connection ends probation
    m.connect_failed("connection refused")
    m.connect_failed("connection refused")
    assert m.up
    m.connect_failed("connection refused")  # off probation: counted in a row again
    assert changes[-1].text.endswith("connection refused (3 connects failed in a row); "
                                     "ejected for 10 s")


def test_a_good_connection_resets_the_passive_count() -> None:
    m, _, changes = machine(eject_after=3)
    for _ in range(5):
        m.connect_failed("connection refused")
        m.connect_failed("connection refused")
        m.connection_ok()
    assert m.up and changes == []


def test_with_active_checks_only_the_checks_bring_an_ejected_upstream_back() -> None:
    m, clock, changes = machine(eject_after=2, eject_s=5.0, **CHECKS)
    m.check_passed()
    m.connect_failed("connection refused")
    m.connect_failed("connection refused")
    assert not m.up
    assert changes[-1].text == (f"{LABEL} is down: connection refused (2 connects failed in a "
                                "row); checks will bring it back")
    clock.t += 3600
    assert not m.up  # no timer
    m.check_passed()
    assert not m.up
    m.check_passed()
    assert m.up


def test_passive_results_are_ignored_when_off_or_already_down() -> None:
    m, _, changes = machine(eject_after=0)
    for _ in range(10):
        m.connect_failed("connection refused")
    assert m.up and changes == []
    m, _, changes = machine(eject_after=1, **CHECKS)
    m.check_failed("connection refused")
    m.connect_failed("connection refused")
    assert len(changes) == 1


def test_turning_checks_off_brings_a_checked_down_upstream_back() -> None:
    m, _, changes = machine(**CHECKS)
    m.check_failed("connection refused")
    m.replace_settings(HealthSettings(interval_s=0))
    assert m.up and changes[-1].text == f"{LABEL} is up: active checks turned off"


def test_new_rise_and_fall_apply_to_the_kept_state() -> None:
    m, _, _ = machine(**CHECKS)
    m.check_passed()
    m.replace_settings(HealthSettings(interval_s=2.0, rise=1, fall=1))
    assert m.up
    m.check_failed("x")
    assert not m.up


@pytest.mark.parametrize("kw, message", [
    ({"interval_s": -1}, "interval_s: must be 0"),
    ({"timeout_s": 0}, "timeout_s: must be more than 0"),
    ({"rise": 0}, "rise: must be at least 1"),
    ({"fall": 0}, "fall: must be at least 1"),
    ({"eject_after": -1}, "eject_after: must be 0"),
    ({"eject_s": 0}, "eject_s: must be more than 0 while eject_after is on"),
    ({"expect": b"x" * 20000}, "expect: must be at most 16384 bytes"),
])
def test_bad_settings_are_named(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HealthSettings(**kw)  # type: ignore[arg-type]


def test_eject_s_may_be_zero_when_passive_health_is_off() -> None:
    assert HealthSettings(eject_after=0, eject_s=0).eject_after == 0


# -- scheduling ----------------------------------------------------------------


def test_first_checks_of_many_proxies_spread_over_the_interval() -> None:
    rng = random.Random(5)
    firsts = sorted(CheckSchedule(2.0, rng).first_delay() for _ in range(200))
    assert 0 <= firsts[0] and firsts[-1] < 2.0
    # Spread over the whole interval: every quarter has some.
    assert all(any(q * 0.5 <= f < (q + 1) * 0.5 for f in firsts) for q in range(4))


def test_later_checks_keep_the_interval_within_the_spread() -> None:
    s = CheckSchedule(10.0, random.Random(6))
    delays = [s.next_delay() for _ in range(1000)]
    assert all(9.5 <= d <= 10.5 for d in delays)
    assert max(delays) - min(delays) > 0.9  # jittered, not constant
    assert abs(sum(delays) / len(delays) - 10.0) < 0.05  # the interval holds on average


def test_two_proxies_drift_apart_rather_than_probing_in_step() -> None:
    a, b = CheckSchedule(1.0, random.Random(1)), CheckSchedule(1.0, random.Random(2))
    ta, tb = a.first_delay(), b.first_delay()
    gaps = []
    for _ in range(100):
        ta += a.next_delay()
        tb += b.next_delay()
        gaps.append(abs(ta - tb))
    assert len({round(g, 6) for g in gaps}) > 90  # the phase between them keeps moving


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="interval above 0"):
        CheckSchedule(0)
    with pytest.raises(ValueError, match="between 0 and 0.5"):
        CheckSchedule(1.0, spread=0.6)
