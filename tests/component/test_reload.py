"""The reload funnel with real asyncio: the Reloader against a fake target,
and against the real Service with a fake supervisor (settings that need a
restart, a runtime rule racing a file reload)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mcrd.commands import Commands
from mcrd.config import LoadedConfig, load_config
from mcrd.control.protocol import ControlError
from mcrd.control.server import Access, ControlServer, Limits
from mcrd.links import Link
from mcrd.notify import Systemd
from mcrd.reload import Outcome, Reloader
from mcrd.rulebook import RuleBook
from mcrd.rules import RuleSpec
from mcrd.service import Service
from mcrd.settings import DaemonSettings, SettingsChange
from tests.helpers.rulesets import A_CHANGED, A, B, rules


class FakeTarget:
    """Runs whatever it is given, once `gate` opens."""

    def __init__(self, running: list[RuleSpec]) -> None:
        self.rules = running
        self.applied: list[list[str]] = []
        self.gate = asyncio.Event()

    def running(self) -> Sequence[RuleSpec]:
        return self.rules

    def check(self, loaded: LoadedConfig) -> SettingsChange:
        return SettingsChange()

    async def apply(self, loaded: LoadedConfig) -> None:
        await self.gate.wait()
        self.applied.append([r.display_name() for r in loaded.rules])
        self.rules[:] = loaded.rules

    def reloading(self) -> None:
        pass

    def reloaded(self, outcome: Outcome) -> None:
        pass


def test_reloads_coalesce_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mcr.toml"
    path.write_text(A)
    target = FakeTarget(rules(A))
    running, applied, gate = target.rules, target.applied, target.gate

    async def scenario() -> None:
        reloader = Reloader(path, target, loaded=LoadedConfig(path, running))
        task = asyncio.create_task(reloader.run())
        assert (await reloader.request("first")).result == "unchanged"
        path.write_text(A + B)
        first = reloader.request("one")
        await asyncio.sleep(0)  # the reload is now waiting in apply
        second = reloader.request("two")
        third = reloader.request("three")
        assert second is third  # queued requests join one reload
        path.write_text(A_CHANGED + B)
        gate.set()
        assert (await first).added == ["b"]
        outcome = await second
        assert outcome.triggers == ["two", "three"] and outcome.changed == ["a"]
        path.write_text("not toml [[")
        bad = await reloader.request("bad")
        assert bad.result == "rejected" and bad.errors[0].startswith(f"{path}:1:")
        assert [r.display_name() for r in running] == ["a", "b"]
        path.unlink()
        gone = await reloader.request("gone")
        assert gone.result == "applied" and gone.removed == ["a", "b"] and running == []
        assert reloader.count == 5
        task.cancel()

    asyncio.run(scenario())
    assert applied == [["a", "b"], ["a", "b"], []]


class FakeSupervisor:
    """Takes rule sets as they come; `gate` holds an apply half-way."""

    def __init__(self) -> None:
        self.rules: list[RuleSpec] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def apply(self, rules: list[RuleSpec]) -> None:
        self.entered.set()
        await self.gate.wait()
        self.rules = rules

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def observe_links(self, snapshot: dict[str, Link]) -> None:
        pass

    def rule_views(self, origin: Callable[[RuleSpec], str]) -> list[dict[str, Any]]:
        return [{"key": str(r.key), "name": r.name, "origin": origin(r)} for r in self.rules]

    def stats_view(self) -> dict[str, Any]:
        return {"rules": [], "interfaces": []}

    def worker_views(self) -> list[dict[str, Any]]:
        return []

    def counts(self) -> tuple[int, int]:
        return len(self.rules), 0

    async def sample_all(self) -> None:
        pass

    def workers_healthy(self) -> bool:
        return True


class RecordingSystemd(Systemd):
    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []

    def ready(self, status: str) -> None:
        self.statuses.append(status)


@pytest.fixture
def root_level() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def _service(path: Path, supervisor: FakeSupervisor) -> tuple[Service, RecordingSystemd]:
    loaded = load_config(path)
    cli: dict[str, Any] = {"watch": False, "config": path}
    settings = DaemonSettings.resolve(cli, loaded.daemon)
    book = RuleBook(tuple(loaded.rules), max_rules=settings.max_rules)
    supervisor.rules = book.combined()
    systemd = RecordingSystemd()
    return Service(settings, cli, loaded, book, Access(own_uid=0), supervisor, systemd), systemd


def test_restart_only_settings_are_reported_not_claimed(tmp_path: Path, root_level: None) -> None:
    path = tmp_path / "mcr.toml"
    path.write_text(A)

    async def scenario() -> None:
        service, systemd = _service(path, FakeSupervisor())
        task = asyncio.create_task(service.reloader.run())
        path.write_text('[daemon]\nworkers = 4\nring_size = 128\nlog_level = "error"\n' + A)
        outcome = await service.reloader.request("test")
        assert outcome.result == "applied"
        assert outcome.settings == ["log_level"] and outcome.restart_needed == ["workers", "ring_size"]
        assert outcome.describe() == "applied: settings log_level; restart needed for: workers, ring_size"
        assert outcome.as_dict()["restart_needed"] == ["workers", "ring_size"]
        assert logging.getLogger().level == logging.ERROR
        assert (service.settings.workers, service.settings.ring_size) == ("auto", 64)
        assert systemd.statuses[-1] == "1 rule(s) active, 0 pending; restart needed for: workers, ring_size"
        # a rule change later: the restart is still owed, and still said
        path.write_text('[daemon]\nworkers = 4\nring_size = 128\nlog_level = "error"\n' + A + B)
        later = await service.reloader.request("test")
        assert later.describe() == "applied: added b; restart needed for: workers, ring_size"
        status = await Commands(service).status({})
        assert status["restart_needed"] == ["workers", "ring_size"]
        # the file goes back to what runs: nothing is owed any more
        path.write_text(A + B)
        back = await service.reloader.request("test")
        assert (
            back.result == "applied"
            and back.restart_needed == []
            and back.settings
            == [
                "log_level",
                "workers",
                "ring_size",
            ]
        )
        assert systemd.statuses[-1] == "2 rule(s) active, 0 pending"
        assert (await service.reloader.request("test")).describe() == "unchanged"
        task.cancel()

    asyncio.run(scenario())


def test_live_limits_apply_on_reload(tmp_path: Path, root_level: None) -> None:
    path = tmp_path / "mcr.toml"
    path.write_text(A)

    async def scenario() -> None:
        service, _ = _service(path, FakeSupervisor())
        task = asyncio.create_task(service.reloader.run())
        path.write_text("[daemon]\nmax_rules = 1\n" + A + B)
        over = await service.reloader.request("test")
        assert over.result == "rejected"
        assert over.errors == [f"{path}: 2 rules exceed the limit of 1 (max_rules)"]
        assert service.book.max_rules == 1000 and [r.name for r in service.book.file] == ["a"]
        service.server = ControlServer(tmp_path / "c.sock", {}, Access(own_uid=0))  # not started
        path.write_text("[daemon]\nmax_rules = 2\nmax_clients = 3\nclient_timeout = 0.5\n" + A + B)
        fits = await service.reloader.request("test")
        assert fits.result == "applied" and fits.settings == ["max_rules", "max_clients", "client_timeout"]
        assert service.book.max_rules == 2 and service.settings.max_rules == 2
        assert service.server.limits == Limits(max_clients=3, client_timeout=0.5)
        task.cancel()

    asyncio.run(scenario())


def test_a_runtime_rule_racing_a_file_reload_is_a_clean_rejection(tmp_path: Path) -> None:
    path = tmp_path / "mcr.toml"
    path.write_text(A)
    (x,) = rules(B.replace('name = "b"', 'name = "x"'))
    (z,) = rules(B.replace('name = "b"', 'name = "z"').replace("239.1.1.2", "239.1.1.3"))

    def as_args(spec: RuleSpec) -> dict[str, Any]:
        return {"rule": spec.model_dump(mode="json", exclude_none=True)}

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def scenario() -> None:
        supervisor = FakeSupervisor()
        service, _ = _service(path, supervisor)
        commands = Commands(service)
        task = asyncio.create_task(service.reloader.run())
        supervisor.gate.clear()
        supervisor.entered.clear()
        # a first change holds the lock half-way; runtime rule x queues behind it ...
        adding_z = asyncio.create_task(commands.add(as_args(z)))
        await supervisor.entered.wait()
        adding_x = asyncio.create_task(commands.add(as_args(x)))
        await settle()
        # ... and then the file gains rule b, with x's input: the reload parses it
        # while x is not yet in the book, and queues behind x
        path.write_text(A + B)
        reloading = service.reloader.request("file changed")
        await settle()
        assert not reloading.done()
        supervisor.gate.set()
        assert (await adding_z)["name"] == "z" and (await adding_x)["name"] == "x"
        outcome = await reloading
        assert outcome.result == "rejected", outcome
        assert outcome.errors == [
            f"{path}: rule 2 ('b'): input e0 239.1.1.2:1 is already used by runtime rule 'x'"
        ]
        assert [r.name for r in service.book.file] == ["a"]
        assert [r.name for r in service.book.runtime] == ["z", "x"]
        assert [r.name for r in supervisor.rules] == ["a", "z", "x"]
        # and the other way round: the control socket answers `invalid`
        (clash,) = rules(A.replace('name = "a"', 'name = "y"'))
        with pytest.raises(ControlError) as info:
            await commands.add(as_args(clash))
        assert info.value.code == "invalid" and "already used by rule 1 ('a')" in info.value.message
        task.cancel()

    asyncio.run(scenario())


def test_command_arguments_are_checked_by_their_models(tmp_path: Path) -> None:
    path = tmp_path / "mcr.toml"
    path.write_text(A)

    async def scenario() -> None:
        service, _ = _service(path, FakeSupervisor())
        commands = Commands(service)
        cases: list[tuple[Callable[[dict[str, Any]], Awaitable[Any]], dict[str, Any], str]] = [
            (commands.add, {"rule": []}, "'rule' must be an object"),
            (commands.add, {}, "'rule' must be an object"),
            (commands.remove, {}, "give exactly one of 'name' and 'id' as a string"),
            (commands.remove, {"name": "a", "id": "b"}, "give exactly one of 'name' and 'id' as a string"),
            (commands.remove, {"name": 3}, "give exactly one of 'name' and 'id' as a string"),
            (commands.config_check, {"text": 1}, "'text' and 'path' must be strings"),
            (commands.log_level_set, {"level": "loud"}, "level must be one of debug, info, warning, error"),
        ]
        for handler, args, message in cases:
            with pytest.raises(ControlError) as info:
                await handler(args)
            assert (info.value.code, info.value.message) == ("bad-request", message)
        with pytest.raises(ControlError) as info:
            await commands.remove({"name": "a"})
        assert info.value.code == "file-rule"
        assert (await commands.version({}))["protocol"] == 1
        check = await commands.config_check({"text": A + A.replace('name = "a"', 'name = "c"')})
        assert check["valid"] is False and check["errors"][0].startswith("<request>:")

    asyncio.run(scenario())


def test_watch_is_live_and_a_watched_reload_may_stop_its_own_watcher(tmp_path: Path) -> None:
    path = tmp_path / "mcr.toml"
    path.write_text("[daemon]\nwatch = false\n" + A)

    async def scenario() -> None:
        supervisor = FakeSupervisor()
        loaded = load_config(path)
        cli: dict[str, Any] = {"config": path}
        settings = DaemonSettings.resolve(cli, loaded.daemon)
        book = RuleBook(tuple(loaded.rules))
        service = Service(settings, cli, loaded, book, Access(own_uid=0), supervisor, RecordingSystemd())
        task = asyncio.create_task(service.reloader.run())
        path.write_text("[daemon]\nwatch = true\n" + A)
        assert (await service.reloader.request("test")).settings == ["watch"]
        assert service.watching and service.settings.watch
        await asyncio.sleep(0.2)  # let the watcher start watching the directory
        # the watcher now reloads by itself, and this reload turns it off
        count = service.reloader.count
        path.write_text("[daemon]\nwatch = false\n" + A + B)
        async with asyncio.timeout(10):
            while service.reloader.count == count:
                await asyncio.sleep(0.05)
        last = service.reloader.last
        assert last is not None and last.triggers == ["file changed"] and last.added == ["b"]
        assert not service.watching and not service.settings.watch
        task.cancel()

    asyncio.run(scenario())
