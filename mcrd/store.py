"""The saved-rules file: loading it at start, and writing files atomically.

Owns the on-disk form of `mcrctl config save`. Must not depend on the
running daemon, the control socket or asyncio.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mcrd.config import ConfigError, parse_rule_bytes, read_rule_file
from mcrd.rules import RuleSpec


def load_saved(path: Path) -> list[RuleSpec]:
    """Rules saved with `mcrctl config save`; none when the file does not exist yet."""
    raw = read_rule_file(path)
    if raw is None:
        return []
    loaded = parse_rule_bytes(raw, path)
    if loaded.daemon.model_fields_set:
        raise ConfigError(path, [f"{path}: [daemon] settings belong in the rule file, not here"])
    return loaded.rules


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old file or the new, never half."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
