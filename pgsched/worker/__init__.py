"""The worker daemon; see daemon.py for its services and lifecycle."""

from .daemon import Worker, WorkerOptions

__all__ = ["Worker", "WorkerOptions"]
