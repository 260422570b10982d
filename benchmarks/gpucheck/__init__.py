"""Pieces of ``benchmarks/gpu_check.py`` (issue 20): sizes and context, the units of each step, the
markdown summary. Imported with ``benchmarks/`` on ``sys.path`` (the script's own folder)."""
