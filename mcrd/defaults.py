"""Default paths, in a module of their own so that mcrctl starts fast
(without importing the configuration machinery)."""

from pathlib import Path

DEFAULT_CONFIG = Path("/etc/mcr.toml")
DEFAULT_CONTROL_SOCKET = Path("/run/mcr/control.sock")
DEFAULT_RUNTIME_RULES = Path("/var/lib/mcrd/runtime.toml")
