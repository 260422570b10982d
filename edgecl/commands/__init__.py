"""One module per ``edgecl`` subcommand: parse flags into a ``RunSpec`` or settings, then call the layer
that does the work (``runner``, ``bench``, ``serve``, ``export``, ``doctor``).

Owns argument parsing and exit codes only; nothing below the CLI imports this package.
"""
