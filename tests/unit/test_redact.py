"""Secrets never reach logs: URL passwords, signed query strings and known secret values are masked."""

from __future__ import annotations

import io
import json

import structlog

from agent.logconfig import configure_logging
from agent.redact import SecretMasker, redact_source, redact_url


def test_url_password_is_masked() -> None:
    """redis://user:pw@host keeps everything but the password."""
    assert "rediss://default:***@cache.example:6380/1" == redact_url("rediss://default:s3cret@cache.example:6380/1")
    assert "redis://cache:6379" == redact_url("redis://cache:6379")


def test_presigned_query_is_dropped_from_download_sources() -> None:
    """An S3/R2 presigned URL's signature never appears in status or logs."""
    shown = redact_source("https://bucket.r2.example/m.safetensors?X-Amz-Signature=abcdef&X-Amz-Credential=k")

    assert "https://bucket.r2.example/m.safetensors?***" == shown


def test_log_lines_mask_known_secret_values_and_secret_keys() -> None:
    """A token that ends up inside a message, and a `token=` field, are both masked in the JSON log."""
    out = io.StringIO()
    configure_logging("info", "json", SecretMasker(["hf_abcdefghijkl"]), stream=out)

    structlog.get_logger("t").info("fetch failed for hf_abcdefghijkl", token="anything", url="https://h/x")

    line = json.loads(out.getvalue())
    assert ("fetch failed for ***", "***", "https://h/x") == (line["event"], line["token"], line["url"])
    assert "hf_abcdefghijkl" not in out.getvalue()


def test_password_in_the_query_string_is_masked_too() -> None:
    """redis-py accepts ?password=; it is masked like the userinfo form and reported as a secret."""
    from agent.redact import url_secrets

    url = "unix:///run/r.sock?db=0&password=S3cretPW99"

    assert "unix:///run/r.sock?db=0&password=***" == redact_url(url)
    assert ["S3cretPW99"] == url_secrets(url)


def test_masker_reaches_into_lists_and_exception_text() -> None:
    """A secret inside a list field or inside a logged exception's message is masked."""
    out = io.StringIO()
    configure_logging("info", "json", SecretMasker(["S3cretPW99"]), stream=out)
    log = structlog.get_logger("t")

    log.info("finished", reasons=["registry: redis://:S3cretPW99@h refused"])
    try:
        raise ValueError("bad url redis://:S3cretPW99@h")
    except ValueError:
        log.exception("crashed")

    finished, crashed = (json.loads(line) for line in out.getvalue().splitlines())
    assert "S3cretPW99" not in out.getvalue()
    assert ["registry: redis://:***@h refused"] == finished["reasons"]
    assert crashed["exception"].endswith("ValueError: bad url redis://:***@h")
