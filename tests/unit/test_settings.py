"""Settings: environment over file, precise errors, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api.client import DEFAULT_RUNTIME_DIR, locate_socket
from agent.errors import ConfigError
from agent.settings import Settings, load_settings


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable in the environment wins over the same key in the TOML file."""
    config = tmp_path / "agent.toml"
    config.write_text('heartbeat_interval_s = 5\nprofile = "gpu"\n')
    monkeypatch.setenv("EMP_AGENT_HEARTBEAT_INTERVAL_S", "2.5")

    settings = load_settings(config)

    assert (2.5, "gpu") == (settings.heartbeat_interval_s, settings.profile)


def test_each_problem_names_its_source_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in the file, a bad type in the environment and an unknown variable give one line each."""
    config = tmp_path / "agent.toml"
    config.write_text("heartbeat_intervl_s = 5\n")
    monkeypatch.setenv("EMP_AGENT_HEARTBEAT_INTERVAL_S", "often")
    monkeypatch.setenv("EMP_AGENT_PROFLE", "gpu")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    lines = sorted(str(p) for p in caught.value.problems)
    assert [
        f"{config}: heartbeat_intervl_s: unknown setting (typo?)",
        "environment: EMP_AGENT_HEARTBEAT_INTERVAL_S: Input should be a valid number, unable to parse string as a number",
        "environment: EMP_AGENT_PROFLE: unknown setting (typo?)",
    ] == lines


def test_explicit_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist is reported, not silently ignored."""
    with pytest.raises(ConfigError, match="config file does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_redis_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Redis URL's password appears neither in repr, str, nor the redacted form."""
    monkeypatch.setenv("EMP_AGENT_REDIS_URL", "redis://user:hunter22@db:6379/0")
    settings = load_settings(None)

    shown = repr(settings) + str(settings) + str(settings.redis_url_redacted)

    assert "hunter22" not in shown
    assert "redis://user:***@db:6379/0" == settings.redis_url_redacted


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://db:6379", "must start with one of redis://, redis+cluster://, redis+sentinel://, rediss://"),
        ("redis+sentinel://s1:26379,s2:26379", "needs the master's name"),
        ("redis+cluster://n1:7000,n2", "'n2' is not host:port"),
        ("redis+sentinel://:pw@s1:26379,s2:x/mymaster", "'s2:x' is not host:port"),
    ],
)
def test_redis_url_scheme_and_hosts_are_checked(monkeypatch: pytest.MonkeyPatch, url: str, words: str) -> None:
    """Only the supported forms are accepted; Sentinel and Cluster URLs need host:port lists (and a master)."""
    monkeypatch.setenv("EMP_AGENT_REDIS_URL", url)
    with pytest.raises(ConfigError, match=words.replace("+", r"\+")) as caught:
        load_settings(None)
    assert "pw@" not in str(caught.value)


def test_sentinel_and_cluster_urls_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Sentinel URL with a master name and a Cluster URL with several nodes load, passwords redacted."""
    for url in ("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0", "rediss+cluster://u:pw@n1:7000,n2:7001"):
        monkeypatch.setenv("EMP_AGENT_REDIS_URL", url)
        settings = load_settings(None)
        assert "pw" not in str(settings.redis_url_redacted)


def test_status_client_finds_the_socket_like_settings_does(tmp_path: Path) -> None:
    """The light client and Settings agree on the socket without the client importing pydantic."""
    config = tmp_path / "agent.toml"
    config.write_text(f'runtime_dir = "{tmp_path}"\n')

    assert Path(DEFAULT_RUNTIME_DIR) == Settings.model_fields["runtime_dir"].default
    assert Path(DEFAULT_RUNTIME_DIR) / "agent.sock" == locate_socket({}, "/nonexistent.toml")
    assert tmp_path / "agent.sock" == locate_socket({}, str(config))
    assert Path("/x/agent.sock") == locate_socket({"EMP_AGENT_RUNTIME_DIR": "/x"}, str(config))


def test_socket_paths_that_do_not_fit_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime dir so deep that the control socket path exceeds the kernel limit is refused up front."""
    monkeypatch.setenv("EMP_AGENT_RUNTIME_DIR", "/tmp/" + "x" * 110)

    with pytest.raises(ConfigError, match="runtime_dir is too long for the unix socket"):
        load_settings(None)


def test_unencoded_slash_in_the_password_is_reported_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """A password with a raw '/' breaks the URL; the error explains it and never echoes the password."""
    monkeypatch.setenv("EMP_AGENT_REDIS_URL", "redis://:S3cret/PW99@127.0.0.1:6390/0")

    with pytest.raises(ConfigError) as caught:
        load_settings(None)

    assert "%-encoded" in str(caught.value)
    assert "S3cret" not in str(caught.value)


def test_model_endpoints_may_be_mirrors_under_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hugging Face mirror often lives under a path prefix; a query string is still refused."""
    monkeypatch.setenv("EMP_AGENT_HF_ENDPOINT", "https://mirror.example.com/hf")

    assert "https://mirror.example.com/hf" == load_settings(None).hf_endpoint

    monkeypatch.setenv("EMP_AGENT_HF_ENDPOINT", "https://mirror.example.com/hf?x=1")
    with pytest.raises(ConfigError, match="EMP_AGENT_HF_ENDPOINT"):
        load_settings(None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:99999", "the port must be between 1 and 65535"),
        ("...:9090", "must be host:port"),
        ("127.0.0.1", "must be host:port"),
    ],
)
def test_http_listen_is_checked_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    """A bad listener address is a settings error naming the variable, not a crash at bind time."""
    monkeypatch.setenv("EMP_AGENT_HTTP_LISTEN", value)

    with pytest.raises(ConfigError, match=f"EMP_AGENT_HTTP_LISTEN: {message}"):
        load_settings(None)


def test_matching_from_the_environment_replaces_the_file_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EMP_AGENT_MATCHING replaces the TOML [matching] table as a whole, so an error names where it came from."""
    config = tmp_path / "agent.toml"
    config.write_text("[matching]\nmax_concurrent_customers = -3\nallowed_customers = ['acme']\n")
    monkeypatch.setenv("EMP_AGENT_MATCHING", '{"concurrent_jobs": 2}')

    settings = load_settings(config)

    assert (2, [], 10) == (
        settings.matching.concurrent_jobs,
        settings.matching.allowed_customers,
        settings.matching.max_concurrent_customers,
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("not json", "EMP_AGENT_MATCHING: not valid JSON"),
        ('{"bogus": 1}', "EMP_AGENT_MATCHING: bogus: unknown setting"),
        ('{"cost": {"tier": "spot", "rate_per_job": Infinity}}', "EMP_AGENT_MATCHING: cost.rate_per_job"),
    ],
)
def test_bad_matching_in_the_environment_names_the_field(
    monkeypatch: pytest.MonkeyPatch, value: str, words: str
) -> None:
    """Invalid JSON, an unknown key or an infinite rate is a one-line error naming the variable and field."""
    monkeypatch.setenv("EMP_AGENT_MATCHING", value)

    with pytest.raises(ConfigError, match=words):
        load_settings(None)


def test_env_file_is_read_like_systemd_reads_it(tmp_path: Path) -> None:
    """Comments, blank lines, `export` and quotes as EnvironmentFile= accepts them; a line that is not KEY=value
    is named by file and line."""
    from agent.settings import read_env_file

    good = tmp_path / "env"
    good.write_text('# secrets\n\nEMP_AGENT_PROFILE=demo\nexport HF_TOKEN="hf abc"\nEMPTY=\n')
    bad = tmp_path / "bad"
    bad.write_text("EMP_AGENT_PROFILE=demo\nthis is not a setting\n")

    assert {"EMP_AGENT_PROFILE": "demo", "HF_TOKEN": "hf abc", "EMPTY": ""} == read_env_file(good)
    with pytest.raises(ConfigError, match=f"{bad}: line 2: not KEY=value"):
        read_env_file(bad)
