"""mcrd's settings: one definition per key.

Each key is a field below, and its definition gives everything about it: the
`[daemon]` key in the rule file, the `MCRD_<KEY>` environment variable, the
command-line flag (`--key-name`, plus a short one for some), the help text,
the default and the checks, and whether a reload applies it (**live**) or it
takes effect only when mcrd restarts (**restart-only**). The command line,
the reload outcome and the man pages' tables are all derived from here.

Precedence: command line, then environment, then `[daemon]`, then defaults.
The rule file's path (`config`) has a flag and a variable but no `[daemon]`
key, since it names the file that holds the table.

Pure: values in, values out. Must not depend on the rule file's parser, on
sockets or on asyncio (config.py imports this, not the other way round).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from mcrd.defaults import DEFAULT_CONFIG, DEFAULT_CONTROL_SOCKET, DEFAULT_RUNTIME_RULES, LogLevel

ENV_PREFIX = "MCRD_"


@dataclass(frozen=True)
class Setting:
    """What a field's type does not say: its short flag, and whether a
    reload applies it (live) or only a restart does."""

    short: str | None = None
    live: bool = False
    metavar: str | None = None


class RuleFileLocation(BaseSettings):
    """Where the rule file is: the one setting read before the file."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore")

    config: Annotated[Path, Setting("-c", metavar="FILE")] = Field(
        DEFAULT_CONFIG, description="the rule file"
    )


class DaemonOptions(BaseModel):
    """The `[daemon]` table. Every key can also come from MCRD_<KEY> or a flag."""

    model_config = ConfigDict(extra="forbid")

    control_socket: Annotated[Path, Setting("-s", metavar="PATH")] = Field(
        DEFAULT_CONTROL_SOCKET, description="the control socket's path"
    )
    log_level: Annotated[LogLevel, Setting("-l", live=True)] = Field(
        "info", description="the least severe messages logged"
    )
    user: Annotated[str | None, Setting("-u", metavar="USER")] = Field(
        None,
        description="user (name or number) the workers run as; "
        "default: nobody when mcrd runs as root, else mcrd's own user",
    )
    group: Annotated[str | None, Setting("-g", metavar="GROUP")] = Field(
        None, description="group the workers run as; default: the user's primary group"
    )
    watch: Annotated[bool, Setting(live=True)] = Field(
        True, description="reload when the rule file changes (SIGHUP and mcrctl reload work either way)"
    )
    worker_timeout: Annotated[float, Setting(metavar="SECONDS")] = Field(
        10.0,
        ge=1.0,
        le=3600.0,
        description="seconds a worker may go without answering before it is killed and restarted",
    )
    socket_group: Annotated[str | None, Setting(metavar="GROUP")] = Field(
        None, description="group owning the control socket: its members may use read-only commands"
    )
    admin_group: Annotated[str | None, Setting(metavar="GROUP")] = Field(
        None, description="group whose members may also change state (add, remove, reload, ...)"
    )
    workers: Annotated[int | Literal["auto"], Setting(metavar="N")] = Field(
        "auto",
        description='worker processes per input interface, spread by flow hash; "auto": 1 on up to '
        "2 cores, else half the cores, at most 4; always 1 for an interface with rules under the loop guard",
    )
    offload: Annotated[Literal["auto", "off"], Setting()] = Field(
        "off",
        description='relay in the kernel (eBPF at tc ingress) the rules that allow it: "auto", '
        'or "off" for user space only; a rule\'s own offload wins',
    )
    ring_size: Annotated[int, Setting(metavar="MIB")] = Field(
        64, ge=4, le=1024, description="MiB of receive ring per worker (TPACKET_V2), 4 to 1024"
    )
    busy_poll: Annotated[int, Setting(metavar="MICROSECONDS")] = Field(
        0,
        ge=0,
        le=1_000_000,
        description="microseconds a worker keeps polling its ring after the last datagram before it "
        "sleeps: a core per worker for the lowest latency; 0: sleep at once",
    )
    max_rules: Annotated[int, Setting(live=True, metavar="N")] = Field(
        1000, ge=1, le=100_000, description="rules at most, from the file and added at run time together"
    )
    max_clients: Annotated[int, Setting(live=True, metavar="N")] = Field(
        32, ge=1, le=10_000, description="control clients connected at once"
    )
    client_timeout: Annotated[float, Setting(live=True, metavar="SECONDS")] = Field(
        5.0, gt=0, le=3600.0, description="seconds a control client has to send a complete request"
    )
    runtime_rules: Annotated[Path, Setting(metavar="FILE")] = Field(
        DEFAULT_RUNTIME_RULES, description="where mcrctl config save writes runtime rules; loaded at start"
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():  # from the environment or a flag
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise ValueError(f'must be "auto" or a number of workers from 1 to 64, got {value!r}')
        return value


def workers_per_input(setting: int | Literal["auto"], cores: int | None) -> int:
    """What `workers = "auto"` means on this machine."""
    if setting != "auto":
        return setting
    cores = cores or 1
    return 1 if cores <= 2 else min(4, cores // 2)


class DaemonSettings(DaemonOptions, RuleFileLocation):
    """Effective settings: command line, then environment, then `[daemon]`, then defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=False, extra="forbid")

    @classmethod
    def resolve(cls, cli: dict[str, Any], table: DaemonOptions) -> DaemonSettings:
        file_values = table.model_dump(exclude_unset=True)

        class _Resolved(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

        resolved = _Resolved(**{k: v for k, v in cli.items() if v is not None})
        return cls.model_validate(resolved.model_dump())


def rule_file_path(flag: Path | str | None) -> Path:
    """The rule file: the flag's value, else MCRD_CONFIG, else the default."""
    return (RuleFileLocation(config=Path(flag)) if flag else RuleFileLocation()).config


# -- the definitions, as data -------------------------------------------------


@dataclass(frozen=True)
class Definition:
    """Everything about one setting, for the command line and the docs."""

    name: str
    field: FieldInfo
    setting: Setting
    in_file: bool  # a `[daemon]` key

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> list[str]:
        return [f for f in (self.setting.short, self.flag) if f]

    @property
    def live(self) -> bool:
        return self.setting.live

    @property
    def help(self) -> str:
        return self.field.description or ""

    @property
    def choices(self) -> tuple[str, ...] | None:
        kind = self.field.annotation
        return get_args(kind) if get_origin(kind) is Literal else None


def _setting_of(field: FieldInfo) -> Setting:
    return next((m for m in field.metadata if isinstance(m, Setting)), Setting())


def definitions() -> Iterator[Definition]:
    """Every setting, the rule file's path first, then the `[daemon]` keys in order."""
    for name, field in RuleFileLocation.model_fields.items():
        yield Definition(name, field, _setting_of(field), in_file=False)
    for name, field in DaemonOptions.model_fields.items():
        yield Definition(name, field, _setting_of(field), in_file=True)


DEFINITIONS = {d.name: d for d in definitions()}
LIVE = frozenset(d.name for d in DEFINITIONS.values() if d.live and d.in_file)
RESTART_ONLY = frozenset(d.name for d in DEFINITIONS.values() if not d.live and d.in_file)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting, its value None when not given."""
    for d in DEFINITIONS.values():
        where = f"${d.env}" + (f", [daemon] {d.name}" if d.in_file else "")
        when = "" if not d.in_file else ("; live" if d.live else "; restart-only")
        default = d.field.default
        shown = (
            ""
            if default is None
            else f"; default {str(default).lower() if isinstance(default, bool) else default}"
        )
        help_text = f"{d.help} ({where}{shown}{when})".replace("%", "%%")
        if d.field.annotation is bool:
            parser.add_argument(
                *d.flags, dest=d.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                *d.flags,
                dest=d.name,
                default=None,
                choices=d.choices,
                metavar=d.setting.metavar,
                help=help_text,
            )


def given_on_command_line(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by name."""
    return {name: value for name in DEFINITIONS if (value := getattr(args, name, None)) is not None}


def source_of(name: str, cli: dict[str, Any]) -> str:
    """How a user set a value that failed validation: its flag or its variable."""
    d = DEFINITIONS.get(name)
    if d is None:
        return name
    return d.flag if name in cli else d.env


# -- what a reload changes ------------------------------------------------------


@dataclass(frozen=True)
class SettingsChange:
    """What a new `[daemon]` table changes, key by key.

    `live`: live keys whose value changes; a reload applies them now.
    `restart`: restart-only keys that this file changes (against the last one).
    `restart_needed`: restart-only keys whose wanted value differs from the
    one mcrd runs with: they wait for a restart, this reload or an earlier one.
    """

    live: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        return bool(self.live or self.restart)


def compare_settings(
    in_effect: DaemonSettings, wanted: DaemonSettings, new: DaemonSettings
) -> SettingsChange:
    """`in_effect`: what mcrd runs with; `wanted`: what the last file asked
    for; `new`: what this file asks for (all resolved, flags and variables
    included)."""

    def differ(keys: frozenset[str], a: DaemonSettings, b: DaemonSettings) -> tuple[str, ...]:
        return tuple(k for k in DaemonOptions.model_fields if k in keys and getattr(a, k) != getattr(b, k))

    return SettingsChange(
        live=differ(LIVE, in_effect, new),
        restart=differ(RESTART_ONLY, wanted, new),
        restart_needed=differ(RESTART_ONLY, in_effect, new),
    )


def take_live(in_effect: DaemonSettings, new: DaemonSettings) -> DaemonSettings:
    """The settings in effect after a reload: the live keys from `new`, the
    others as they were."""
    return in_effect.model_copy(update={k: getattr(new, k) for k in LIVE})
