"""``edgecl bench``: every (method, seed) trained in its own subprocess, aggregated into accuracy and
efficiency tables (ratios to a reference method), the CPS ablation, plots and results files.

Layout: :mod:`~edgecl.bench.runs` plans the runs and drives one child per run,
:mod:`~edgecl.bench.worker` is the child (``python -m edgecl.bench.worker SPEC OUT``),
:mod:`~edgecl.bench.report` aggregates and writes tables/files, :mod:`~edgecl.bench.plots` draws PNGs.
This package imports neither torch nor matplotlib at import time (the parent stays small).
"""

from __future__ import annotations

from edgecl.bench.report import (
    ACCURACY_FIGURES,
    CSV_COLUMNS,
    EFFICIENCY_FIGURES,
    aggregate,
    run_figures,
    write_outputs,
)
from edgecl.bench.runs import ABLATIONS, RunOutcome, RunPlan, execute_run, plan_runs

__all__ = [
    "ABLATIONS",
    "ACCURACY_FIGURES",
    "CSV_COLUMNS",
    "EFFICIENCY_FIGURES",
    "RunOutcome",
    "RunPlan",
    "aggregate",
    "execute_run",
    "plan_runs",
    "run_figures",
    "write_outputs",
]
