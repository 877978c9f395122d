"""The Redis registry: machine record, heartbeat, and the embedded server for hosts without a Redis URL."""
