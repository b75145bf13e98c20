"""The `resnet-ablate` command: a thin face over functions users can call from Python too.

One module a concern: `entry` (the parser and `main`), `run` (run a study or print its plan),
`query` (the commands that read a study back), `convert` (ImageNet's layout), and what they share:
`registry` (the command table), `arguments` (argument types) and `output` (where tables go).
"""

from __future__ import annotations

from .arguments import store_options
from .entry import build_parser, main
from .query import SHOW_COLUMNS
from .registry import COMMANDS, command

# The name it had while the command line was one module.
_store_options = store_options

__all__ = ["COMMANDS", "SHOW_COLUMNS", "build_parser", "command", "main", "store_options"]
