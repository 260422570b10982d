"""``python -m edgecl`` runs the CLI."""

from edgecl.cli import run

run()
