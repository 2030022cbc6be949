"""The proposed pool state: feedback from the session, passive health through it,
state kept across a reconfigure by address, and the all-down message said once."""

from __future__ import annotations

import logging
import time

import pytest

from midway.config.addresses import Address
from midway.upstream.health import HealthChange, HealthSettings
from midway.upstream.state import UpstreamSet, UpstreamSpec, merge_snapshots

from .fakes import ManualClock

A, B, C = (Address(f"10.0.0.{i}", 6379) for i in (5, 6, 7))


def pool(*specs: UpstreamSpec, **kw: object) -> tuple[UpstreamSet, ManualClock, list[HealthChange]]:
    clock = ManualClock()
    changes: list[HealthChange] = []
    s = UpstreamSet("redis", specs, now=clock.now, on_change=changes.append, **kw)  # type: ignore[arg-type]
    return s, clock, changes


def test_feedback_counts_active_connections_for_least_connections() -> None:
    s, _, _ = pool(UpstreamSpec(A), UpstreamSpec(B), balance="least_connections")
    held = []
    for _ in range(50):  # 50 long-lived connections, all to whichever is least busy
        u = s.order("192.0.2.1")[0]
        u.connected()
        held.append(u)
    assert [u.active for u in s.upstreams] == [25, 25]
    for u in held[:20]:
        if u.address == A:
            u.closed()
    assert s.order("192.0.2.1")[0].address == A  # the one with connections freed
    assert s.snapshot()[0]["active"] == 25 - sum(1 for u in held[:20] if u.address == A)


def test_failed_connects_eject_an_upstream_and_it_comes_back() -> None:
    s, clock, changes = pool(UpstreamSpec(A), UpstreamSpec(B),
                             health=HealthSettings(eject_after=2, eject_s=5.0))
    a = s.upstreams[0]
    a.connect_failed("connection refused")
    a.connect_failed("connection refused")
    assert [u.address for u in s.order("192.0.2.1")] == [B]
    assert changes[-1].text.startswith("upstream 10.0.0.5:6379 of proxy redis is down: "
                                       "connection refused (2 connects failed in a row)")
    clock.t += 5
    assert {u.address for u in s.order("192.0.2.1")} == {A, B}
    assert s.snapshot()[0]["connect_failures"] == 2


def test_resets_before_the_first_byte_count_and_clean_closes_clear() -> None:
    s, _, changes = pool(UpstreamSpec(A), UpstreamSpec(B), health=HealthSettings(eject_after=3))
    a = s.upstreams[0]
    for _ in range(2):
        a.connected()
        a.closed(reset_before_response=True)
    a.connected()
    a.closed()  # a clean close starts the count over
    a.connected()
    a.closed(reset_before_response=True)
    assert a.up
    a.connected()
    a.closed(reset_before_response=True)
    a.connected()
    a.closed(reset_before_response=True)
    assert not a.up and a.active == 0
    assert changes[-1].text.endswith("reset before its first byte (3 connects failed in a row); "
                                     "ejected for 10 s")


def test_round_robin_hears_about_failed_connects() -> None:
    s, _, _ = pool(UpstreamSpec(A, weight=4), UpstreamSpec(B, weight=4),
                   health=HealthSettings(eject_after=0))
    first = s.order("")[0]  # a connection tries A first, and fails
    assert first.address == A
    first.connect_failed("connection refused")
    picks = [s.order("")[0].address for _ in range(8)]
    assert picks.count(A) < picks.count(B)  # nginx's effective_weight slow start


def test_reconfigure_keeps_state_by_address() -> None:
    s, _, _ = pool(UpstreamSpec(A), UpstreamSpec(B), balance="least_connections",
                   health=HealthSettings(interval_s=2.0))
    a, b = s.upstreams
    a.connected()
    b.health.check_failed("connection refused")
    s.reconfigure([UpstreamSpec(C), UpstreamSpec(B, weight=3, backup=True), UpstreamSpec(A)])
    c, b2, a2 = s.upstreams
    assert a2 is a and a2.active == 1  # the same live state
    assert b2 is b and not b2.up and (b2.weight, b2.backup) == (3, True)  # health kept
    assert c.up and c.active == 0  # a new address starts up, as in HAProxy
    s.reconfigure([UpstreamSpec(C)])
    a.closed()  # a connection to a removed upstream still reports harmlessly
    assert [u.address for u in s.upstreams] == [C]


def test_a_reconfigure_that_removes_a_down_upstream_does_not_call_it_up() -> None:
    # A reload that drops a dead upstream and turns active checks off at once:
    # only the upstreams kept take the new settings, so the removed one is neither
    # logged as "up: active checks turned off" nor told to observers as up.
    told: list[tuple[Address, bool]] = []
    s, _, changes = pool(UpstreamSpec(A), UpstreamSpec(B), UpstreamSpec(C),
                         health=HealthSettings(interval_s=2.0),
                         on_health=lambda address, up: told.append((address, up)))
    _, b, c = s.upstreams
    b.health.check_failed("connection refused")
    c.health.check_failed("connection refused")
    assert told == [(B, False), (C, False)]
    s.reconfigure([UpstreamSpec(A), UpstreamSpec(C)], health=HealthSettings())
    assert [ch.text for ch in changes[2:]] == [
        "upstream 10.0.0.7:6379 of proxy redis is up: active checks turned off"]
    assert told[2:] == [(C, True)]


def test_reconfigure_keeps_the_balancer_unless_balance_changes() -> None:
    s, _, _ = pool(UpstreamSpec(A), UpstreamSpec(B), UpstreamSpec(C))
    assert s.order("")[0].address == A
    s.reconfigure([UpstreamSpec(A), UpstreamSpec(B), UpstreamSpec(C)])
    assert s.order("")[0].address == B  # the rotation went on
    s.reconfigure([UpstreamSpec(A), UpstreamSpec(B), UpstreamSpec(C)], balance="hash_source")
    assert s.balancer.name == "hash_source"


def test_a_bad_reconfigure_changes_nothing() -> None:
    s, _, _ = pool(UpstreamSpec(A))
    with pytest.raises(ValueError, match="listed twice"):
        s.reconfigure([UpstreamSpec(B), UpstreamSpec(B)], balance="random_two")
    with pytest.raises(ValueError, match="at least one upstream"):
        s.reconfigure([])
    assert [u.address for u in s.upstreams] == [A] and s.balance == "round_robin"


def test_retries_bound_the_order() -> None:
    s, _, _ = pool(UpstreamSpec(A), UpstreamSpec(B), UpstreamSpec(C))
    assert len(s.order("")) == 3
    assert len(s.order("", retries=1)) == 2
    assert len(s.order("", retries=0)) == 1


def test_all_down_is_said_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    s, _, _ = pool(UpstreamSpec(A), UpstreamSpec(B),
                   health=HealthSettings(interval_s=1.0, rise=2, fall=1))
    for u in s.upstreams:
        u.health.check_failed("connection refused")
    with caplog.at_level(logging.INFO, logger="midway"):
        for _ in range(100):
            assert s.order("192.0.2.1") == []
        s.upstreams[0].health.check_passed()
        s.upstreams[0].health.check_passed()
        assert s.order("192.0.2.1")
        s.upstreams[0].health.check_failed("connection refused")
        assert s.order("192.0.2.1") == []
    said = [r.getMessage() for r in caplog.records]
    assert said.count("proxy redis: no upstream is up; new clients are closed (no_upstream)") == 2
    assert said.count("proxy redis: an upstream is up again") == 1


def test_health_changes_are_logged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    s = UpstreamSet("redis", [UpstreamSpec(B)], health=HealthSettings(interval_s=1.0))
    with caplog.at_level(logging.INFO, logger="midway"):
        s.upstreams[0].health.check_failed("connection refused")
    assert ("midway", logging.WARNING,
            "upstream 10.0.0.6:6379 of proxy redis is down: connection refused (1 check)"
            ) in caplog.record_tuples


def test_snapshot_shows_what_the_admin_api_lists() -> None:
    s, clock, _ = pool(UpstreamSpec(A, weight=3), UpstreamSpec(B, backup=True),
                       health=HealthSettings(interval_s=1.0))
    s.upstreams[1].health.check_failed("timed out")
    snapshot = s.snapshot()  # one: each maps the clock to wall time anew (to the ms)
    at = snapshot[1]["last_check"]["at"]
    assert snapshot == [
        {"address": "10.0.0.5:6379", "weight": 3, "backup": False, "state": "up", "active": 0,
         "connects": 0, "connect_failures": 0, "last_check": None},
        {"address": "10.0.0.6:6379", "weight": 1, "backup": True, "state": "down", "active": 0,
         "connects": 0, "connect_failures": 0,
         "last_check": {"at": at, "passed": False, "reason": "timed out"}},
    ]
    # Wall-clock seconds, for a reader of the admin API (the machine's clock is
    # monotonic): the fake clock has not moved since the check, so "just now".
    assert abs(at - time.time()) < 60
    assert s.checked() == list(s.upstreams)


def test_workers_snapshots_merge_into_one_list() -> None:
    """With several workers the admin API adds their connections up, shows an
    upstream down where any worker has it down, and the latest check."""
    def entry(address: str, active: int, state: str = "up",
              at: float | None = None) -> dict[str, object]:
        check = None if at is None else {"at": at, "passed": state == "up", "reason": ""}
        return {"address": address, "weight": 2, "backup": False, "state": state,
                "active": active, "connects": 10 * active, "connect_failures": 1,
                "last_check": check}

    merged = merge_snapshots([
        [entry("a:1", 3, at=5.0), entry("b:1", 1)],
        [entry("a:1", 4, "down", at=7.0), entry("b:1", 0), entry("c:1", 2)],
    ])
    assert [m["address"] for m in merged] == ["a:1", "b:1", "c:1"]
    a, b, c = merged
    assert (a["active"], a["connects"], a["connect_failures"]) == (7, 70, 2)
    assert a["state"] == "down" and a["last_check"] == {"at": 7.0, "passed": False, "reason": ""}
    assert b["state"] == "up" and b["active"] == 1 and b["last_check"] is None
    assert c["active"] == 2 and a["weight"] == 2
    assert merge_snapshots([]) == []
    # An SNI route's upstream is its own entry, even at an address the proxy's
    # own upstreams (route None) have too.
    own, routed = entry("a:1", 1), {**entry("a:1", 2, "down"), "route": "api"}
    merged = merge_snapshots([[{**own, "route": None}, routed], [{**own, "route": None}, routed]])
    assert [(m["route"], m["active"], m["state"]) for m in merged] == [
        (None, 2, "up"), ("api", 4, "down")]


@pytest.mark.parametrize("weight", [-1, 257])
def test_weight_out_of_range(weight: int) -> None:
    with pytest.raises(ValueError, match="weight: must be 0-256"):
        UpstreamSpec(A, weight=weight)


def test_when_every_upstream_is_ejected_they_are_dialled_anyway(
        caplog: pytest.LogCaptureFixture) -> None:
    """The panic rule: a lone upstream that failed a few connects (it was
    restarting) is still dialled, not refused for eject_s; it stays down in its
    state, failures meanwhile do not extend the ejection, and the outage is said
    once."""
    s, clock, changes = pool(UpstreamSpec(A), health=HealthSettings(eject_after=2, eject_s=10.0))
    a = s.upstreams[0]
    with caplog.at_level(logging.INFO, logger="midway"):
        a.connect_failed("connection refused")
        a.connect_failed("connection refused")
        assert not a.up
        for _ in range(5):
            assert s.order("192.0.2.1") == [a]
            a.connect_failed("connection refused")  # still failing: no new ejection
        clock.t += 10
        assert a.up and s.order("192.0.2.1") == [a]
    said = [r.getMessage() for r in caplog.records]
    assert said.count("proxy redis: no upstream is up; dialling those ejected by passive "
                      "health anyway until one is back") == 1
    assert said.count("proxy redis: an upstream is up again") == 1
    assert [change.up for change in changes] == [False, True]  # one ejection, then back


def test_panic_takes_turns_primaries_first_and_never_a_drained_or_checked_down_one() -> None:
    s, _, _ = pool(UpstreamSpec(A), UpstreamSpec(B), UpstreamSpec(C, backup=True),
                   health=HealthSettings(eject_after=1))
    for u in s.upstreams:
        u.connect_failed("connection refused")
    firsts = [s.order("")[0].address for _ in range(4)]
    assert sorted(firsts, key=str) == [A, A, B, B]  # in turn, the backup only after them
    assert [u.address for u in s.order("")][2:] == []  # primaries only, as eligible()
    s.upstreams[0].weight = 0  # drained: never dialled
    assert {u.address for u in s.order("")} == {B}
    checked, _, _ = pool(UpstreamSpec(A), health=HealthSettings(interval_s=1.0, fall=1))
    checked.upstreams[0].health.check_failed("connection refused")
    assert checked.order("") == []  # down by active checks: refused (no_upstream)


def test_a_backup_is_dialled_in_panic_only_when_no_primary_is_ejected() -> None:
    s, _, _ = pool(UpstreamSpec(A, weight=0), UpstreamSpec(C, backup=True),
                   health=HealthSettings(eject_after=1))
    s.upstreams[1].connect_failed("connection refused")
    assert [u.address for u in s.order("")] == [C]


def test_an_outage_that_turns_from_panic_to_refusal_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """Dialling the ejected upstreams, then none left to dial (drained in a
    reload): clients are refused now, and the log says that too."""
    s, _, _ = pool(UpstreamSpec(A), health=HealthSettings(eject_after=1))
    with caplog.at_level(logging.INFO, logger="midway"):
        s.upstreams[0].connect_failed("connection refused")
        assert s.order("")  # panic
        s.upstreams[0].weight = 0
        assert s.order("") == []
        assert s.order("") == []
    said = [r.getMessage() for r in caplog.records]
    assert said == ["proxy redis: no upstream is up; dialling those ejected by passive "
                    "health anyway until one is back",
                    "proxy redis: no upstream is up; new clients are closed (no_upstream)"]
