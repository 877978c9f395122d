"""The local operator API: an HTTP server on the control socket, and the light client the CLI uses."""
