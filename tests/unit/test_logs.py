"""structlog JSON lines, Twisted's log routed through them, and twistd picking them up."""

from __future__ import annotations

import io
import threading
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from twisted.application.service import Application, IServiceCollection
from twisted.logger import ILogObserver, LogLevel, LogPublisher, Logger, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.logfile import LogFile

from twisted_mail_cluster.logs import (
    LineWriter,
    LoggingMultiService,
    TwistedToStructlogObserver,
    configure_structlog,
    drop_secrets,
    is_secret_key,
    log_destination,
)

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    """configure_structlog is process-wide: give every test a clean slate."""
    yield
    structlog.reset_defaults()


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n") or text == ""
    return [json.loads(line) for line in text.splitlines()]


def without_timestamp(entry: dict[str, Any]) -> dict[str, Any]:
    assert ISO_UTC.match(entry["timestamp"]), entry["timestamp"]
    return {k: v for k, v in entry.items() if k != "timestamp"}


# ---------------------------------------------------------------------------
# structlog


def test_one_json_object_per_line() -> None:
    stream = io.StringIO()
    configure_structlog(stream, "info")
    log = structlog.get_logger()
    log.info("delivered", recipient="alice@example.test", size=1234)
    log.warning("slow", seconds=2.5)
    assert [without_timestamp(e) for e in lines_of(stream)] == [
        {"event": "delivered", "recipient": "alice@example.test", "size": 1234, "level": "info"},
        {"event": "slow", "seconds": 2.5, "level": "warning"},
    ]


def test_level_filters_lower_events() -> None:
    stream = io.StringIO()
    configure_structlog(stream, "warning")
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [e["event"] for e in lines_of(stream)] == ["w", "e"]


def test_exception_is_rendered_as_a_traceback_string() -> None:
    stream = io.StringIO()
    configure_structlog(stream, "info")
    try:
        1 / 0
    except ZeroDivisionError:
        structlog.get_logger().exception("failed")
    [entry] = lines_of(stream)
    assert entry["level"] == "error"
    assert entry["exception"].startswith("Traceback (most recent call last):\n")
    assert entry["exception"].endswith("ZeroDivisionError: division by zero")


def test_a_module_level_logger_follows_a_later_configuration() -> None:
    """twistd configures logging after modules have made their loggers."""
    log = structlog.get_logger()
    first, second = io.StringIO(), io.StringIO()
    configure_structlog(first, "info")
    log.info("one")
    configure_structlog(second, "info")
    log.info("two")
    assert [e["event"] for e in lines_of(first)] == ["one"]
    assert [e["event"] for e in lines_of(second)] == ["two"]


def test_secret_keys_are_dropped() -> None:
    stream = io.StringIO()
    configure_structlog(stream, "info")
    structlog.get_logger().info(
        "login",
        user="alice",
        password="hunter2",
        Password="hunter2",
        user_password="hunter2",
        passwd="hunter2",
        **{"pass": "hunter2", "X-Auth-Token": "hunter2", "Authorization": "Basic aHVudGVyMg=="},
        secret="hunter2",
        client_secret="hunter2",
        token="hunter2",
        saslResponse="hunter2",
        response="hunter2",
        passwords=["hunter2"],
        command={"name": "AUTH", "password": "hunter2", "args": [{"token": "hunter2", "n": 1}]},
        bypass=True,
        compass="north",
        passage=3,
    )
    [entry] = lines_of(stream)
    assert without_timestamp(entry) == {
        "event": "login",
        "user": "alice",
        "command": {"name": "AUTH", "args": [{"n": 1}]},
        "bypass": True,
        "compass": "north",
        "passage": 3,
        "level": "info",
    }
    assert "hunter2" not in stream.getvalue()
    assert "aHVudGVyMg" not in stream.getvalue()


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("PASSWORD", True),
        ("pass", True),
        ("old_pass", True),
        ("userpassword", True),
        ("api-token", True),
        ("refreshTokens", True),
        ("proxy-authorization", True),
        ("sasl_response", True),
        ("responses", True),
        ("secrets", True),
        ("user", False),
        ("bypass", False),
        ("passage", False),
        ("reply", False),
        ("mailbox", False),
        ("event", False),
        (3, False),
    ],
)
def test_is_secret_key(key: object, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_drop_secrets_leaves_the_event_text_alone() -> None:
    assert drop_secrets(None, "info", {"event": "password changed", "token": "t", "user": "a"}) == {
        "event": "password changed",
        "user": "a",
    }


# ---------------------------------------------------------------------------
# Twisted -> structlog


def observed(level: str = "debug") -> tuple[io.StringIO, Logger]:
    stream = io.StringIO()
    configure_structlog(stream, level)
    publisher = LogPublisher(TwistedToStructlogObserver())
    return stream, Logger(namespace="mailcluster.test", observer=publisher)


def test_twisted_events_are_forwarded_with_level_and_namespace() -> None:
    stream, log = observed()
    log.debug("d {n}", n=1)
    log.info("hello {who}", who="world")
    log.warn("careful")
    log.error("bad")
    log.critical("worse")
    assert [without_timestamp(e) for e in lines_of(stream)] == [
        {"event": "d 1", "namespace": "mailcluster.test", "level": "debug"},
        {"event": "hello world", "namespace": "mailcluster.test", "level": "info"},
        {"event": "careful", "namespace": "mailcluster.test", "level": "warning"},
        {"event": "bad", "namespace": "mailcluster.test", "level": "error"},
        {"event": "worse", "namespace": "mailcluster.test", "level": "critical"},
    ]


def test_twisted_events_below_the_level_are_dropped() -> None:
    stream, log = observed("error")
    log.info("quiet")
    log.error("loud")
    assert [e["event"] for e in lines_of(stream)] == ["loud"]


def test_twisted_failure_carries_its_traceback() -> None:
    stream, log = observed()
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("while dividing {what}", what="things")
    [entry] = lines_of(stream)
    assert entry["event"] == "while dividing things"
    assert entry["level"] == "critical"
    assert entry["exception"].startswith("Traceback (most recent call last):\n")
    assert "test_twisted_failure_carries_its_traceback" in entry["exception"]
    assert entry["exception"].rstrip().endswith("ZeroDivisionError: division by zero")


def test_twisted_event_fields_are_not_forwarded() -> None:
    """Only the text, level, namespace, system and traceback cross: a stray password does not."""
    stream, log = observed()
    log.info("login for {user}", user="alice", password="hunter2")
    [entry] = lines_of(stream)
    assert without_timestamp(entry) == {"event": "login for alice", "namespace": "mailcluster.test", "level": "info"}


def test_legacy_log_events_keep_their_system() -> None:
    stream = io.StringIO()
    configure_structlog(stream, "info")
    observer = TwistedToStructlogObserver()
    publisher = LogPublisher(observer)
    legacy = legacy_log.LogPublisher(publisher, publisher)
    legacy.msg("legacy hello", system="SMTP,3,127.0.0.1")
    [entry] = lines_of(stream)
    assert without_timestamp(entry) == {
        "event": "legacy hello",
        "namespace": "log_legacy",
        "system": "SMTP,3,127.0.0.1",
        "level": "info",
    }


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({}, {"event": "", "namespace": "twisted", "level": "info"}),
        ({"log_format": "{missing}"}, None),
        ({"log_level": "nonsense", "log_namespace": 42}, {"event": "", "namespace": "42", "level": "info"}),
        (
            {"log_failure": "not a failure"},
            {"event": "", "namespace": "twisted", "level": "info", "exception": "'not a failure'"},
        ),
        (
            {"log_format": "{x!r}", "x": b"\xff", "log_system": "-"},
            {"event": "b'\\xff'", "namespace": "twisted", "level": "info"},
        ),
    ],
)
def test_odd_events_do_not_crash(event: dict[str, Any], expected: dict[str, Any] | None) -> None:
    stream = io.StringIO()
    configure_structlog(stream, "debug")
    TwistedToStructlogObserver()(event)
    [entry] = lines_of(stream)
    if expected is None:
        assert entry["event"].startswith("Unable to format event")
    else:
        assert without_timestamp(entry) == expected


def test_an_observer_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    configure_structlog(stream, "info")

    def broken_text(event: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr("twisted_mail_cluster.logs._text", broken_text)
    TwistedToStructlogObserver()({"log_format": "x", "log_level": LogLevel.info})
    [entry] = lines_of(stream)
    assert entry["event"] == "a Twisted log event could not be forwarded"
    assert entry["level"] == "error"


class EchoingStream(io.StringIO):
    """A stream whose writes turn into Twisted log events, like twistd's redirected stdout."""

    def __init__(self, log: Logger) -> None:
        super().__init__()
        self.log = log
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        self.log.info("echo of a write: {text}", text=text)
        return super().write(text)


def test_echoes_of_our_own_output_do_not_loop() -> None:
    observer = TwistedToStructlogObserver()
    log = Logger(namespace="echo", observer=LogPublisher(observer))
    stream = EchoingStream(log)
    configure_structlog(stream, "info")
    log.info("original")
    assert stream.writes == 1
    assert [e["event"] for e in lines_of(stream)] == ["original"]


def test_structlog_routed_into_twisted_does_not_loop() -> None:
    """The other loop: structlog -> Twisted -> observer -> structlog -> ..."""
    from twisted_mail_cluster.logs import configure_structlog_to_twisted

    stream = io.StringIO()
    observer = TwistedToStructlogObserver()
    received: list[dict[str, Any]] = []

    def tee(event: dict[str, Any]) -> None:
        received.append(event)
        observer(event)

    globalLogPublisher.addObserver(tee)
    try:
        configure_structlog_to_twisted("info")
        structlog.get_logger().info("around and around", mailbox="INBOX")
    finally:
        globalLogPublisher.removeObserver(tee)
    # The event, then the observer's one echo of it, which it recognises and drops.
    assert [e["event_text"] for e in received] == ["around and around", "around and around"]
    assert received[0]["mailbox"] == "INBOX"
    assert received[0]["log_level"] == LogLevel.info
    assert received[1]["namespace"] == "twisted_mail_cluster"
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------------
# twistd integration: where the lines go


@pytest.mark.parametrize(
    ("options", "destination"),
    [
        ({"nodaemon": True, "logfile": None, "logger": None}, "-"),
        ({"nodaemon": True, "logfile": "-", "logger": None}, "-"),
        ({"nodaemon": True, "logfile": "/var/log/mc.log", "logger": None}, "/var/log/mc.log"),
        ({"nodaemon": False, "logfile": None, "logger": None}, "twistd.log"),
        ({"nodaemon": False, "logfile": "/var/log/mc.log", "logger": None}, "/var/log/mc.log"),
        ({"nodaemon": False, "logfile": "-", "logger": None}, None),
        ({"nodaemon": True, "logfile": None, "logger": object()}, None),
        ({"nodaemon": True, "logfile": None, "logger": None, "syslog": True}, None),
    ],
)
def test_log_destination_follows_twistd(options: dict[str, Any], destination: str | None) -> None:
    assert log_destination(options) == destination


def test_the_observer_becomes_the_application_component(capsys: pytest.CaptureFixture[str]) -> None:
    application = Application("test")
    service = LoggingMultiService({"nodaemon": True, "logfile": None, "logger": None}, "info")
    service.setServiceParent(application)
    assert isinstance(service.observer, TwistedToStructlogObserver)
    assert application.getComponent(ILogObserver) is service.observer
    assert service in list(IServiceCollection(application))
    service.observer({"log_format": "via twisted", "log_level": LogLevel.info, "log_namespace": "t"})
    structlog.get_logger().info("via structlog")
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e["level"]) for e in out] == [("via twisted", "info"), ("via structlog", "info")]


def test_logfile_option_writes_json_to_that_file(tmp_path: Path) -> None:
    application = Application("test")
    path = tmp_path / "logs" / "mc.log"
    path.parent.mkdir()
    service = LoggingMultiService(
        {"nodaemon": False, "logfile": str(path), "logger": None}, "info", rotate_on_sigusr1=False
    )
    service.setServiceParent(application)
    assert isinstance(service.log_stream, LogFile)
    observer = application.getComponent(ILogObserver)
    observer({"log_format": "to the file", "log_level": LogLevel.warn, "log_namespace": "t"})
    [entry] = [json.loads(line) for line in path.read_text().splitlines()]
    assert (entry["event"], entry["level"], entry["namespace"]) == ("to the file", "warning", "t")


def test_a_logger_option_leaves_twistd_alone() -> None:
    application = Application("test")
    service = LoggingMultiService({"nodaemon": True, "logfile": None, "logger": lambda: None}, "info")
    service.setServiceParent(application)
    assert service.observer is None
    assert application.getComponent(ILogObserver) is None


def test_an_existing_observer_is_kept_and_structlog_follows_it() -> None:
    application = Application("test")
    theirs: list[dict[str, Any]] = []
    application.setComponent(ILogObserver, theirs.append)
    service = LoggingMultiService({"nodaemon": True, "logfile": None, "logger": None}, "info")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver) == theirs.append
    assert service.observer is None
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        structlog.get_logger().info("to their observer")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert [e["event_text"] for e in seen] == ["to their observer"]


def test_without_twistd_options_nothing_changes() -> None:
    before = structlog.get_config()
    application = Application("test")
    LoggingMultiService(None).setServiceParent(application)
    assert application.getComponent(ILogObserver) is None
    assert structlog.get_config() == before


# ---------------------------------------------------------------------------
# The real twistd, with a stand-in plugin


LOG_PLUGIN = '''
import sys
import structlog
from twisted.application.service import IServiceMaker, Service
from twisted.logger import Logger, textFileLogObserver
from twisted.plugin import IPlugin
from zope.interface import implementer
from twisted_mail_cluster.logs import LoggingMultiService
from twisted_mail_cluster.options import MailClusterOptions


class _Probe(Service):
    def startService(self):
        from twisted.internet import reactor
        Service.startService(self)
        structlog.get_logger().info("probe started", user="alice", password="hunter2")
        try:
            1 / 0
        except ZeroDivisionError:
            Logger(namespace="probe").failure("probe failure")
        print("printed by the probe")
        reactor.callLater(0, reactor.stop)


@implementer(IServiceMaker, IPlugin)
class _Maker:
    tapname = "mailcluster-logtest"
    description = "logging test double of the mailcluster plugin"
    options = MailClusterOptions

    def makeService(self, options):
        top = LoggingMultiService(options.parent, options.config.log.level)
        structlog.get_logger().info("service made")
        _Probe().setServiceParent(top)
        return top


maker = _Maker()


def text_observer():
    return textFileLogObserver(sys.stdout)
'''


def run_twistd(tmp_path: Path, *twistd_args: str) -> subprocess.CompletedProcess[str]:
    plugins = tmp_path / "pluginpath" / "twisted" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "mailcluster_logtest.py").write_text(LOG_PLUGIN)
    twistd = Path(sys.executable).with_name("twistd")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pluginpath")}
    return subprocess.run(
        [str(twistd), *twistd_args, "mailcluster-logtest", "--no-smtp", "--no-pop3", "--no-imap"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_twistd_json(lines: list[str]) -> None:
    """Everything twistd logged, from its very first line, is our JSON."""
    entries = [json.loads(line) for line in lines]
    events = [e["event"] for e in entries]
    # structlog is configured in makeService, before twistd starts logging...
    assert events[0] == "service made"
    # ...and twistd's own first lines (AppLogger._initialLog) came through the component.
    assert re.match(r"^twistd \S+ \(.+\) starting up\.$", events[1]), events[1]
    assert entries[1]["namespace"] == "twisted.scripts._twistd_unix.UnixAppLogger"
    assert events[2].startswith("reactor class: ")
    probe = next(e for e in entries if e["event"] == "probe started")
    assert probe["user"] == "alice" and "password" not in probe
    failure = next(e for e in entries if e["event"] == "probe failure")
    assert failure["namespace"] == "probe" and failure["level"] == "critical"
    assert failure["exception"].rstrip().endswith("ZeroDivisionError: division by zero")
    printed = next(e for e in entries if e["event"] == "printed by the probe")
    assert printed["namespace"] == "stdout"
    assert events[-1] == "Server Shut Down."
    assert all(ISO_UTC.match(e["timestamp"]) for e in entries)
    assert "hunter2" not in "\n".join(lines)


def test_twistd_nodaemon_logs_json_to_stdout(tmp_path: Path) -> None:
    result = run_twistd(tmp_path, "-n", "--pidfile=")
    assert result.returncode == 0, result.stderr
    check_twistd_json(result.stdout.splitlines())
    assert not (tmp_path / "twistd.log").exists()


def test_twistd_logfile_gets_the_json(tmp_path: Path) -> None:
    result = run_twistd(tmp_path, "-n", "--pidfile=", "--logfile", "mc.log")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    check_twistd_json((tmp_path / "mc.log").read_text().splitlines())


def test_twistd_logger_option_is_respected(tmp_path: Path) -> None:
    result = run_twistd(tmp_path, "-n", "--pidfile=", "--logger", "twisted.plugins.mailcluster_logtest.text_observer")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Twisted's text format, not ours; structlog's events went through it too.
    assert lines[0].endswith(" [twisted_mail_cluster#info] service made")
    assert re.search(r"\[twisted\.scripts\._twistd_unix\.UnixAppLogger#info\] twistd \S+ .* starting up\.$", lines[1])
    assert any(line.endswith("[twisted_mail_cluster#info] probe started") for line in lines)
    assert "hunter2" not in result.stdout


def test_a_line_logged_from_inside_a_write_does_not_deadlock() -> None:
    """A signal handler that logs (Twisted's SIGTERM handler does) can run while the
    main thread is inside the writer: structlog's WriteLogger then waited for its own
    lock for ever.  Simulated with a stream whose write() logs again."""

    class Interrupting(io.StringIO):
        writer: LineWriter | None = None
        interrupted = False

        def write(self, text: str) -> int:
            if not self.interrupted and self.writer is not None:
                self.interrupted = True
                self.writer.msg('{"event": "Received SIGTERM, shutting down."}')
            return super().write(text)

    stream = Interrupting()
    stream.writer = LineWriter(stream)
    done = threading.Event()

    def log() -> None:
        stream.writer.msg('{"event": "connection.close"}')  # type: ignore[union-attr]
        done.set()

    threading.Thread(target=log, daemon=True).start()
    assert done.wait(5), "the writer deadlocked on its own lock"
    assert stream.getvalue().splitlines() == [
        '{"event": "Received SIGTERM, shutting down."}', '{"event": "connection.close"}'
    ]
