"""The human status table."""

from __future__ import annotations

from agent.statusview import format_duration, render_status

STATUS = {
    "machine_id": "emp-1",
    "profile": "demo",
    "agent_version": "0.1.0",
    "pid": 42,
    "uptime_s": 65.0,
    "phase": "degraded",
    "reasons": ["service web-0: BACKOFF (exited with code 1)"],
    "registry": {
        "url": "unix:///s/redis.sock",
        "embedded": True,
        "connected": True,
        "last_heartbeat": "t",
        "last_error": None,
    },
    "gpus": {"state": "unavailable", "message": "no NVIDIA driver", "gpus": []},
    "stages": [{"name": "detect", "state": "done", "duration_s": 0.2, "detail": "2 CPUs", "error": None}],
    "services": [
        {
            "name": "web-0",
            "state": "BACKOFF",
            "pid": None,
            "uptime_s": None,
            "restarts": 3,
            "gpu": None,
            "port": 8188,
            "last_error": "exited with code 1",
        }
    ],
    "models": [{"name": "m", "state": "verified", "size": 10, "dest": "m.bin"}],
}


def test_table_shows_state_restarts_and_last_error() -> None:
    """Each service line carries name, state, pid, uptime, restarts, gpu, port and the last error."""
    text = render_status(STATUS)

    assert "phase    degraded" in text
    assert "- service web-0: BACKOFF (exited with code 1)" in text
    assert ["web-0", "BACKOFF", "-", "-", "3", "-", "-", "-", "8188", "exited", "with", "code", "1"] == next(
        line for line in text.splitlines() if line.startswith("web-0")
    ).split()


def test_no_colour_codes_unless_asked() -> None:
    """Piped output has no escape sequences."""
    assert "\033[" not in render_status(STATUS)
    assert "\033[33mdegraded\033[0m" in render_status(STATUS, colour=True)


def test_durations_are_compact() -> None:
    """Uptime reads like pm2's."""
    assert ["-", "59s", "1m01s", "1h01m", "1d01h"] == [format_duration(s) for s in (None, 59, 61, 3660, 90000)]


def test_a_running_pull_shows_bytes_rate_and_files() -> None:
    """While pull_models runs, its stage line carries bytes done/total, the rate and the file count."""
    status = {
        **STATUS,
        "stages": [{"name": "pull_models", "state": "running", "duration_s": None, "detail": None, "error": None}],
        "pull": {
            "bytes_done": 3 * 1024**3,
            "bytes_total": 4 * 1024**3,
            "rate_bps": 310e6,
            "items_done": 1,
            "items_failed": 0,
            "items_total": 3,
            "finished": False,
        },
    }

    line = next(x for x in render_status(status).splitlines() if x.startswith("pull_models"))

    assert "3.0/4.0 GiB (75%) at 310 MB/s, 1/3 files" in line


def test_fingerprint_table_shows_mig_children_and_a_lost_gpu() -> None:
    """`emp-agent detect` on a terminal: MIG devices under their GPU, a lost GPU with its reason, no colour in a
    pipe."""
    import pynvml

    from agent.host.nvml import read_gpus
    from agent.statusview import render_fingerprint
    from agent.testing import FakeNvml
    from tests.conftest import FIXTURES
    from tests.unit.test_capabilities import HOST

    mig = read_gpus(FakeNvml.from_file(FIXTURES / "nvml" / "a100-mig.json"))
    lost = read_gpus(
        FakeNvml.from_file(
            FIXTURES / "nvml" / "h100x8.json",
            errors={("nvmlDeviceGetHandleByIndex", 7): pynvml.NVML_ERROR_GPU_IS_LOST},
        )
    )

    mig_text = render_fingerprint({"host": HOST.to_dict(), "gpus": mig.to_dict()})
    lost_text = render_fingerprint({"host": HOST.to_dict(), "gpus": lost.to_dict()})

    assert "nvidia   available  driver 535.54.03  CUDA 12.2" in mig_text
    assert 4 == sum(line.startswith(" 0:") and "14 SM" in line for line in mig_text.splitlines())
    assert "8 GPU(s); GPU 7 lost" in lost_text
    assert "GPU 7 lost: NVML reports the GPU fallen off the bus" in lost_text
    assert "\033[" not in lost_text


def test_memory_sizes_read_like_top() -> None:
    """RSS in the MEM column: binary units, one decimal below ten."""
    from agent.statusview import format_bytes

    assert ["-", "512B", "1.5K", "85M", "3.2G"] == [
        format_bytes(size) for size in (None, 512, 1536, 89128960, 3435973837)
    ]
