"""Widgets shared by the tabs."""

from __future__ import annotations
