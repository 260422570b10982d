"""``python -m edgecl`` runs the CLI."""

from edgecl.cli import main

raise SystemExit(main())
