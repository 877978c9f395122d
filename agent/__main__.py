"""`python -m agent` runs the CLI."""

from agent.cli import main

raise SystemExit(main())
