"""A small ComfyUI-shaped HTTP service for the demo profile: loads a model, serves /system_stats and /prompt."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def _load_model(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return {"path": str(path), "sha256": digest.hexdigest(), "size": size}


def _handler(model: dict[str, Any]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/system_stats":
                device = os.environ.get("CUDA_VISIBLE_DEVICES") or "cpu"
                self._send(
                    200,
                    {
                        "system": {"os": sys.platform, "python_version": sys.version.split()[0], "pid": os.getpid()},
                        "devices": [{"name": device, "type": "cuda" if device != "cpu" else "cpu"}],
                        "model": model,
                    },
                )
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/prompt":
                self._send(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                prompt = json.loads(self.rfile.read(length) or b"{}").get("prompt", "")
            except ValueError:
                self._send(400, {"error": "body must be JSON"})
                return
            output = hashlib.sha256(f"{model['sha256']}:{prompt}".encode()).hexdigest()
            self._send(200, {"prompt": prompt, "output": output, "model": model["sha256"]})

        def log_message(self, format: str, *args: Any) -> None:
            print(f"{self.address_string()} {format % args}", flush=True)

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        model = _load_model(args.model)
    except OSError as exc:
        print(f"cannot load model {args.model}: {exc.strerror}", file=sys.stderr, flush=True)
        return 1
    print(f"model loaded: {model['path']} sha256={model['sha256']} size={model['size']}", flush=True)
    server = ThreadingHTTPServer((args.host, args.port), _handler(model))

    def stop(signum: int, frame: object) -> None:
        print(f"received {signal.Signals(signum).name}, shutting down", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
