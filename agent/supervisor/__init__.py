"""The process table: supervised service instances with states, restart policy and readiness."""
