"""momus-haproxy: keep HAProxy's routing in step with a NATS key-value document."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
