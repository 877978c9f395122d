"""Profiles: extends, validation errors naming file and field, and every shipped profile validating."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.profile import ProbeKind, load_profile
from tests.conftest import REPO

PROFILES = REPO / "profiles"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES.glob("*.toml")))
def test_shipped_profiles_validate(name: str) -> None:
    """Every profile in profiles/ loads without a problem."""
    profile = load_profile(name, PROFILES)

    assert name == profile.name


def test_extends_merges_tables_and_replaces_lists(tmp_path: Path) -> None:
    """A child profile adds services, overrides single keys of inherited tables, and replaces lists."""
    write(tmp_path, "base.toml", '[env]\nA = "1"\nB = "2"\n[services.web]\ncommand = ["a", "b"]\nport = 80\n')
    write(
        tmp_path,
        "child.toml",
        'extends = "base"\n[env]\nB = "3"\n[services.web]\ncommand = ["c"]\n[services.worker]\ncommand = ["w"]\n',
    )

    profile = load_profile("child", tmp_path)

    assert {"A": "1", "B": "3"} == profile.env
    assert ["c"] == profile.services["web"].command
    assert 80 == profile.services["web"].port
    assert ["web", "worker"] == list(profile.services)


def test_typo_wrong_type_and_missing_file_each_get_one_line(tmp_path: Path) -> None:
    """The three classic mistakes are reported together, each with its file and field."""
    base = write(tmp_path, "base.toml", '[services.web]\ncommand = ["x"]\nport = "eighty"\n')
    child = write(
        tmp_path,
        "child.toml",
        'extends = "base"\n[services.web]\ncomand = ["y"]\n'
        '[models.m]\nurl = "file:missing.bin"\ndest = "m.bin"\n'
        f'sha256 = "{"0" * 64}"\n',
    )

    with pytest.raises(ConfigError) as caught:
        load_profile(str(child), tmp_path)

    assert [
        f"{base}: services.web.port: Input should be a valid integer",
        f"{child}: models.m.url: file not found: {tmp_path}/missing.bin",
        f"{child}: services.web.comand: unknown field (typo?)",
    ] == sorted(str(p) for p in caught.value.problems)


def test_missing_parent_is_reported_on_the_extends_line(tmp_path: Path) -> None:
    """An `extends` naming a file that does not exist points at the extending file."""
    child = write(tmp_path, "child.toml", 'extends = "nothere"\n')

    with pytest.raises(ConfigError) as caught:
        load_profile("child", tmp_path)

    assert [f"{child}: extends: profile file not found: {tmp_path}/nothere.toml"] == [
        str(p) for p in caught.value.problems
    ]


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    """a extends b extends a is refused instead of looping."""
    write(tmp_path, "a.toml", 'extends = "b"\n')
    write(tmp_path, "b.toml", 'extends = "a"\n')

    with pytest.raises(ConfigError, match="cycle"):
        load_profile("a", tmp_path)


def test_dependency_problems_are_reported_with_field_errors(tmp_path: Path) -> None:
    """An unknown dependency, a cycle and a wrong type in one file: every problem at once."""
    path = write(
        tmp_path,
        "p.toml",
        '[services.a]\ncommand = ["a"]\ndepends_on = ["ghost", "b"]\n'
        '[services.b]\ncommand = ["b"]\ndepends_on = ["a"]\nport = "x"\n',
    )

    with pytest.raises(ConfigError) as caught:
        load_profile("p", tmp_path)

    assert [
        f"{path}: services.a.depends_on: dependency cycle: a -> b -> a",
        f"{path}: services.a.depends_on: no service named 'ghost'",
        f"{path}: services.b.port: Input should be a valid integer",
    ] == sorted(str(p) for p in caught.value.problems)


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ('command = ["run", "{prot}"]\nport = 1', "unknown placeholder {prot}"),
        ('command = ["run", "{port}"]', "{port} is used but the service has no 'port'"),
        ('command = ["x"]\ndepends_on = ["ghost"]', "no service named 'ghost'"),
        ('command = ["x"]\nstop_signal = "SIGNOPE"', "unknown signal"),
        ("command = []", "at least 1 item"),
        (
            'command = ["x"]\nreadiness = { kind = "http", url = "ftp://h/x" }',
            "readiness.url: must be an http:// or https:// URL",
        ),
    ],
)
def test_service_mistakes_are_caught(tmp_path: Path, service: str, message: str) -> None:
    """Mistakes that would only show at spawn time are caught by validation."""
    write(tmp_path, "p.toml", f"[services.svc]\n{service}\n")

    with pytest.raises(ConfigError, match=r"services\.svc") as caught:
        load_profile("p", tmp_path)

    assert message in str(caught.value)


@pytest.mark.parametrize("dest", ["/etc/passwd", "../escape.bin", "a/../../b"])
def test_model_destination_stays_inside_the_model_root(tmp_path: Path, dest: str) -> None:
    """Absolute destinations and '..' are refused."""
    write(
        tmp_path, "p.toml", f'[models.m]\nurl = "https://example.invalid/m"\ndest = "{dest}"\nsha256 = "{"a" * 64}"\n'
    )

    with pytest.raises(ConfigError, match=r"models\.m\.dest: must be a relative path"):
        load_profile("p", tmp_path)


def test_two_models_at_one_destination_with_different_hashes_are_refused(tmp_path: Path) -> None:
    """Two entries that would fight over one path are a configuration error, named by file and field."""
    entry = '[models.{n}]\nurl = "https://example.invalid/{n}"\ndest = "{d}"\nsha256 = "{h}"\n'
    text = entry.format(n="a", d="loras/x.bin", h="a" * 64) + entry.format(n="b", d="loras/./x.bin", h="b" * 64)
    path = write(tmp_path, "p.toml", text)

    with pytest.raises(ConfigError) as caught:
        load_profile("p", tmp_path)

    assert f"{path}: models.b.dest: same destination as models.a with another sha256" == str(caught.value)


def test_a_destination_inside_another_models_file_is_refused(tmp_path: Path) -> None:
    """`ckpt` cannot be a model file and the directory of another one."""
    entry = '[models.{n}]\nurl = "https://example.invalid/{n}"\ndest = "{d}"\nsha256 = "{h}"\n'
    path = write(
        tmp_path, "p.toml", entry.format(n="a", d="ckpt", h="a" * 64) + entry.format(n="b", d="ckpt/x.bin", h="b" * 64)
    )

    with pytest.raises(ConfigError) as caught:
        load_profile("p", tmp_path)

    assert f"{path}: models.b.dest: inside ckpt, which is the destination of models.a" == str(caught.value)


def test_a_name_key_is_refused_because_the_file_names_the_profile(tmp_path: Path) -> None:
    """`name = ...` would be silently ignored; it is reported instead."""
    path = write(tmp_path, "p.toml", 'name = "other"\n')

    with pytest.raises(ConfigError) as caught:
        load_profile("p", tmp_path)

    assert f"{path}: name: unknown field (a profile is named by its file)" == str(caught.value)


def test_relative_file_sources_resolve_against_their_own_file(tmp_path: Path) -> None:
    """`file:` paths are relative to the profile that names them, not to the current directory."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"x")
    write(tmp_path / "sub", "base.toml", f'[models.w]\nurl = "file:w.bin"\ndest = "w.bin"\nsha256 = "{"a" * 64}"\n')
    write(tmp_path, "top.toml", 'extends = "sub/base.toml"\n')

    profile = load_profile(str(tmp_path / "top.toml"), tmp_path)

    assert (tmp_path / "sub" / "w.bin").as_uri() == profile.models["w"].url


def test_demo_profile_uses_real_probes() -> None:
    """The demo's services are only RUNNING once they answer HTTP."""
    profile = load_profile("demo", PROFILES)

    assert {ProbeKind.HTTP} == {s.readiness.kind for s in profile.services.values()}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[services.a]\ncommand = ["x"]\ninstances = 2\n[services.a-1]\ncommand = ["y"]\n', "clashes with instance 1"),
        ('[services.emp-registry]\ncommand = ["x"]\n', "reserved for the agent"),
        ('[env]\nGLOBAL = "{nope}"\n', "unknown placeholder {nope}"),
        ('[env]\nGLOBAL = "{port}"\n', "{port} is only available to services"),
        ('[prepare.p]\ncommand = ["true"]\ncreates = "{bogus}/x"\n', "unknown placeholder {bogus}"),
        ('[services.a]\ncommand = ["echo", "{state_dir:d}"]\n', "unknown placeholder {state_dir:d}"),
        ('[services.a]\ncommand = ["echo", "{slot!r}"]\n', "unknown placeholder {slot!r}"),
        ('[models.m]\nurl = "https://h/m"\ndest = "."\nsha256 = "' + "a" * 64 + '"\n', "must name a file"),
        ('[services.a]\ncommand = ["x"]\nenv = { "A=B" = "x" }\n', "not a valid environment variable name"),
        ('[services.a]\ncommand = [""]\n', "must not be empty"),
        ('[services.a]\ncommand = ["x"]\nport = 65535\ninstances = 3\n', "go past 65535"),
        ('[services.a]\ncommand = ["x"]\nper_gpu = "yes"\n', "valid boolean"),
        ('[services.a]\ncommand = ["x"]\nreadiness = { kind = "http" }\n', "needs the service's 'port'"),
        ('[prepare."x/../../escaped"]\ncommand = ["true"]\n', "name must match"),
        ('models = ["x"]\n', "models: Input should be a valid dictionary"),
        ('services = "nope"\n', "services: Input should be a valid dictionary"),
    ],
)
def test_inputs_that_would_only_fail_at_run_time_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    """Everything that used to pass `check` and then crash a stage is caught by validation."""
    write(tmp_path, "p.toml", text)

    with pytest.raises(ConfigError) as caught:
        load_profile("p", tmp_path)

    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("gpu", "words"),
    [
        ('select = [""]', "gpu.select: '' is neither an NVML index nor a GPU-/MIG- UUID"),
        ('select = ["²"]', "gpu.select: '²' is neither"),
        ('product = "*H100*"', "gpu: product and min_memory_mib need min_count >= 1"),
    ],
)
def test_gpu_section_mistakes_are_config_errors(tmp_path: Path, gpu: str, words: str) -> None:
    """An empty or non-ASCII GPU reference, or a product pattern without a count, fails the check, naming the
    file and field."""
    path = write(tmp_path, "p.toml", f"[gpu]\n{gpu}\n")

    with pytest.raises(ConfigError) as caught:
        load_profile(str(path), tmp_path)

    assert [f"{path}: {words}"] == [str(p)[: len(str(path)) + 2 + len(words)] for p in caught.value.problems]


def test_gpu_select_takes_indexes_as_numbers_or_strings_and_uuids(tmp_path: Path) -> None:
    """`select = [0, "1", "GPU-ab", "MIG-cd"]` is read as four references."""
    path = write(tmp_path, "p.toml", '[gpu]\nselect = [0, "1", "GPU-ab", "MIG-cd"]\n')

    assert ["0", "1", "GPU-ab", "MIG-cd"] == load_profile(str(path), tmp_path).gpu.select
