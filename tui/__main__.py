"""`python -m tui` opens the TUI on $TUNEDECK_WORKSPACE or the current folder."""

from __future__ import annotations

from tui.app import main

main()
