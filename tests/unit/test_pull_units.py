"""The pure parts of model pull: byte-range sets, source resolution, token scoping, manifest validation."""

from __future__ import annotations

import httpcore
import pytest
from pydantic import ValidationError

from agent.errors import ModelPullError
from agent.host.download import READ_BYTES, Credential, HttpTransport
from agent.profile import ModelSpec
from agent.pull.ranges import RangeSet, split
from agent.pull.source import Endpoints, huggingface_url, resolve

SHA = "a" * 64


def test_ranges_merge_and_report_gaps() -> None:
    """Ranges added in any order merge when they touch; the prefix and the gaps follow."""
    ranges = RangeSet()
    for start, end in [(10, 20), (0, 5), (5, 10), (30, 40), (35, 50)]:
        ranges.add(start, end)

    assert [[0, 20], [30, 50]] == ranges.to_list()
    assert 40 == ranges.covered()
    assert 20 == ranges.prefix()
    assert [(20, 30), (50, 60)] == ranges.missing(60)
    assert [(20, 25), (25, 30), (50, 55), (55, 60)] == split(ranges.missing(60), 5)


def test_ranges_without_byte_zero_have_no_prefix() -> None:
    """A partial that lacks its first bytes cannot be hashed from the start yet."""
    assert 0 == RangeSet([(1, 100)]).prefix()
    assert [(0, 1)] == RangeSet([(1, 100)]).missing(100)


def test_credential_matches_host_or_host_and_port_and_hides_the_token() -> None:
    """A bare host allows every port of it; host:port allows only that port; repr never shows the token."""
    cred = Credential("s3cr3t-token", frozenset({"huggingface.co", "127.0.0.1:8080"}))

    assert cred.allows("https://huggingface.co/x")
    assert cred.allows("http://127.0.0.1:8080/x")
    assert not cred.allows("http://127.0.0.1:8081/x")
    assert not cred.allows("https://cdn-lfs.huggingface.co/x")
    assert "s3cr3t" not in repr(cred)


def test_huggingface_and_civitai_urls() -> None:
    """hf:// paths resolve to /resolve/<revision>/ (main when absent); civitai:// to the download API."""
    endpoints = Endpoints("https://hf.example", "https://cv.example")

    assert "https://hf.example/org/repo/resolve/main/a/b%20c.safetensors" == huggingface_url(
        "hf://org/repo/a/b c.safetensors", endpoints.huggingface
    )
    assert "https://hf.example/org/repo/resolve/v1.0/m.bin" == huggingface_url(
        "hf://org/repo/m.bin@v1.0", endpoints.huggingface
    )
    cv = resolve(ModelSpec(url="civitai://4711", dest="l.bin", sha256=SHA), endpoints, {})
    assert ("https://cv.example/api/download/models/4711", None) == (cv.url, cv.credential)


def test_the_default_token_scope_includes_the_port() -> None:
    """Without auth_hosts the token goes to the URL's origin only: another port of the same host is another
    origin, also when the URL names no port."""
    source = resolve(
        ModelSpec(url="http://127.0.0.1/m.bin", dest="m.bin", sha256=SHA, auth_env="T"), Endpoints(), {"T": "tok"}
    )

    assert source.credential is not None
    assert source.credential.allows("http://127.0.0.1:80/x")
    assert not source.credential.allows("http://127.0.0.1:8080/x")


def test_hf_revisions_may_be_pull_request_refs_and_datasets_have_their_prefix() -> None:
    """What follows the last '@' is the revision (quoted whole); datasets/ and spaces/ repos keep their prefix."""
    assert "https://h/o/r/resolve/refs%2Fpr%2F1/f.bin" == huggingface_url("hf://o/r/f.bin@refs/pr/1", "https://h")
    assert "https://h/datasets/o/r/resolve/main/d/x.parquet" == huggingface_url(
        "hf://datasets/o/r/d/x.parquet", "https://h"
    )


def test_default_token_goes_only_to_the_endpoint_host() -> None:
    """HF_TOKEN is used for hf:// sources and scoped to the endpoint's host."""
    source = resolve(ModelSpec(url="hf://o/r/m.bin", dest="m.bin", sha256=SHA), Endpoints(), {"HF_TOKEN": "hf_x"})

    assert source.credential is not None
    assert frozenset({"huggingface.co:443"}) == source.credential.hosts


def test_a_named_token_variable_that_is_unset_is_an_error() -> None:
    """auth_env naming a missing variable fails clearly, naming the variable and not a value."""
    spec = ModelSpec(url="https://h.example/m?sig=x", dest="m.bin", sha256=SHA, auth_env="MY_TOKEN")

    with pytest.raises(ModelPullError, match=r"https://h.example/m\?\*\*\*: the token variable MY_TOKEN is not set"):
        resolve(spec, Endpoints(), {})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("url", "ftp://x/y", "scheme must be"),
        ("url", "hf://org/repo", "hf://org/repo/path"),
        ("url", "civitai://abc", "civitai://<model version id>"),
        ("url", "https:///nohost", "must name a host"),
        ("dest", "../x.bin", "inside the model root"),
        ("dest", "/abs/x.bin", "inside the model root"),
        ("auth_env", "1BAD", "should match pattern"),
        ("url", "http://127.0.0.1:99999/x", "not a valid URL"),
        ("url", "http://[::1/x", "not a valid URL"),
        ("url", "hf://org/repo/f.bin@", "revision after '@' is empty"),
        ("url", "hf://org//repo/f", "hf://org/repo/path"),
        ("url", "hf://u:p@org/r/f", "hf://org/repo/path"),
        ("url", "civitai://123?type=VAE", "civitai://<model version id>"),
        ("dest", ".emp-cache/objects/x", "the agent's cache"),
        ("dest", "a\nb.bin", "control characters"),
        ("dest", "x" * 241, "longer than 240 bytes"),
        ("size", True, "valid integer"),
        ("auth_hosts", ["https://h/"], "is not a host name"),
    ],
)
def test_bad_manifest_entries_are_rejected(field: str, value: object, message: str) -> None:
    """Each malformed field is refused by validation, before anything is fetched."""
    data: dict[str, object] = {"url": "https://h.example/m.bin", "dest": "m.bin", "sha256": SHA, field: value}

    with pytest.raises(ValidationError, match=message):
        ModelSpec.model_validate(data)


def test_body_reads_are_one_mebibyte() -> None:
    """The transport raises httpcore's per-recv size; this fails if an httpcore upgrade drops the attribute."""
    HttpTransport().close()

    assert READ_BYTES == httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES


def test_retry_after_as_seconds_or_as_an_http_date() -> None:
    """Both forms of Retry-After become seconds to wait; garbage is ignored (the backoff applies)."""
    from datetime import UTC, datetime

    from agent.host.download import retry_after_seconds

    now = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
    assert 120.0 == retry_after_seconds("120", now)
    assert 30.0 == retry_after_seconds("Thu, 03 Dec 2026 12:00:30 GMT", now)
    assert 0.0 == retry_after_seconds("Thu, 03 Dec 2026 11:00:00 GMT", now)
    assert None is retry_after_seconds("soon", now)
    assert None is retry_after_seconds(None, now)
