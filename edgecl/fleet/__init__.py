"""Fleet learning: many edgecl devices learn the same task stream together on Flower; no image leaves one.

This package owns the federated layer: the strategy (:mod:`~edgecl.fleet.aggregate`: update checks and
sample-weighted FedAvg of prompt components and class-aligned head rows; :mod:`~edgecl.fleet.server`: tasks,
rounds, sampling, drop-outs), the device side (:mod:`~edgecl.fleet.device`: one round through
``edgecl.runner.prepare_run`` and the one ``Trainer`` on the device's own images), the message types
(:mod:`~edgecl.fleet.protocol`), data splits for tests and the bench (:mod:`~edgecl.fleet.partition`) and
the Flower ServerApp/ClientApp plus the Flower app project they run in (:mod:`~edgecl.fleet.flower`, the
only module that imports ``flwr``; install it with ``pip install edgecl[fleet]``).
"""

from __future__ import annotations

__all__ = ["require_flwr"]

FLWR_HINT = "pip install 'edgecl[fleet]'"


def require_flwr() -> None:
    """Raise a clear error when Flower is not installed (devices that do not federate do not need it)."""
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError as err:
        raise RuntimeError(f"edgecl fleet needs Flower (flwr), which is not installed: {FLWR_HINT}") from err
