"""Settings: one definition per key drives the flags, the variables, the
precedence and what a reload may apply."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mcrd import daemon
from mcrd.config import ConfigError, load_config
from mcrd.defaults import LOG_LEVELS
from mcrd.settings import (
    DEFINITIONS,
    LIVE,
    RESTART_ONLY,
    DaemonOptions,
    DaemonSettings,
    SettingsChange,
    compare_settings,
    given_on_command_line,
    rule_file_path,
    source_of,
    take_live,
    workers_per_input,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def test_settings_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    table = DaemonOptions.model_validate({"control_socket": "/from/file", "log_level": "warning"})
    assert DaemonSettings.resolve({}, table).control_socket == Path("/from/file")
    monkeypatch.setenv("MCRD_CONTROL_SOCKET", "/from/env")
    settings = DaemonSettings.resolve({"control_socket": None}, table)
    assert (settings.control_socket, settings.log_level) == (Path("/from/env"), "warning")
    settings = DaemonSettings.resolve({"control_socket": Path("/from/flag"), "log_level": "debug"}, table)
    assert (settings.control_socket, settings.log_level) == (Path("/from/flag"), "debug")
    assert DaemonSettings.resolve({}, DaemonOptions()).control_socket == Path("/from/env")
    monkeypatch.delenv("MCRD_CONTROL_SOCKET")
    assert DaemonSettings.resolve({}, DaemonOptions()).control_socket == Path("/run/mcr/control.sock")


def test_workers_and_ring_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert workers_per_input("auto", 2) == 1 and workers_per_input("auto", 1) == 1
    assert workers_per_input("auto", 8) == 4 and workers_per_input("auto", 6) == 3
    assert workers_per_input("auto", None) == 1 and workers_per_input(3, 2) == 3
    assert DaemonOptions.model_validate({"workers": 2, "ring_size": 64}).workers == 2
    monkeypatch.setenv("MCRD_WORKERS", "3")
    assert DaemonSettings.resolve({}, DaemonOptions()).workers == 3
    monkeypatch.chdir(tmp_path)
    for text, error in [
        ("[daemon]\nworkers = 0\n", "workers"),
        ('[daemon]\nworkers = "many"\n', "workers"),
        ("[daemon]\nring_size = 2\n", "ring_size"),
    ]:
        _write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_config(Path("bad.toml"))
        assert any(f"daemon.{error}" in e or error in e for e in info.value.errors), info.value.errors


def test_every_setting_has_a_flag_a_variable_and_help() -> None:
    assert set(DEFINITIONS) == {"config", *DaemonOptions.model_fields}
    for d in DEFINITIONS.values():
        assert d.flag == "--" + d.name.replace("_", "-") and d.env == "MCRD_" + d.name.upper()
        assert d.help, d.name
    assert set(DaemonOptions.model_fields) == LIVE | RESTART_ONLY and not LIVE & RESTART_ONLY
    assert {"log_level", "watch", "max_rules", "max_clients", "client_timeout"} == LIVE
    assert DEFINITIONS["log_level"].choices == LOG_LEVELS


def test_the_existing_flags_still_work() -> None:
    args = daemon.build_parser().parse_args(
        ["-c", "r.toml", "-s", "/s", "-l", "debug", "-u", "mc", "-g", "mcg", "--no-watch", "-t"]
    )
    assert args.check is True
    assert given_on_command_line(args) == {
        "config": "r.toml",
        "control_socket": "/s",
        "log_level": "debug",
        "user": "mc",
        "group": "mcg",
        "watch": False,
    }
    long = daemon.build_parser().parse_args(
        ["--config", "r", "--control-socket", "/s", "--log-level", "info", "--user", "u", "--group", "g"]
    )
    assert given_on_command_line(long)["control_socket"] == "/s"
    assert given_on_command_line(daemon.build_parser().parse_args([])) == {}
    with pytest.raises(SystemExit):
        daemon.build_parser().parse_args(["-l", "loud"])


def test_new_flags_for_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    args = daemon.build_parser().parse_args(
        ["--workers", "3", "--ring-size", "64", "--offload", "auto", "--max-rules", "7", "--watch"]
    )
    cli = given_on_command_line(args)
    monkeypatch.setenv("MCRD_RING_SIZE", "128")
    settings = DaemonSettings.resolve(cli, DaemonOptions.model_validate({"max_rules": 9}))
    assert (settings.workers, settings.ring_size, settings.offload) == (3, 64, "auto")
    assert (settings.max_rules, settings.watch) == (7, True)


def test_the_rule_file_comes_from_the_flag_then_mcrd_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCRD_CONFIG", raising=False)
    assert rule_file_path(None) == Path("/etc/mcr.toml")
    monkeypatch.setenv("MCRD_CONFIG", "/from/env.toml")
    assert rule_file_path(None) == Path("/from/env.toml")
    assert rule_file_path("flag.toml") == Path("flag.toml")
    monkeypatch.setenv("MCRD_CONFIG", "")
    assert rule_file_path(None) == Path("/etc/mcr.toml")


def test_a_bad_value_names_the_flag_or_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "ok.toml"
    rules.write_text("")
    assert daemon.main(["--check", "-c", str(rules), "--ring-size", "2"]) == daemon.EX_CONFIG
    assert capsys.readouterr().err.startswith("mcrd: --ring-size: Input should be greater than or equal to 4")
    monkeypatch.setenv("MCRD_RING_SIZE", "2")
    assert daemon.main(["--check", "-c", str(rules)]) == daemon.EX_CONFIG
    assert capsys.readouterr().err.startswith("mcrd: MCRD_RING_SIZE: ")
    assert source_of("ring_size", {}) == "MCRD_RING_SIZE" and source_of("ring_size", {"ring_size": 1}) == (
        "--ring-size"
    )


def _settings(**values: object) -> DaemonSettings:
    return DaemonSettings.resolve({}, DaemonOptions.model_validate(values))


@pytest.mark.parametrize(
    ("running", "last", "new", "expected"),
    [
        ({}, {}, {}, SettingsChange()),
        ({}, {}, {"log_level": "debug"}, SettingsChange(live=("log_level",))),
        (
            {},
            {},
            {"workers": 4, "ring_size": 128},
            SettingsChange((), ("workers", "ring_size"), ("workers", "ring_size")),
        ),
        # changed in an earlier reload: still waiting for a restart, but not changed now
        ({}, {"workers": 4}, {"workers": 4}, SettingsChange((), (), ("workers",))),
        # changed back: nothing waits any more
        ({}, {"workers": 4}, {}, SettingsChange((), ("workers",), ())),
        (
            {},
            {},
            {"max_rules": 5, "watch": False, "offload": "auto"},
            SettingsChange(("watch", "max_rules"), ("offload",), ("offload",)),
        ),
    ],
)
def test_what_a_reload_changes_is_classified(
    running: dict[str, object], last: dict[str, object], new: dict[str, object], expected: SettingsChange
) -> None:
    assert compare_settings(_settings(**running), _settings(**last), _settings(**new)) == expected


def test_flags_and_variables_hide_the_files_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCRD_WORKERS", "2")
    cli = {"log_level": "debug"}
    before = DaemonSettings.resolve(cli, DaemonOptions())
    after = DaemonSettings.resolve(cli, DaemonOptions.model_validate({"workers": 4, "log_level": "error"}))
    assert compare_settings(before, before, after) == SettingsChange()


def test_only_live_keys_take_effect_on_reload() -> None:
    running = _settings()
    now = take_live(running, _settings(log_level="error", workers=4, max_rules=5))
    assert (now.log_level, now.max_rules, now.workers) == ("error", 5, "auto")


def test_help_lists_every_flag() -> None:
    text = daemon.build_parser().format_help()
    for d in DEFINITIONS.values():
        assert d.flag in text and d.env in text, d.name
    assert "--no-watch" in text and "restart-only" in text and "live" in text
    assert isinstance(daemon.build_parser(), argparse.ArgumentParser)
