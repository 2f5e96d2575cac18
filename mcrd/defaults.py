"""Defaults that mcrctl shares with mcrd: paths and the log levels.

In a module of their own so that mcrctl starts fast: must import nothing
beyond the standard library's lightest modules (no pydantic, no asyncio).
"""

from pathlib import Path
from typing import Literal, get_args

DEFAULT_CONFIG = Path("/etc/mcr.toml")
DEFAULT_CONTROL_SOCKET = Path("/run/mcr/control.sock")
DEFAULT_RUNTIME_RULES = Path("/var/lib/mcrd/runtime.toml")

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
