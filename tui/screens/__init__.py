"""The four tabs and the modal screens; each tab module is imported only when its tab is first shown."""

from __future__ import annotations
