"""One ``APIRouter`` per resource: tasks, jobs, predict, model (and telemetry), health (and metrics, docs).

Every router but the public part of ``health`` depends on :func:`edgecl.serve.auth.require_token`; routes
get the :class:`~edgecl.serve.context.ServeContext` as the ``Ctx`` dependency and declare every status
they answer with the error model of :mod:`edgecl.serve.errors`.
"""

from edgecl.serve.routers import health, jobs, model, predict, tasks

__all__ = ["ROUTERS", "health", "jobs", "model", "predict", "tasks"]

ROUTERS = (health.public, health.router, tasks.router, jobs.router, predict.router, model.router)
