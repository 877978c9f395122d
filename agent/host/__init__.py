"""Adapters for every side effect on the host: processes, GPUs, ports, downloads, host facts."""
