"""tunedeck terminal UI; never imports the ML stack."""

from __future__ import annotations
