"""The rule file: from bytes to validated rules, or to exact errors.

Turns the text of `/etc/mcr.toml` into validated `RuleSpec`s and its
`[daemon]` table, or into a list of errors that each name the file, the
line, the rule and the field. Nothing is applied here: the caller commits a
file only when it loaded without errors. What the `[daemon]` keys mean, and
how they combine with flags and the environment, is `mcrd.settings`.
Depends on `mcrd.rules` and `mcrd.settings` only; no sockets, no processes.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from mcrd.rules import InputSpec, OutputSpec, RateLimit, ReflectSpec, RuleSpec, check_rule_set, rule_label
from mcrd.settings import DaemonOptions


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    daemon: DaemonOptions = DaemonOptions()
    rule: list[RuleSpec] = []
    reflect: list[ReflectSpec] = []


@dataclass
class LoadedConfig:
    """A rule file that loaded: its rules, its `[daemon]` table, and the bytes
    they came from (None when the file does not exist, or for text given
    directly)."""

    path: Path
    rules: list[RuleSpec] = field(default_factory=list)
    daemon: DaemonOptions = field(default_factory=DaemonOptions)
    missing: bool = False
    raw: bytes | None = None


class ConfigError(Exception):
    """A file that does not load: every error found, each naming the file
    and, where known, the line."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.path = path
        self.errors = errors


def read_rule_file(path: Path) -> bytes | None:
    """The file's bytes, None when it does not exist; ConfigError when unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(path, [f"{path}: cannot read: {exc.strerror}"]) from None


def parse_rule_bytes(raw: bytes, path: Path) -> LoadedConfig:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, [f"{path}:{line}: not valid UTF-8"]) from None
    loaded = parse_config(text, path)
    loaded.raw = raw
    return loaded


def load_config(path: Path, *, missing_ok: bool = False) -> LoadedConfig:
    """Read, parse and validate a rule file. Raises ConfigError with every problem found."""
    raw = read_rule_file(path)
    if raw is None:
        if missing_ok:
            return LoadedConfig(path, missing=True)
        raise ConfigError(path, [f"{path}: no such file"])
    return parse_rule_bytes(raw, path)


_TOML_POS = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def parse_config(text: str, path: Path) -> LoadedConfig:
    """Parse and validate a rule file's text on its own (its rules against
    each other; not against runtime rules, which is the rule book's job)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.match(str(exc))
        where = f"{path}:{m['line']}:{m['col']}" if m else str(path)
        raise ConfigError(path, [f"{where}: invalid TOML: {m['msg'] if m else exc}"]) from None
    lines = _LineFinder(text)
    try:
        parsed = RuleFile.model_validate(data)
    except ValidationError as exc:
        errors = [_format_error(path, lines, data, err) for err in exc.errors()]
        raise ConfigError(path, errors) from None
    rules = list(parsed.rule)
    # where each rule comes from: ("rule", index) or ("reflect", index)
    origins: list[tuple[str, int]] = [("rule", i) for i in range(len(rules))]
    for k, reflect in enumerate(parsed.reflect):
        expanded = reflect.rules()
        rules += expanded
        origins += [("reflect", k)] * len(expanded)

    def label(i: int, rule: RuleSpec) -> str:
        kind, k = origins[i]
        if kind == "rule":
            return rule_label(k, rule.name)
        named = f" ({parsed.reflect[k].name!r})" if parsed.reflect[k].name else ""
        return f"reflect {k + 1}{named} on {rule.input.interface}"

    def line(i: int) -> int:
        kind, k = origins[i]
        return lines.rule(k) if kind == "rule" else lines.reflect(k)

    problems = check_rule_set(rules, label)
    if problems:
        raise ConfigError(path, [f"{path}:{line(i)}: {label(i, rules[i])}: {msg}" for i, msg in problems])
    return LoadedConfig(path, rules, parsed.daemon)


class _LineFinder:
    """Best-effort line numbers: tomllib does not report where a value stood."""

    _RULE = re.compile(r"^\s*\[\[\s*rule\s*\]\]")
    _REFLECT = re.compile(r"^\s*\[\[\s*reflect\s*\]\]")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.rule_starts = [n for n, line in enumerate(self.lines) if self._RULE.match(line)]
        self.reflect_starts = [n for n, line in enumerate(self.lines) if self._REFLECT.match(line)]

    def reflect(self, index: int, key: str | None = None) -> int:
        """The line of the `index`th [[reflect]] table (or of `key` in it)."""
        starts = self.reflect_starts
        if index >= len(starts):
            return 1
        start = starts[index]
        if key is not None:
            ends = [n for n in self.rule_starts + starts if n > start]
            found = self._find_key(key, start, min(ends, default=len(self.lines)))
            if found is not None:
                return found + 1
        return start + 1

    def rule(self, index: int, key: str | None = None) -> int:
        if index >= len(self.rule_starts):
            return 1
        start = self.rule_starts[index]
        end = self.rule_starts[index + 1] if index + 1 < len(self.rule_starts) else len(self.lines)
        if key is not None:
            found = self._find_key(key, start, end)
            if found is not None:
                return found + 1
        return start + 1

    def top(self, table: str | None, key: str | None) -> int:
        start, end = 0, len(self.lines)
        if table is not None:
            header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
            for n, line in enumerate(self.lines):
                if header.match(line):
                    start = n
                    break
            else:
                return 1
            if key is None:
                return start + 1
        if key is None:
            return 1
        found = self._find_key(key, start, end)
        return (found if found is not None else start) + 1

    def _find_key(self, key: str, start: int, end: int) -> int | None:
        pattern = re.compile(rf"^\s*(\[+\s*rule\.)?{re.escape(key)}\s*(=|\])")
        for n in range(start, end):
            if pattern.match(self.lines[n]):
                return n
        return None


_KEYS: dict[str, list[str]] = {
    "top": list(RuleFile.model_fields),
    "daemon": list(DaemonOptions.model_fields),
    "rule": list(RuleSpec.model_fields),
    "input": list(InputSpec.model_fields),
    "output": list(OutputSpec.model_fields),
    "rate_limit": list(RateLimit.model_fields),
    "reflect": list(ReflectSpec.model_fields),
}

_TOML_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    list: "an array",
    dict: "a table",
}


def _toml_type(value: Any) -> str:
    return _TOML_TYPES.get(type(value), type(value).__name__)


def _context(loc: tuple[int | str, ...]) -> str:
    if len(loc) == 1:
        return "top"
    if loc[0] == "daemon":
        return "daemon"
    if loc[0] == "reflect":
        return "reflect"
    if len(loc) == 3:
        return "rule"
    if len(loc) == 4 and loc[2] == "input":
        return "input"
    if len(loc) == 4 and loc[2] == "rate_limit":
        return "rate_limit"
    return "output"


def _describe(err: Any, loc: tuple[int | str, ...]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        allowed = _KEYS[_context(loc)]
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
        return f"unknown key{suffix}"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    if kind == "too_short" and loc[-1] == "outputs":
        return "needs at least one output"
    if kind == "too_short" and loc[-1] == "interfaces":
        return "needs at least two interfaces"
    if kind in ("string_type", "int_type", "bool_type", "float_type"):
        want = {
            "string_type": "a string",
            "int_type": "an integer",
            "bool_type": "a boolean",
            "float_type": "a number",
        }
        return f"must be {want[kind]}, got {_toml_type(value)} {value!r}"
    if kind in ("list_type",):
        if loc == ("rule",):
            return "must be an array of tables: write [[rule]], not [rule]"
        return f"must be an array, got {_toml_type(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a table, got {_toml_type(value)} {value!r}"
    if kind == "literal_error":
        return f"must be one of {err['ctx']['expected']}, got {value!r}"
    return str(err["msg"])


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # pydantic appends the name of an Annotated validator's function for unions; drop those.
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def format_validation_errors(exc: ValidationError) -> list[str]:
    """Errors of one rule validated on its own (a runtime rule), by field."""
    out = []
    for err in exc.errors():
        loc = _clean_loc(tuple(err["loc"]))
        message = _describe(err, ("rule", 0, *loc))
        where = _format_loc(loc)
        out.append(f"{where}: {message}" if where else message)
    return out


def _format_error(path: Path, lines: _LineFinder, data: dict[str, Any], err: Any) -> str:
    loc = _clean_loc(tuple(err["loc"]))
    message = _describe(err, loc)
    if len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
        index = loc[1]
        rules = data.get("rule")
        name = None
        if isinstance(rules, list) and index < len(rules) and isinstance(rules[index], dict):
            raw_name = rules[index].get("name")
            name = raw_name if isinstance(raw_name, str) else None
        key = str(loc[2]) if len(loc) > 2 else None
        field_path = _format_loc(loc[2:])
        prefix = f"{path}:{lines.rule(index, key)}: {rule_label(index, name)}"
        return f"{prefix}: {field_path}: {message}" if field_path else f"{prefix}: {message}"
    if len(loc) >= 2 and loc[0] == "reflect" and isinstance(loc[1], int):
        key = str(loc[2]) if len(loc) > 2 else None
        field_path = _format_loc(loc[2:])
        prefix = f"{path}:{lines.reflect(loc[1], key)}: reflect {loc[1] + 1}"
        return f"{prefix}: {field_path}: {message}" if field_path else f"{prefix}: {message}"
    if loc and loc[0] == "daemon" and len(loc) > 1:
        return f"{path}:{lines.top('daemon', str(loc[1]))}: [daemon] {_format_loc(loc[1:])}: {message}"
    key = str(loc[0]) if loc else None
    return f"{path}:{lines.top(None, key)}: {_format_loc(loc) or 'file'}: {message}"
