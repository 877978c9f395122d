"""An NVML probe child whose driver wedges: the recorded H100 host, with nvmlDeviceGetPowerUsage never returning.

Run as `python -m tests.programs.nvml_hang` in place of `agent.host.nvml`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agent.host.nvml import read_gpus
from agent.testing import FakeNvml

if __name__ == "__main__":
    nvml = FakeNvml.from_file(
        Path(__file__).parent.parent / "fixtures" / "nvml" / "h100x8.json", hang=frozenset({"nvmlDeviceGetPowerUsage"})
    )
    json.dump(read_gpus(nvml).to_dict(), sys.stdout)
