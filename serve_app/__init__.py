"""OpenAI-compatible Ray Serve app over the SPMD engine: ``serve run serve_app:deploy``."""

from serve_app.app import deploy

__all__ = ["deploy"]
