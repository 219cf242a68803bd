"""CLI sub-commands: each module exposes HELP, add_arguments(parser) and run(args)."""

from __future__ import annotations
