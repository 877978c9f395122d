"""Model pull against a real HTTP(S) server on loopback that misbehaves on purpose: resume, Range validation,
changed remotes, redirects with tokens, hostile headers, full disks, and verification before publication."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import trustme

from agent.errors import ModelPullError
from agent.host.download import HttpTransport
from agent.profile import ModelSpec
from agent.pull.partial import Partial, Validator
from agent.pull.puller import ModelPuller, ModelStatus, PullConfig
from agent.pull.source import Endpoints
from agent.pull.store import ModelStore
from agent.pull.transfer import TransferConfig
from tests.fileserver import FileServer, serve_files
from tests.helpers import wait_until

MIB = 1024 * 1024
SMALL = os.urandom(3 * MIB + 17)
BIG = os.urandom(8 * MIB + 5)
#: Small pieces so that a few MiB exercise the ranged path; retries without waiting.
RANGED = TransferConfig(
    connections=4,
    chunk_bytes=MIB,
    ranged_min_bytes=2 * MIB,
    attempts=3,
    retry_wait_s=0,
    parallel_below_bps=float("inf"),  # every connection at once
    warmup_s=0,
)
SINGLE = replace(RANGED, ranged_min_bytes=64 * MIB)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serve_files({"small.bin": SMALL, "big.bin": BIG}) as files:
        yield files


def pull(
    tmp_path: Path,
    models: Mapping[str, ModelSpec],
    transfer: TransferConfig = SINGLE,
    environ: Mapping[str, str] | None = None,
    ca: Path | None = None,
    endpoints: Endpoints | None = None,
    root: Path | None = None,
) -> dict[str, ModelStatus]:
    """One pull with a fresh transport, as one boot of the agent would do it."""
    transport = HttpTransport(ca, connect_timeout_s=5, stall_timeout_s=10)
    store = ModelStore(root or tmp_path / "models", tmp_path / "state" / "models.json")
    config = PullConfig(transfer=transfer, disk_margin_bytes=0, endpoints=endpoints or Endpoints())
    try:
        return ModelPuller(store, transport, config, environ or {}).pull(models)
    finally:
        transport.close()


def spec(
    server: FileServer, name: str, data: bytes, dest: str = "checkpoints/m.safetensors", **kw: object
) -> ModelSpec:
    return ModelSpec(url=f"{server.url}/{name}", dest=dest, sha256=sha(data), size=len(data), **kw)  # type: ignore[arg-type]


def placed(tmp_path: Path, dest: str = "checkpoints/m.safetensors") -> bytes:
    return (tmp_path / "models" / dest).read_bytes()


def partial_sidecars(root: Path) -> list[Path]:
    return list((root / ".emp-cache" / "partial").glob("*.json"))


# --- the basic contract -------------------------------------------------------------------------------------------


def test_pull_verifies_publishes_and_then_skips(tmp_path: Path, server: FileServer) -> None:
    """The first pull downloads, verifies and places a hard link to the cache object; the next one moves nothing."""
    m = spec(server, "small.bin", SMALL)

    assert "pulled" == pull(tmp_path, {"m": m})["m"].state
    before = len(server.requests)
    assert "verified" == pull(tmp_path, {"m": m})["m"].state

    assert SMALL == placed(tmp_path)
    assert before == len(server.requests)
    dest = (tmp_path / "models" / "checkpoints" / "m.safetensors").stat()
    obj = (tmp_path / "models" / ".emp-cache" / "objects" / "sha256" / m.sha256[:2] / m.sha256).stat()
    assert (dest.st_ino, 0o444) == (obj.st_ino, obj.st_mode & 0o777)
    assert [] == partial_sidecars(tmp_path / "models")


@pytest.mark.parametrize("damage", ["rewrite", "truncate"])
def test_a_placed_file_changed_on_disk_is_detected_and_fetched_again(
    tmp_path: Path, server: FileServer, damage: str
) -> None:
    """Bytes rewritten in place or a truncation (through the destination, which shares its inode with the cache
    object) are noticed by the next pull: the damaged object is dropped and the file downloaded and verified again,
    also at a second destination linked to the same object."""
    m = ModelSpec(url=f"{server.url}/small.bin", dest="checkpoints/m.safetensors", sha256=sha(SMALL))  # no size
    twin = m.model_copy(update={"dest": "loras/twin.safetensors"})
    pull(tmp_path, {"m": m, "twin": twin})
    dest = tmp_path / "models" / m.dest
    with dest.open("r+b") as handle:
        if damage == "rewrite":
            handle.seek(1000)
            handle.write(b"garbage!")
        else:
            handle.truncate(1000)

    result = pull(tmp_path, {"m": m, "twin": twin})

    assert ["cached", "pulled"] == sorted(v.state for v in result.values())  # whichever came first fetched it
    assert SMALL == placed(tmp_path) == placed(tmp_path, "loras/twin.safetensors")


def test_one_unusable_entry_does_not_stop_the_others(tmp_path: Path, server: FileServer) -> None:
    """A 404 found while planning, or an unset token variable, fails that entry only; the rest are pulled."""
    models = {
        "gone": ModelSpec(url=f"{server.url}/nope.bin", dest="a.bin", sha256=sha(b"x")),
        "locked": spec(server, "big.bin", BIG, dest="b.bin", auth_env="UNSET_TOKEN"),
        "good": spec(server, "small.bin", SMALL),
    }

    result = pull(tmp_path, models)

    assert {"gone": "failed", "locked": "failed", "good": "pulled"} == {k: v.state for k, v in result.items()}
    assert f"{server.url}/nope.bin: HTTP 404" == result["gone"].error
    assert "the token variable UNSET_TOKEN is not set" in str(result["locked"].error)


def test_second_destination_of_the_same_file_comes_from_the_cache(tmp_path: Path, server: FileServer) -> None:
    """Two profiles that want the same bytes at two paths download them once."""
    pull(tmp_path, {"a": spec(server, "small.bin", SMALL, dest="loras/a.safetensors")})
    requests = len(server.requests)

    result = pull(tmp_path, {"b": spec(server, "small.bin", SMALL, dest="checkpoints/b.safetensors")})

    assert "cached" == result["b"].state
    assert requests == len(server.requests)
    assert SMALL == placed(tmp_path, "checkpoints/b.safetensors")


def test_ranged_download_uses_parallel_validated_ranges(tmp_path: Path, server: FileServer) -> None:
    """A large file is fetched as several 206 ranges pinned with If-Range, and the result verifies."""
    result = pull(tmp_path, {"m": spec(server, "big.bin", BIG)}, RANGED)

    assert "pulled" == result["m"].state
    assert BIG == placed(tmp_path)
    data = server.data_requests("big.bin")
    assert 9 == len(data)
    assert {206} == {r.status for r in data}
    assert {server.etag("big.bin")} == {r.headers.get("If-Range") for r in data}
    assert len(BIG) == sum(r.sent for r in data)


@pytest.mark.parametrize(("rate", "expect_parallel"), [(4 * MIB, True), (None, False)], ids=["shaped", "fast"])
def test_one_connection_first_and_the_others_only_when_it_is_slow(
    tmp_path: Path, server: FileServer, rate: float | None, expect_parallel: bool
) -> None:
    """A shaped link (4 MiB/s per connection, below the 10 MB/s threshold) gets every connection after the warm-up;
    a fast one keeps its single connection."""
    if rate:
        server.rate["big.bin"] = rate
    transfer = replace(RANGED, parallel_below_bps=10e6 if rate else 1.0, warmup_s=0.3)

    assert "pulled" == pull(tmp_path, {"m": spec(server, "big.bin", BIG)}, transfer)["m"].state

    assert expect_parallel == (server.max_active > 1)
    assert BIG == placed(tmp_path)


def test_sha_mismatch_places_nothing_and_keeps_no_partial(tmp_path: Path, server: FileServer) -> None:
    """Bytes that do not hash to the manifest's sha256 never appear at the destination, and are not kept."""
    bad = spec(server, "small.bin", SMALL).model_copy(update={"sha256": "0" * 64})

    result = pull(tmp_path, {"m": bad})

    assert "failed" == result["m"].state
    assert "sha256 mismatch" in (result["m"].error or "")
    assert not (tmp_path / "models" / "checkpoints" / "m.safetensors").exists()
    assert [] == list((tmp_path / "models" / ".emp-cache" / "partial").iterdir())


def test_http_error_is_reported_without_the_query_string(tmp_path: Path, server: FileServer) -> None:
    """A 403 on a presigned URL is reported with a hint; its signature is not."""
    server.status["small.bin"] = 403
    m = spec(server, "small.bin", SMALL).model_copy(
        update={"url": f"{server.url}/small.bin?X-Amz-Signature=supersecret"}
    )

    result = pull(tmp_path, {"m": m})

    assert "supersecret" not in str(result["m"].error)
    assert f"{server.url}/small.bin?***: HTTP 403 (forbidden" in str(result["m"].error)


def test_busy_server_is_retried_after_the_time_it_asks_for(tmp_path: Path, server: FileServer) -> None:
    """429 and 503 are retried; a Retry-After of 1 s is waited for even though the backoff would retry at once."""
    server.status_once["small.bin"] = [(503, {"Retry-After": "1"}), (429, {})]

    result = pull(tmp_path, {"m": spec(server, "small.bin", SMALL)})

    assert "pulled" == result["m"].state
    assert [503, 429, 206] == [r.status for r in server.requests[:3]]
    assert server.requests[1].at - server.requests[0].at >= 1.0


def test_web_page_instead_of_a_model_is_refused(tmp_path: Path, server: FileServer) -> None:
    """A login page served with 200 is reported as such and never saved as the model."""
    server.content_type["small.bin"] = "text/html; charset=utf-8"

    result = pull(tmp_path, {"m": spec(server, "small.bin", SMALL)})

    assert "text/html, not a model file" in str(result["m"].error)
    assert 1 == len(server.requests)


def test_plan_fails_before_any_byte_when_the_disk_is_too_small(tmp_path: Path, server: FileServer) -> None:
    """A plan larger than the free space fails with the numbers, before any request."""
    huge = spec(server, "small.bin", SMALL).model_copy(update={"size": 2**60})

    with pytest.raises(ModelPullError, match=r"not enough disk space.*nothing was downloaded"):
        pull(tmp_path, {"m": huge})

    assert [] == server.requests


def test_size_disagreement_is_reported(tmp_path: Path, server: FileServer) -> None:
    """A remote file of another size than the manifest says fails clearly, without downloading it."""
    wrong = spec(server, "small.bin", SMALL).model_copy(update={"size": len(SMALL) - 1})

    result = pull(tmp_path, {"m": wrong})

    assert f"offers {len(SMALL)} bytes, the profile expects {len(SMALL) - 1}" in str(result["m"].error)
    assert [] == server.data_requests("small.bin")


def test_https_with_a_private_ca(tmp_path: Path) -> None:
    """TLS is verified: an untrusted certificate fails, the same server with its CA configured works."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with serve_files({"small.bin": SMALL}, tls=context) as tls_server:
        m = spec(tls_server, "small.bin", SMALL)
        untrusted = pull(tmp_path / "untrusted", {"m": m})
        assert "certificate not trusted" in str(untrusted["m"].error)
        assert "pulled" == pull(tmp_path / "trusted", {"m": m}, ca=ca_file)["m"].state


def test_hf_and_civitai_sources_resolve_to_their_download_urls(tmp_path: Path, server: FileServer) -> None:
    """`hf://org/repo/path@rev` and `civitai://<version>` fetch from the endpoints' download paths with their
    default token variables."""
    server.files["acme/sd/resolve/abc123/unet/m.safetensors"] = SMALL
    server.files["api/download/models/4711"] = BIG
    env = {"HF_TOKEN": "hf-secret-token", "CIVITAI_API_TOKEN": "civitai-secret-token"}
    models = {
        "hf": ModelSpec(url="hf://acme/sd/unet/m.safetensors@abc123", dest="unet/m.safetensors", sha256=sha(SMALL)),
        "cv": ModelSpec(url="civitai://4711", dest="loras/x.safetensors", sha256=sha(BIG)),
    }

    result = pull(tmp_path, models, environ=env, endpoints=Endpoints(server.url, server.url))

    assert {"hf": "pulled", "cv": "pulled"} == {k: v.state for k, v in result.items()}
    auth = {r.name: r.headers.get("Authorization") for r in server.requests}
    assert "Bearer hf-secret-token" == auth["acme/sd/resolve/abc123/unet/m.safetensors"]
    assert "Bearer civitai-secret-token" == auth["api/download/models/4711"]


def test_file_source_is_copied_and_verified(tmp_path: Path) -> None:
    """A file:// source on a local or mounted path is copied (never linked: the cache must not change when the
    source does) and verified."""
    source = tmp_path / "nfs" / "m.bin"
    source.parent.mkdir()
    source.write_bytes(SMALL)
    m = ModelSpec(url=source.as_uri(), dest="vae/m.safetensors", sha256=sha(SMALL))

    assert "pulled" == pull(tmp_path, {"m": m})["m"].state
    assert SMALL == placed(tmp_path, "vae/m.safetensors")
    assert source.stat().st_ino != (tmp_path / "models" / "vae" / "m.safetensors").stat().st_ino


def test_a_complete_partial_is_verified_without_asking_for_more(tmp_path: Path, server: FileServer) -> None:
    """Killed between the last byte and the ingest: the next pull verifies the partial instead of asking for the
    range after the end (which servers answer with 416)."""
    m = spec(server, "small.bin", SMALL)
    partial = Partial(tmp_path / "models" / ".emp-cache" / "partial", m.sha256, "test")
    partial.adopt(Validator(len(SMALL), server.etag("small.bin")))
    partial.record(0, partial.write(0, SMALL))
    partial.close()

    assert "pulled" == pull(tmp_path, {"m": m})["m"].state
    assert [] == server.data_requests("small.bin")
    assert SMALL == placed(tmp_path)


def test_empty_and_json_files_are_pulled(tmp_path: Path, server: FileServer) -> None:
    """A zero-byte object (416 to the one-byte probe, as S3 answers) and a file served as application/json
    (tokenizer.json) are ordinary model files."""
    server.files["empty.bin"] = b""
    server.files["tokenizer.json"] = b'{"version": "1.0"}'
    server.content_type["tokenizer.json"] = "application/json"
    models = {
        "empty": ModelSpec(url=f"{server.url}/empty.bin", dest="e.bin", sha256=sha(b"")),
        "tok": ModelSpec(
            url=f"{server.url}/tokenizer.json", dest="t/tokenizer.json", sha256=sha(b'{"version": "1.0"}')
        ),
    }

    result = pull(tmp_path, models)

    assert {"empty": "pulled", "tok": "pulled"} == {k: v.state for k, v in result.items()}
    assert b"" == placed(tmp_path, "e.bin")


def test_a_compressed_body_is_refused_with_the_reason(tmp_path: Path, server: FileServer) -> None:
    """A server that gzips although asked for identity is named as the cause, not left as a bare hash mismatch."""
    server.extra_headers["small.bin"] = {"Content-Encoding": "gzip"}

    result = pull(tmp_path, {"m": spec(server, "small.bin", SMALL)})

    assert "Content-Encoding: gzip" in str(result["m"].error)


def test_size_lookup_in_the_plan_is_retried(tmp_path: Path, server: FileServer) -> None:
    """The plan's size probe follows the retry rules too: a 503 at boot is not a failed host."""
    server.status_once["small.bin"] = [(503, {})]
    m = ModelSpec(url=f"{server.url}/small.bin", dest="m.bin", sha256=sha(SMALL))

    assert "pulled" == pull(tmp_path, {"m": m})["m"].state


def test_a_trickle_still_meets_the_deadline(tmp_path: Path, server: FileServer) -> None:
    """A slow but moving stream is not a stall, but the per-file deadline still ends it."""
    server.rate["small.bin"] = 2000

    result = pull(tmp_path, {"m": spec(server, "small.bin", SMALL)}, replace(SINGLE, deadline_s=1.0))

    assert "failed" == result["m"].state
    assert "not done within 1 s" in str(result["m"].error)


def test_token_with_a_trailing_newline_is_cleaned_and_a_control_character_refused(
    tmp_path: Path, server: FileServer
) -> None:
    """A CRLF env file leaves `\r` at the end of a token: it is stripped. A control character inside is refused
    with a message that names the variable, never the value."""
    m = spec(server, "small.bin", SMALL, auth_env="MODEL_TOKEN")

    assert "pulled" == pull(tmp_path / "a", {"m": m}, environ={"MODEL_TOKEN": "tok-123\r\n"})["m"].state
    assert "Bearer tok-123" == server.requests[-1].headers["Authorization"]

    bad = pull(tmp_path / "b", {"m": m}, environ={"MODEL_TOKEN": "tok\x01-secret-456"})["m"]
    assert "the token in MODEL_TOKEN has spaces, control or non-ASCII characters" in str(bad.error)
    assert "secret-456" not in str(bad.error)


def test_a_symlink_planted_in_the_cache_is_refused(tmp_path: Path, server: FileServer) -> None:
    """The agent runs as root: a lock file or cache directory replaced by a symlink never makes it write
    through the link."""
    m = spec(server, "small.bin", SMALL)
    locks = tmp_path / "models" / ".emp-cache" / "locks"
    locks.mkdir(parents=True)
    victim = tmp_path / "victim"
    (locks / f"{m.sha256}.lock").symlink_to(victim)

    result = pull(tmp_path, {"m": m})

    assert "failed" == result["m"].state
    assert not victim.exists()


# --- the eight failure cases of issue #4 ----------------------------------------------------------------------------


@pytest.mark.parametrize("transfer", [SINGLE, RANGED], ids=["single-stream", "ranged"])
def test_1_connection_closed_mid_file_resumes_from_there(
    tmp_path: Path, server: FileServer, transfer: TransferConfig
) -> None:
    """The server drops the connection at byte N: the next request starts at N instead of 0, and the result
    verifies."""
    cut = 5 * MIB + 1234
    server.drop_at["big.bin"] = [cut]

    result = pull(tmp_path, {"m": spec(server, "big.bin", BIG)}, transfer)

    assert "pulled" == result["m"].state
    assert BIG == placed(tmp_path)
    sent = sum(r.sent for r in server.data_requests("big.bin"))
    if transfer is SINGLE:
        assert f"bytes={cut}-" == server.data_requests("big.bin")[-1].range
        assert len(BIG) == sent  # not one byte fetched twice
    else:  # ranges aborted beside the dropped one may have had bytes in flight; nothing restarts from 0
        assert sent < len(BIG) + 4 * RANGED.chunk_bytes
        ranges = [r.range for r in server.data_requests("big.bin")]
        assert any(str(r).startswith(f"bytes={cut}-") for r in ranges), " ".join(str(r) for r in ranges)


def test_2_server_ignoring_range_on_resume_gives_no_appended_garbage(tmp_path: Path, server: FileServer) -> None:
    """A partial from an earlier run, then a server that answers the resume with 200 and the whole body: the
    partial is replaced, not appended to."""
    server.drop_at["small.bin"] = [MIB]
    first = pull(tmp_path, {"m": spec(server, "small.bin", SMALL)}, replace(SINGLE, attempts=1))
    assert "failed" == first["m"].state
    assert [] != partial_sidecars(tmp_path / "models")

    server.ignore_range.add("small.bin")
    second = pull(tmp_path, {"m": spec(server, "small.bin", SMALL)})

    assert "pulled" == second["m"].state
    assert SMALL == placed(tmp_path)
    assert 200 == server.data_requests("small.bin")[-1].status


def test_3_changed_remote_discards_the_partial_and_downloads_whole(tmp_path: Path, server: FileServer) -> None:
    """The remote file changes between two runs (new ETag): the old partial is discarded and the new file is
    downloaded from byte 0; when the manifest still names the old hash, the pull fails and places nothing."""
    server.drop_at["big.bin"] = [3 * MIB]
    pull(tmp_path, {"m": spec(server, "big.bin", BIG)}, replace(SINGLE, attempts=1))
    changed = os.urandom(len(BIG))
    server.files["big.bin"] = changed
    server.requests.clear()

    stale = pull(tmp_path / "other-state", {"m": spec(server, "big.bin", BIG)}, root=tmp_path / "models")

    assert "failed" == stale["m"].state
    assert "sha256 mismatch" in str(stale["m"].error)
    assert [None] == [r.range for r in server.data_requests("big.bin")]  # whole file, not a resume
    assert not (tmp_path / "models" / "checkpoints" / "m.safetensors").exists()

    fresh = pull(tmp_path, {"m": spec(server, "big.bin", changed)})
    assert "pulled" == fresh["m"].state
    assert changed == placed(tmp_path)


def test_3b_remote_changing_between_ranges_restarts_cleanly(tmp_path: Path, server: FileServer) -> None:
    """The remote changes while ranges are being fetched: the next range's If-Range gets 200, the partial that
    would splice two versions is discarded, and the pull finishes with the new version only."""
    changed = os.urandom(len(BIG))
    reached, release = threading.Event(), threading.Event()
    server.hold["big.bin"] = (3, reached, release)
    result: dict[str, ModelStatus] = {}
    worker = threading.Thread(
        target=lambda: result.update(pull(tmp_path, {"m": spec(server, "big.bin", changed)}, RANGED))
    )
    worker.start()
    assert reached.wait(30), "the fourth range request never came"
    server.files["big.bin"] = changed
    release.set()
    worker.join(60)

    assert "pulled" == result["m"].state
    assert changed == placed(tmp_path)
    statuses = [r.status for r in server.data_requests("big.bin")]
    assert 200 in statuses
    assert 206 == statuses[-1]


def test_4_two_processes_pulling_the_same_file_download_it_once(tmp_path: Path, server: FileServer) -> None:
    """Two `emp-agent pull` processes for the same file at once: one downloads, the other waits on the per-file
    lock and places it from the cache; both succeed."""
    gate = threading.Event()
    server.pause_at["big.bin"] = (MIB, gate)
    profile = tmp_path / "p.toml"
    m = spec(server, "big.bin", BIG)
    profile.write_text(f'[models.m]\nurl = "{m.url}"\ndest = "{m.dest}"\nsha256 = "{m.sha256}"\nsize = {m.size}\n')
    procs = [pull_process(tmp_path, profile, f"state-{i}") for i in range(2)]
    logs = [StderrLines(p) for p in procs]
    try:
        wait_until(lambda: all("models.plan" in log.text() for log in logs), what="both processes planned")
        gate.set()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [0, 0] == [p.returncode for p in procs], [log.text() for log in logs]
    assert ["pulled", "verified"] == sorted(out.split()[1] for out in outs)
    assert len(BIG) == server.bytes_sent("big.bin") - 1  # the probe's one byte aside
    assert BIG == placed(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_5_disk_full_mid_download_fails_clearly_and_resumes_later(tmp_path: Path, server: FileServer) -> None:
    """The model root's filesystem fills up mid-download: a clear error, nothing at the destination, the partial
    kept; once space is free again the pull resumes from where it stopped."""
    root = tmp_path / "models"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(root)], check=True)
    try:
        gate = threading.Event()
        server.pause_at["small.bin"] = (MIB, gate)
        result: dict[str, ModelStatus] = {}
        m = spec(server, "small.bin", SMALL)
        worker = threading.Thread(target=lambda: result.update(pull(tmp_path, {"m": m}, root=root)))
        worker.start()
        wait_until(lambda: server.bytes_sent("small.bin") >= MIB, what="first MiB sent")
        filler = root / "filler"
        with filler.open("wb") as handle, pytest.raises(OSError, match="No space left"):
            handle.write(b"\0" * (8 * MIB))
        gate.set()
        worker.join(60)

        assert "failed" == result["m"].state
        assert "disk full after" in str(result["m"].error)
        assert not (root / "checkpoints" / "m.safetensors").exists()
        assert [] != partial_sidecars(root)

        filler.unlink()
        del server.pause_at["small.bin"]
        again = pull(tmp_path, {"m": m}, root=root)
        assert "pulled" == again["m"].state
        assert SMALL == (root / "checkpoints" / "m.safetensors").read_bytes()
        assert server.data_requests("small.bin")[-1].range not in (None, "bytes=0-")
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"])
def test_6_redirect_to_another_origin_does_not_forward_the_token(tmp_path: Path, target_host: str) -> None:
    """A 302 to another host:port (a signed CDN URL): the bearer token is not sent there, the download works,
    and the token appears nowhere in the result."""
    with serve_files({"small.bin": SMALL}) as cdn, serve_files() as origin:
        cdn_url = cdn.url.replace("127.0.0.1", target_host) + "/small.bin?sig=abc"
        origin.redirect["model"] = cdn_url
        m = ModelSpec(url=f"{origin.url}/model", dest="m.bin", sha256=sha(SMALL), auth_env="MODEL_TOKEN")

        result = pull(tmp_path, {"m": m}, environ={"MODEL_TOKEN": "tok-very-secret"})

        assert "pulled" == result["m"].state
        assert {"Bearer tok-very-secret"} == {r.headers.get("Authorization") for r in origin.requests}
        assert {None} == {r.headers.get("Authorization") for r in cdn.requests}
        assert "tok-very-secret" not in repr(result)


def test_6b_token_reaches_a_redirect_target_only_when_allowed(tmp_path: Path) -> None:
    """`auth_hosts` lists the hosts that may receive the token, redirect targets included."""
    with serve_files({"small.bin": SMALL}) as mirror, serve_files() as origin:
        origin.redirect["model"] = f"{mirror.url}/small.bin"
        allowed = [origin.url.removeprefix("http://"), mirror.url.removeprefix("http://")]
        m = ModelSpec(
            url=f"{origin.url}/model", dest="m.bin", sha256=sha(SMALL), auth_env="MODEL_TOKEN", auth_hosts=allowed
        )

        assert "pulled" == pull(tmp_path, {"m": m}, environ={"MODEL_TOKEN": "tok"})["m"].state
        assert {"Bearer tok"} == {r.headers.get("Authorization") for r in mirror.requests}


def test_7_content_disposition_never_decides_where_bytes_go(tmp_path: Path, server: FileServer) -> None:
    """A hostile `Content-Disposition: filename=../../etc/x` is ignored; nothing is written outside the model
    root and the file lands at its manifest destination."""
    server.content_disposition["small.bin"] = 'attachment; filename="../../etc/x"'
    work = tmp_path / "work"
    work.mkdir()

    result = pull(work, {"m": spec(server, "small.bin", SMALL, dest="loras/ok.safetensors")})

    assert "pulled" == result["m"].state
    assert ["work"] == [p.name for p in tmp_path.iterdir()]
    outside = {p.relative_to(work).as_posix() for p in work.rglob("*") if "models" not in p.parts}
    assert {"state", "state/models.json", "state/models.lock"} == outside
    files = {p.relative_to(work / "models").as_posix() for p in (work / "models").rglob("*") if p.is_file()}
    assert {"loras/ok.safetensors", f".emp-cache/objects/sha256/{sha(SMALL)[:2]}/{sha(SMALL)}"} == {
        f for f in files if not f.startswith(".emp-cache/locks/")
    }


def test_8_agent_killed_at_60_percent_resumes_instead_of_starting_over(tmp_path: Path, server: FileServer) -> None:
    """`emp-agent pull` is SIGKILLed after 60 % of a file is on disk; the next run fetches only the rest."""
    server.rate["big.bin"] = 1.5 * MIB  # a slow link: the sidecar (saved once a second) records progress on the way
    gate = threading.Event()
    server.pause_at["big.bin"] = (int(len(BIG) * 0.9), gate)  # never finishes before the kill
    profile = tmp_path / "p.toml"
    m = spec(server, "big.bin", BIG)
    profile.write_text(f'[models.m]\nurl = "{m.url}"\ndest = "{m.dest}"\nsha256 = "{m.sha256}"\nsize = {m.size}\n')
    proc = pull_process(tmp_path, profile, "state")
    try:
        wait_until(lambda: _covered(tmp_path / "models") >= 0.6 * len(BIG), timeout=60, what="60 % on disk")
    finally:
        proc.kill()
        proc.wait()
    kept = _covered(tmp_path / "models")
    del server.rate["big.bin"], server.pause_at["big.bin"]
    gate.set()
    server.requests.clear()

    rerun = pull_process(tmp_path, profile, "state")
    out, err = rerun.communicate(timeout=120)

    assert 0 == rerun.returncode, err
    assert "m: pulled" in out
    assert BIG == placed(tmp_path)
    assert len(BIG) - kept == sum(r.sent for r in server.data_requests("big.bin"))


# --- helpers for the process-level cases ----------------------------------------------------------------------------


def pull_process(tmp_path: Path, profile: Path, state: str) -> subprocess.Popen[str]:
    """`emp-agent pull` in its own process, JSON logs on stderr."""
    env = {
        "PATH": os.environ["PATH"],
        "EMP_AGENT_MODEL_ROOT": str(tmp_path / "models"),
        "EMP_AGENT_STATE_DIR": str(tmp_path / state),
        "EMP_AGENT_PULL_RANGED_MIN_MIB": "64",
        "EMP_AGENT_PULL_DISK_MARGIN_MIB": "0",
        "EMP_AGENT_LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "pull", "--profile", str(profile)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class StderrLines:
    """Collects a process's stderr in a thread, so tests can wait for a line without blocking on the pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: list[str] = []
        assert proc.stderr is not None
        self._thread = threading.Thread(target=lambda: self._lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
        self._thread.start()

    def text(self) -> str:
        return "".join(self._lines)


def _covered(root: Path) -> int:
    """Bytes the partial's sidecar records as on disk."""
    import json

    for sidecar in partial_sidecars(root):
        try:
            return sum(hi - lo for lo, hi in json.loads(sidecar.read_text())["done"])
        except (OSError, ValueError, KeyError):
            return 0
    return 0
