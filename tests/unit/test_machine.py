"""The machine phase is computed from stages, services and registry, never hard-coded."""

from __future__ import annotations

from agent.machine import Phase, compute_phase


def phase(**overrides):  # type: ignore[no-untyped-def]
    args = {
        "stopping": False,
        "fatal_error": None,
        "pipeline_finished": True,
        "degraded": {},
        "unhealthy_services": {},
        "registry_connected": True,
    }
    args.update(overrides)
    return compute_phase(**args)


def test_ready_only_when_everything_holds() -> None:
    """Finished pipeline, every required service running and registered: ready, no reasons."""
    assert (Phase.READY, []) == phase()


def test_bootstrapping_until_the_pipeline_finishes() -> None:
    """While stages run, the machine is bootstrapping even if services already run."""
    assert Phase.BOOTSTRAPPING == phase(pipeline_finished=False)[0]


def test_fatal_stage_means_failed_with_the_reason() -> None:
    """A failed fatal stage wins over everything but stopping."""
    assert (Phase.FAILED, ["stage pull_models failed: x"]) == phase(fatal_error="stage pull_models failed: x")


def test_degraded_lists_every_reason() -> None:
    """A down service, a GPU shortfall and a lost registry all show up."""
    result = phase(
        degraded={"gpu requirement": "needs 1"}, unhealthy_services={"web-0": "BACKOFF"}, registry_connected=False
    )

    assert (Phase.DEGRADED, ["gpu requirement: needs 1", "service web-0: BACKOFF", "registry: not connected"]) == result


def test_stopping_wins() -> None:
    """During shutdown the phase is stopping."""
    assert Phase.STOPPING == phase(stopping=True, fatal_error="x")[0]


def test_a_drained_machine_says_so_whatever_else_holds() -> None:
    """After `emp-agent drain` the phase is draining (not ready, not degraded for the stopped services); a
    shutdown still wins."""
    assert (Phase.DRAINING, ["drained by an operator (restart the agent to serve again)"]) == phase(
        draining=True, unhealthy_services={"web-0": "STOPPED"}
    )
    assert Phase.STOPPING == phase(draining=True, stopping=True)[0]
