"""The worker daemon: daemon.py wires and supervises the services, one module each."""

from .daemon import Worker, WorkerOptions

__all__ = ["Worker", "WorkerOptions"]
