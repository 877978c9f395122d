"""Rendering documents for a human: the status (a header and a supervisorctl/pm2-like table) and the host's
fingerprint. Stdlib only."""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs `emp-agent status` 5 ms of imports; mypy reads this name as usual
if TYPE_CHECKING:
    from typing import Any

COLOURS = {
    "RUNNING": "32",
    "ready": "32",
    "done": "32",
    "STARTING": "33",
    "BACKOFF": "33",
    "bootstrapping": "33",
    "degraded": "33",
    "running": "33",
    "FATAL": "31",
    "failed": "31",
    "EXITED": "31",
    "STOPPED": "2",
    "STOPPING": "33",
    "stopping": "33",
    "draining": "33",
    "skipped": "2",
    "pending": "2",
    "healthy": "32",
    "live": "32",
    "suspect": "33",
    "dead": "31",
    "unhealthy": "31",
    "lost": "31",
}


def _paint(text: str, key: str, colour: bool) -> str:
    code = COLOURS.get(key)
    return f"\033[{code}m{text}\033[0m" if colour and code else text


def format_duration(seconds: float | None) -> str:
    """Compact uptime: 42s, 7m03s, 5h02m, 3d04h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _table(rows: list[list[str]], states: list[str], state_col: int, colour: bool) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        if n > 0:
            cells[state_col] = _paint(cells[state_col], states[n - 1], colour)
        lines.append("  ".join(cells).rstrip())
    return lines


def render_status(status: dict[str, Any], colour: bool = False) -> str:
    """The whole status as text."""
    phase = status["phase"]
    reg = status["registry"]
    lines = [
        f"machine  {status['machine_id']}   profile {status['profile']}   agent {status['agent_version']}"
        f"   pid {status['pid']}   up {format_duration(status['uptime_s'])}",
        f"phase    {_paint(phase, phase, colour)}",
    ]
    lines += [f"         - {reason}" for reason in status.get("reasons", [])]
    hb = reg.get("last_heartbeat") or "never"
    connected = "connected" if reg["connected"] else f"NOT connected ({reg.get('last_error') or 'not yet'})"
    lines.append(f"registry {reg['url']}{' (embedded)' if reg['embedded'] else ''}  {connected}  last heartbeat {hb}")
    gpus = status.get("gpus")
    if gpus:
        summary = ", ".join(f"{g['index']}:{g['name']} {g['memory_total_mib']}MiB" for g in gpus["gpus"]) or "none"
        note = f": {gpus['message']}" if gpus["state"] != "available" else ""
        lines.append(f"gpus     {summary} ({gpus['state']}{note})")
    lines.append("")
    stage_rows = [["STAGE", "STATE", "TIME", "DETAIL"]]
    stage_states = []
    for stage in status["stages"]:
        took = f"{stage['duration_s']:.2f}s" if stage["duration_s"] is not None else "-"
        detail = stage["error"] or stage["detail"] or ""
        if stage["name"] == "pull_models" and stage["state"] == "running" and status.get("pull"):
            detail = format_pull(status["pull"])
        stage_rows.append([stage["name"], stage["state"], took, detail])
        stage_states.append(stage["state"])
    lines += _table(stage_rows, stage_states, 1, colour)
    lines.append("")
    rows = [["SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "GPU", "PORT", "LAST ERROR"]]
    states = []
    for svc in status["services"]:
        gpu = str(svc["gpu"]["index"]) if svc.get("gpu") else "-"
        rows.append(
            [
                svc["name"],
                svc["state"],
                str(svc["pid"] or "-"),
                format_duration(svc["uptime_s"]),
                str(svc["restarts"]),
                f"{svc['cpu_percent']:.1f}%" if svc.get("cpu_percent") is not None else "-",
                format_bytes(svc.get("rss_bytes")),
                gpu,
                str(svc["port"] or "-"),
                _last_error(svc),
            ]
        )
        states.append(svc["state"])
    if len(rows) == 1:
        lines.append("no services")
    else:
        lines += _table(rows, states, 1, colour)
    models = status.get("models") or []
    if models:
        lines.append("")
        model_rows = [["MODEL", "STATE", "SIZE", "DEST"]]
        model_states = []
        for m in models:
            size = f"{m['size']}" if m["size"] is not None else "-"
            dest = m["dest"] + (f"  ({m['error']})" if m.get("error") else "")
            model_rows.append([m["name"], m["state"], size, dest])
            model_states.append({"verified": "done", "pulled": "done", "cached": "done"}.get(m["state"], "failed"))
        lines += _table(model_rows, model_states, 1, colour)
    return "\n".join(lines)


def format_bytes(size: int | None) -> str:
    """Compact memory size: 812K, 512M, 1.2G (binary units, as pm2 and top show them)."""
    if size is None:
        return "-"
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{size}B"


def format_pull(pull: dict[str, Any]) -> str:
    """`1.2/4.0 GiB (30%) at 310 MB/s, 1/3 files` for a pull in progress (MiB below 1 GiB)."""
    total = pull["bytes_total"]
    unit, scale = ("GiB", 1024**3) if total >= 1024**3 else ("MiB", 1024**2)
    share = f" ({100 * pull['bytes_done'] / total:.0f}%)" if total else ""
    failed = f", {pull['items_failed']} failed" if pull.get("items_failed") else ""
    return (
        f"{pull['bytes_done'] / scale:.1f}/{total / scale:.1f} {unit}{share} at {pull['rate_bps'] / 1e6:.0f} MB/s, "
        f"{pull['items_done']}/{pull['items_total']} files{failed}"
    )


def _or_dash(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def render_fingerprint(data: dict[str, Any], colour: bool = False) -> str:
    """`emp-agent detect` for a human: host line, driver line, one row per GPU (MIG devices below their GPU)."""
    host = data["host"]
    gpu = data["gpus"]
    lines = [
        f"host     {host['hostname']}  {host['os']}  kernel {host['kernel']}  {host['arch']}",
        f"cpu      {host['cpu_model']}  {host['cpu_logical']} logical / {_or_dash(host['cpu_physical'])} physical",
        f"memory   {host['memory_total_mib']} MiB ({host['memory_available_mib']} available)   "
        f"models disk {host['model_root_free_mib']} of {host['model_root_total_mib']} MiB free",
    ]
    state = gpu["state"]
    versions = f"  driver {gpu['driver_version']}  CUDA {gpu['cuda_driver_version']}" if gpu["driver_version"] else ""
    lines.append(f"nvidia   {_paint(state, 'ready' if state == 'available' else 'failed', colour)}{versions}")
    if gpu["message"] and gpu["message"] != f"{len(gpu['gpus'])} GPU(s)":
        lines.append(f"         {gpu['message']}")
    if not gpu["gpus"]:
        return "\n".join(lines) + "\n"
    rows = [["GPU", "NAME", "MEMORY MiB", "UTIL", "TEMP", "POWER W", "CC", "ECC", "MIG", "HEALTH", "UUID", "BUS"]]
    healths = []
    for g in gpu["gpus"]:
        memory = f"{_or_dash(g['memory_used_mib'])}/{_or_dash(g['memory_total_mib'])}"
        power = f"{_or_dash(g['power_draw_w'])}/{_or_dash(g['power_limit_w'])}"
        ecc = g["ecc"]
        ecc_text = (
            "-" if ecc["enabled"] is None else "off" if not ecc["enabled"] else f"on ({ecc['uncorrected_volatile']})"
        )
        mig = "-" if g["mig_enabled"] is None else f"{len(g['mig_devices'])} dev" if g["mig_enabled"] else "off"
        rows.append(
            [
                str(g["index"]),
                g["name"] or "-",
                memory,
                _or_dash(g["utilization_gpu_pct"], "%"),
                _or_dash(g["temperature_c"], "C"),
                power,
                g["compute_capability"] or "-",
                ecc_text,
                mig,
                g["health"],
                g["uuid"] or "-",
                g["pci_bus_id"] or "-",
            ]
        )
        healths.append(g["health"])
        for m in g["mig_devices"]:
            used = f"{_or_dash(m['memory_used_mib'])}/{_or_dash(m['memory_total_mib'])}"
            rows.append(
                [
                    f" {g['index']}:{m['index']}",
                    f"MIG GI {m['gpu_instance_id']} CI {m['compute_instance_id']}",
                    used,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{_or_dash(m['sm_count'])} SM",
                    g["health"],
                    m["uuid"],
                    "-",
                ]
            )
            healths.append(g["health"])
    lines.append("")
    lines += _table(rows, healths, 9, colour)
    for g in gpu["gpus"]:
        for reason in g["health_reasons"]:
            lines.append(f"GPU {g['index']} {g['health']}: {reason}")
    if gpu.get("hidden"):
        lines.append(f"hidden   GPU {', '.join(map(str, gpu['hidden']))} (CUDA_VISIBLE_DEVICES or gpu.select)")
    return "\n".join(lines) + "\n"


def render_fleet(machines: list[dict[str, Any]], colour: bool = False) -> str:
    """`emp-agent fleet`: one row per machine, live first."""
    if not machines:
        return "no machines\n"
    rows = [["MACHINE", "STATE", "AGE", "PHASE", "EPOCH", "GPUS", "SERVICES READY", "NOTE"]]
    for m in machines:
        gpus = m["gpus"]
        gpu_text = f"{len(gpus)}x {gpus[0]}" if gpus and len(set(gpus)) == 1 else ", ".join(gpus) or "-"
        note = m["unmet"] or (m["reasons"][0] if m["reasons"] else "")
        rows.append(
            [
                m["machine_id"],
                m["liveness"],
                f"{m['age_s']:g}s",
                m["phase"] or "-",
                str(m["epoch"]) if m["epoch"] is not None else "-",
                gpu_text,
                ",".join(m["services_ready"]) or "-",
                note,
            ]
        )
    return "\n".join(_table(rows, [m["liveness"] for m in machines], 1, colour)) + "\n"


def _last_error(svc: dict[str, Any]) -> str:
    """How the last run ended; while the instance waits to start again, how far it is from the crash-loop limit
    and when the next start is due."""
    text = svc["last_error"] or ""
    if svc["state"] not in ("BACKOFF", "FATAL") or svc.get("failures") is None:
        return text
    due = svc.get("next_start_in_s")
    when = f", next start in {format_duration(due)}" if due is not None else ", no retry"
    return f"{text} ({svc['failures']}/{svc['crash_loop_limit']} failures{when})"
