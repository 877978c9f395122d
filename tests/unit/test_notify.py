"""The sd_notify sender: silent without a service manager, watchdog only for our own pid."""

from __future__ import annotations

import os

from agent.host.notify import Notifier


def test_without_notify_socket_nothing_is_sent() -> None:
    """Outside systemd every call is a no-op that says so."""
    notifier = Notifier({})

    assert (False, False, None) == (notifier.enabled, notifier.notify(READY="1"), notifier.watchdog_interval_s)


def test_watchdog_interval_is_half_the_timeout_and_only_for_our_pid() -> None:
    """WATCHDOG_USEC=10 s gives a ping every 5 s; a WATCHDOG_PID of another process disables it."""
    mine = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())})
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"})

    assert (5.0, None) == (mine.watchdog_interval_s, other.watchdog_interval_s)


def test_an_unreachable_socket_is_reported_not_raised() -> None:
    """A NOTIFY_SOCKET nobody listens on makes notify() return False."""
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"}).notify(READY="1") is False
