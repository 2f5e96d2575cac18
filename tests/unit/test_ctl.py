"""mcrctl's command line, request mapping and output: pure, no daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mcrd import ctl
from mcrd.control.protocol import ControlError
from mcrd.ctl import UsageError, build_parser, parse_outputs, request_for


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("239.2.2.2:6000:eth1", [{"group": "239.2.2.2", "port": 6000, "interface": "eth1"}]),
        (
            "239.2.2.2:6000:eth1,198.51.100.7:7000",
            [
                {"group": "239.2.2.2", "port": 6000, "interface": "eth1"},
                {"group": "198.51.100.7", "port": 7000},
            ],
        ),
        ("239.2.2.2:6000:eth1:8", [{"group": "239.2.2.2", "port": 6000, "interface": "eth1", "ttl": 8}]),
        ("198.51.100.7:7000::8", [{"group": "198.51.100.7", "port": 7000, "ttl": 8}]),
    ],
)
def test_parse_outputs(text: str, expected: list[dict[str, Any]]) -> None:
    assert parse_outputs(text) == expected


@pytest.mark.parametrize(
    "text", ["239.2.2.2", ":6000:eth1", "239.2.2.2:http:eth1", "a:1:b:c:d", "239.2.2.2:1:e:x"]
)
def test_parse_outputs_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_outputs(text)


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (
            [
                "add",
                "--input-interface",
                "eth0",
                "--input-group",
                "239.1.1.1",
                "--input-port",
                "5000",
                "--outputs",
                "239.2.2.2:6000:eth1",
                "--name",
                "cam",
                "--source",
                "192.0.2.9",
                "--rate-pps",
                "10",
            ],
            (
                "add",
                {
                    "rule": {
                        "input": {
                            "interface": "eth0",
                            "group": "239.1.1.1",
                            "port": 5000,
                            "source": "192.0.2.9",
                        },
                        "outputs": [{"group": "239.2.2.2", "port": 6000, "interface": "eth1"}],
                        "name": "cam",
                        "rate_limit": {"pps": 10},
                    }
                },
            ),
        ),
        (["remove", "--name", "cam"], ("remove", {"name": "cam"})),
        (["remove", "--rule-id", "abcd1234"], ("remove", {"id": "abcd1234"})),
        (["remove", "--id", "abcd1234"], ("remove", {"id": "abcd1234"})),
        (["config", "show"], ("config.show", {})),
        (["config", "save"], ("config.save", {})),
        (["log-level", "get"], ("log-level.get", {})),
        (["log-level", "set", "debug"], ("log-level.set", {"level": "debug"})),
        (["stats", "--json"], ("stats", {})),
    ],
)
def test_command_lines_become_requests(argv: list[str], wanted: tuple[str, dict[str, Any]]) -> None:
    assert request_for(build_parser().parse_args(argv)) == wanted


def test_global_options_go_before_or_after_the_command() -> None:
    for argv in (["--json", "--socket", "/s", "stats"], ["stats", "--json", "--socket", "/s"]):
        args = build_parser().parse_args(argv)
        assert args.json is True and args.socket == Path("/s")


def test_config_check_reads_the_file(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text("x = 1\n")
    args = build_parser().parse_args(["config", "check", str(tmp_path / "f.toml")])
    assert request_for(args) == ("config.check", {"text": "x = 1\n", "path": str(tmp_path / "f.toml")})
    with pytest.raises(UsageError, match="cannot read"):
        request_for(build_parser().parse_args(["config", "check", str(tmp_path / "none.toml")]))


def _answering(monkeypatch: pytest.MonkeyPatch, reply: Any) -> None:
    def fake_call(path: Path, command: str, args: Any = None, timeout: float = 5.0) -> Any:
        if isinstance(reply, Exception):
            raise reply
        return reply

    monkeypatch.setattr(ctl, "call", fake_call)


def test_a_malformed_reply_is_not_reported_as_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _answering(monkeypatch, ControlError("bad-reply", "the reply is not valid JSON: boom"))
    assert ctl.main(["--socket", "/s", "ping"]) == ctl.EX_ERROR
    assert capsys.readouterr().err == (
        "mcrctl: ping: malformed reply from mcrd at /s: the reply is not valid JSON: boom\n"
    )


def test_a_reply_the_formatter_cannot_show_is_an_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _answering(monkeypatch, {"unexpected": True})
    assert ctl.main(["--socket", "/s", "status"]) == ctl.EX_ERROR
    err = capsys.readouterr().err
    assert err.startswith("mcrctl: status: unexpected reply from mcrd (KeyError: ") and "--json" in err
    _answering(monkeypatch, {"unexpected": True})
    assert ctl.main(["--socket", "/s", "--json", "status"]) == ctl.EX_OK


def test_reload_and_status_say_what_waits_for_a_restart() -> None:
    applied = {
        "result": "applied",
        "rules": 3,
        "added": ["cam"],
        "removed": [],
        "changed": [],
        "settings": ["log_level"],
        "restart_needed": ["workers", "ring_size"],
        "errors": [],
    }
    assert ctl.show_reload(applied).splitlines() == [
        "applied (3 rule(s))",
        "  added: cam",
        "  settings: log_level",
        "  restart needed for: workers, ring_size (mcrd still runs with the old values)",
    ]
    unchanged = {"result": "unchanged", "rules": 3, "restart_needed": []}
    assert ctl.show_reload(unchanged) == "unchanged (3 rule(s))"
    # an older mcrd sends neither field
    old = {"result": "applied", "rules": 1, "added": [], "removed": ["x"], "changed": [], "errors": []}
    assert ctl.show_reload(old) == "applied (1 rule(s))\n  removed: x"
    status = {
        "version": "0.1.0",
        "pid": 7,
        "config": "/etc/mcr.toml",
        "config_missing": False,
        "rules": 1,
        "active": 1,
        "pending": 0,
        "workers": [],
        "last_reload": None,
        "restart_needed": ["workers"],
    }
    assert ctl.show_status(status).splitlines()[-1] == "restart: needed for workers"
