"""Restart policy: pure decisions from the exit, the history and the time passed in."""

from __future__ import annotations

import pytest

from agent.profile import RestartPolicy, RestartSpec
from agent.supervisor.policy import ExitFacts, Verdict, backoff_delay, failures_after, verdict
from agent.supervisor.states import IllegalTransition, ServiceState, check_transition

SPEC = RestartSpec(
    backoff_initial_s=1, backoff_max_s=30, backoff_factor=2, jitter=0.2, crash_loop_limit=3, healthy_reset_s=30
)


def test_first_restart_is_immediate_then_backoff_doubles_and_is_capped() -> None:
    """Without jitter the delays after 1..8 consecutive failures are 0, 1, 2, 4, 8, 16, 30, 30 seconds."""
    spec = SPEC.model_copy(update={"jitter": 0.0})

    assert [0, 1, 2, 4, 8, 16, 30, 30] == [backoff_delay(spec, n, 0.5) for n in range(1, 9)]


def test_jitter_stays_within_its_band_and_under_the_cap() -> None:
    """Jitter moves the delay by at most +-20% and never past backoff_max_s."""
    assert (3.2, 4.8) == (backoff_delay(SPEC, 4, 0.0), backoff_delay(SPEC, 4, 1.0))
    assert 30 == backoff_delay(SPEC, 10, 1.0)


def test_failed_start_counts_and_crash_loop_gives_up() -> None:
    """A process that dies before readiness is a failure; the third in a row is FATAL."""
    failures = 0
    verdicts = []
    for now in (10.0, 20.0, 30.0):
        facts = ExitFacts(returncode=1, was_ready=False, ready_since=None, ended_at=now)
        failures = failures_after(SPEC, facts, failures)
        verdicts.append(verdict(SPEC, facts, failures))

    assert [Verdict.RESTART, Verdict.RESTART, Verdict.GIVE_UP] == verdicts


def test_healthy_period_resets_the_failure_count() -> None:
    """After being ready for healthy_reset_s, a crash counts as the first failure again."""
    facts = ExitFacts(returncode=-9, was_ready=True, ready_since=100.0, ended_at=131.0)

    assert 1 == failures_after(SPEC, facts, failures=2)
    assert 3 == failures_after(SPEC, ExitFacts(-9, True, 100.0, 129.0), failures=2)


@pytest.mark.parametrize(
    ("policy", "code", "expected"),
    [
        (RestartPolicy.ALWAYS, 0, Verdict.RESTART),
        (RestartPolicy.ON_FAILURE, 0, Verdict.LEAVE),
        (RestartPolicy.ON_FAILURE, 3, Verdict.RESTART),
        (RestartPolicy.ON_FAILURE, -15, Verdict.RESTART),
        (RestartPolicy.NEVER, 3, Verdict.LEAVE),
    ],
)
def test_policies(policy: RestartPolicy, code: int, expected: Verdict) -> None:
    """always restarts any exit; on-failure only unexpected codes and signals; never leaves it."""
    spec = SPEC.model_copy(update={"policy": policy})
    facts = ExitFacts(code, True, 0.0, 100.0)

    assert expected == verdict(spec, facts, failures_after(spec, facts, 0))


def test_clean_exits_soon_after_ready_are_flapping_under_always() -> None:
    """`always`: exiting 0 a second after ready counts toward backoff and the crash-loop limit; after a
    healthy period it does not."""
    quick = ExitFacts(0, True, ready_since=100.0, ended_at=101.0)
    late = ExitFacts(0, True, ready_since=100.0, ended_at=200.0)

    assert (1, 0) == (failures_after(SPEC, quick, 0), failures_after(SPEC, late, 0))
    assert Verdict.GIVE_UP == verdict(SPEC, quick, failures_after(SPEC, quick, 2))


def test_a_service_that_exits_cleanly_at_once_cannot_storm() -> None:
    """`true` under `always`: each exit is a failure, so the second restart already waits, and the crash-loop
    limit ends it."""
    spec = SPEC.model_copy(update={"jitter": 0.0})
    failures, delays = 0, []
    for n in range(3):
        facts = ExitFacts(0, True, ready_since=float(n), ended_at=n + 0.01)
        failures = failures_after(spec, facts, failures)
        delays.append((backoff_delay(spec, failures, 0.5), verdict(spec, facts, failures)))

    assert [(0.0, Verdict.RESTART), (1.0, Verdict.RESTART), (2.0, Verdict.GIVE_UP)] == delays


def test_only_legal_transitions_are_allowed() -> None:
    """STOPPED cannot jump to RUNNING; STARTING can become RUNNING."""
    check_transition(ServiceState.STARTING, ServiceState.RUNNING)

    with pytest.raises(IllegalTransition):
        check_transition(ServiceState.STOPPED, ServiceState.RUNNING)
