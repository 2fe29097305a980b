"""shop: a small Django app that gitops-agent deploys (gunicorn web process, worker, migration job)."""

from shop._version import __version__

__all__ = ["__version__"]
