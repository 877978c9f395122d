"""Machine identity: stable per host, never the raw /etc/machine-id, and re-keyed when a state dir (a golden
image baked with an identity) lands on another host."""

from __future__ import annotations

from pathlib import Path

from agent.identity import IdSource, machine_id


def host(tmp_path: Path, name: str, etc_id: str, cloud_id: str | None = None) -> tuple[Path, Path]:
    etc = tmp_path / f"{name}-machine-id"
    etc.write_text(etc_id + "\n")
    cloud = tmp_path / f"{name}-instance-id"
    if cloud_id is not None:
        cloud.write_text(cloud_id + "\n")
    return etc, cloud


def test_derived_id_is_stable_and_does_not_expose_the_host_id(tmp_path: Path) -> None:
    """Two starts on one host give one id; it is a hash, not /etc/machine-id itself."""
    etc, cloud = host(tmp_path, "a", "0123456789abcdef0123456789abcdef")
    state = tmp_path / "state"

    first = machine_id(None, state, etc, cloud)
    second = machine_id(None, state, etc, cloud)

    assert first == second
    assert first.startswith("emp-")
    assert "0123456789abcdef" not in first


def test_configured_id_wins(tmp_path: Path) -> None:
    """EMP_AGENT_MACHINE_ID is used as given."""
    etc, cloud = host(tmp_path, "a", "aaaa")

    assert "gpu-17" == machine_id("gpu-17", tmp_path / "state", etc, cloud)


def test_state_copied_to_another_host_gets_a_new_id(tmp_path: Path) -> None:
    """A state dir baked into an image on host A and booted on host B (its own /etc/machine-id) is re-keyed; B
    keeps its new id afterwards."""
    etc_a, cloud = host(tmp_path, "a", "aaaaaaaa")
    etc_b, _ = host(tmp_path, "b", "bbbbbbbb")
    state = tmp_path / "state"
    baked = machine_id(None, state, etc_a, cloud)

    on_b = machine_id(None, state, etc_b, cloud)

    assert baked != on_b
    assert on_b == machine_id(None, state, etc_b, cloud)


def test_an_id_persisted_by_an_older_agent_is_kept(tmp_path: Path) -> None:
    """A machine-id file without the derived-from line (an earlier version) is kept as it is."""
    etc, cloud = host(tmp_path, "a", "aaaa")
    state = tmp_path / "state"
    state.mkdir()
    (state / "machine-id").write_text("emp-legacy0000000001\n")

    assert "emp-legacy0000000001" == machine_id(None, state, etc, cloud)


def test_cloud_init_source_follows_the_instance(tmp_path: Path) -> None:
    """With machine_id_source=cloud-init, two VMs from one image (same /etc/machine-id) get different ids, and a
    host without cloud-init falls back to /etc/machine-id."""
    etc, cloud_1 = host(tmp_path, "vm1", "same-image-id", "i-0001")
    _, cloud_2 = host(tmp_path, "vm2", "same-image-id", "i-0002")
    _, no_cloud = host(tmp_path, "bare", "same-image-id")

    first = machine_id(None, tmp_path / "s1", etc, cloud_1, IdSource.CLOUD_INIT)
    second = machine_id(None, tmp_path / "s2", etc, cloud_2, IdSource.CLOUD_INIT)
    bare = machine_id(None, tmp_path / "s3", etc, no_cloud, IdSource.CLOUD_INIT)

    assert len({first, second, bare}) == 3
    assert bare == machine_id(None, tmp_path / "s4", etc, no_cloud, IdSource.MACHINE_ID)


def test_a_host_without_an_id_gets_a_random_one_until_it_has_its_own(tmp_path: Path) -> None:
    """An empty /etc/machine-id (an image prepared for cloning, before first boot) gives a random id, kept while
    the host has none; once systemd writes the host's id, the machine id is derived from it."""
    etc, cloud = host(tmp_path, "a", "")
    state = tmp_path / "state"

    first = machine_id(None, state, etc, cloud)
    again = machine_id(None, state, etc, cloud)
    etc.write_text("fresh-first-boot-id\n")
    own = machine_id(None, state, etc, cloud)

    assert first == again
    assert own != first
    assert own == machine_id(None, state, etc, cloud)
