"""Restart decisions as pure functions of the exit, the history and the time (passed in, never read)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.profile import RestartPolicy, RestartSpec


class Verdict(StrEnum):
    """What to do after an instance's process ended."""

    RESTART = "restart"  # back off, then start again
    LEAVE = "leave"  # EXITED: the policy says this exit is final
    GIVE_UP = "give_up"  # FATAL: crash-loop limit reached


@dataclass(frozen=True)
class ExitFacts:
    """How a run ended."""

    returncode: int | None  # None: never started (spawn error) or start timeout
    was_ready: bool
    ready_since: float | None  # monotonic time readiness passed
    ended_at: float  # monotonic time the exit was observed


def is_failure(spec: RestartSpec, facts: ExitFacts) -> bool:
    """A failed start, a signal death, an exit code outside the expected set, or (policy `always`) any exit
    sooner than `healthy_reset_s` after readiness: a service that keeps exiting cleanly is flapping too."""
    if facts.returncode is None or not facts.was_ready:
        return True
    if facts.returncode not in spec.expected_exit_codes:
        return True
    if spec.policy is RestartPolicy.ALWAYS and facts.ready_since is not None:
        return facts.ended_at - facts.ready_since < spec.healthy_reset_s
    return False


def failures_after(spec: RestartSpec, facts: ExitFacts, failures: int) -> int:
    """The consecutive-failure count after this exit (reset first if it was healthy long enough)."""
    if facts.ready_since is not None and facts.ended_at - facts.ready_since >= spec.healthy_reset_s:
        failures = 0
    return failures + 1 if is_failure(spec, facts) else failures


def verdict(spec: RestartSpec, facts: ExitFacts, failures: int) -> Verdict:
    """Decide from the policy and the (already updated) failure count."""
    failed = is_failure(spec, facts)
    if spec.policy is RestartPolicy.NEVER:
        return Verdict.LEAVE
    if spec.policy is RestartPolicy.ON_FAILURE and not failed:
        return Verdict.LEAVE
    if failures >= spec.crash_loop_limit:
        return Verdict.GIVE_UP
    return Verdict.RESTART


def backoff_delay(spec: RestartSpec, failures: int, unit_random: float) -> float:
    """The wait before the next start: none after a first failure (a one-off crash is back at once, like PM2),
    then backoff_initial_s growing by backoff_factor per further consecutive failure, with jitter, capped.
    A storm is impossible: every quick exit counts as a failure (see is_failure). `unit_random` in [0, 1)."""
    if failures <= 1:
        return 0.0
    base = min(spec.backoff_initial_s * spec.backoff_factor ** (failures - 2), spec.backoff_max_s)
    jittered = base * (1 + spec.jitter * (2 * unit_random - 1))
    return max(0.0, min(jittered, spec.backoff_max_s))
