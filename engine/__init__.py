"""tunedeck engine: training, chat and export processes that speak JSON-lines events."""

from __future__ import annotations
