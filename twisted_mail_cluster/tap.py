"""What ``twistd mailcluster`` loads: its options and its service maker."""

from .options import MailClusterOptions as Options
from .service import make_service as makeService

__all__ = ["Options", "makeService"]
