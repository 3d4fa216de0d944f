"""Logging: structlog JSON lines, with Twisted's own log routed through the same pipe.

One JSON object per line, on one stream, whoever logged it: our code through
structlog, Twisted (and anything printed, since twistd redirects stdout and
stderr into its log) through :class:`TwistedToStructlogObserver`.

**Never log passwords.**  Code must not pass credentials to a logger at all:
log the user name and the outcome, never the password, the SASL response, a
token or an ``Authorization`` header.  :func:`drop_secrets` removes keys that
look like such things as defense in depth only; it cannot see a secret that
was formatted into the event text, so do not do that either.

How twistd is made to use this without ``--logger``: twistd builds the
application (calling the plugin's ``makeService``) *before* it starts logging,
and ``AppLogger.start`` takes the application's :class:`ILogObserver`
component when ``--logger`` was not given (``twisted/application/app.py``,
``ApplicationRunner.run``: ``createOrGetApplication()`` then
``self.logger.start(self.application)``; ``AppLogger.start``:
``application.getComponent(logger.ILogObserver, None)``).
:class:`LoggingMultiService` sets that component when it is added to the
application, choosing the destination the way twistd's ``UnixAppLogger``
would have: stdout with ``-n`` and no ``--logfile`` (or ``--logfile -``),
otherwise ``--logfile`` or ``twistd.log``, rotated like twistd's.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger
from twisted.application.service import MultiService
from twisted.logger import (
    ILogObserver,
    LoggingFile,
    LogEvent,
    LogLevel,
    Logger,
    formatEvent,
)
from twisted.python import log as legacy_log
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

from .twisted_types import installed_reactor

__all__ = [
    "LoggingMultiService",
    "TwistedToStructlogObserver",
    "configure_structlog",
    "configure_structlog_to_twisted",
    "drop_secrets",
    "is_secret_key",
    "log_destination",
]

# Words that mark a key as carrying a credential.  "response" is here because
# SASL and AUTH client responses carry passwords: log protocol replies under
# another key (e.g. "reply").
SECRET_WORDS = frozenset(
    {"password", "passwd", "pass", "secret", "token", "authorization", "response"}
)
# Long enough to be unambiguous inside a run-together key such as "userpassword".
_SECRET_SUBSTRINGS = ("password", "passwd", "secret", "token", "authorization")


# ---------------------------------------------------------------------------
# Secret scrubbing


def is_secret_key(key: object) -> bool:
    """Whether a log key looks like it holds a credential.

    Matches whole words of the key, case-insensitively, whatever the
    separator or camelCase (``user_password``, ``X-Auth-Token``,
    ``saslResponse``, ``passwords``) plus the unambiguous long words anywhere
    (``userpassword``); ``bypass`` or ``compass`` are not secrets.
    """
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    if any(s in lowered for s in _SECRET_SUBSTRINGS):
        return True
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    for word in re.split(r"[^A-Za-z0-9]+", spaced):
        word = word.lower()
        if word in SECRET_WORDS or (word.endswith("s") and word[:-1] in SECRET_WORDS):
            return True
    return False


def _scrub(value: Any) -> Any:
    """Secrets can hide in nested dicts (a parsed command, a request body)."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if type(value) is tuple:
        return tuple(_scrub(v) for v in value)
    return value


def drop_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: remove every key that looks like a credential.

    Defense in depth only: the rule is still never to log secrets.  The
    ``event`` text itself is not touched.
    """
    return {
        key: (value if key == "event" else _scrub(value))
        for key, value in event_dict.items()
        if key == "event" or not is_secret_key(key)
    }


# ---------------------------------------------------------------------------
# structlog configuration


def _processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        drop_secrets,
    ]


class TextSink(Protocol):
    """Where log lines go: standard output, or a twistd LogFile (which rotates)."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class LineWriter:
    """structlog's final logger: one JSON line per event, each written whole and flushed.

    Not structlog's WriteLogger: it guards its file with a plain Lock, and
    Python runs signal handlers on the main thread between bytecodes.
    Twisted's SIGTERM handler logs "Received SIGTERM"; arriving while the
    main thread was inside WriteLogger.msg, it waited for the lock that same
    thread held, for ever: a node that ignored SIGTERM (seen once in CI,
    stacks taken with py-spy).  With a re-entrant lock the handler's line
    goes out and shutdown goes on; lines stay whole since each is one write.
    """

    _locks: dict[int, threading.RLock] = {}

    def __init__(self, stream: TextSink) -> None:
        self._stream = stream
        self._lock = self._locks.setdefault(id(stream), threading.RLock())

    def msg(self, message: str) -> None:
        with self._lock:
            self._stream.write(message + "\n")
            self._stream.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure_structlog(stream: TextSink, level: str = "info") -> None:
    """Send structlog events to ``stream`` as JSON lines, at ``level`` and above.

    Loggers are not cached on first use, so a module-level
    ``structlog.get_logger()`` follows a later reconfiguration (twistd
    configures logging after modules are imported).
    """
    structlog.configure(
        processors=[*_processors(), structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: LineWriter(stream),
        cache_logger_on_first_use=False,
    )


_TWISTED_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warning": LogLevel.warn,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "exception": LogLevel.error,
    "critical": LogLevel.critical,
    "fatal": LogLevel.critical,
}


class TwistedLogWriter:
    """structlog's final logger when another observer owns the output.

    When the operator chose ``--logger`` or ``--syslog``, our events must go
    where theirs go, so each one becomes a ``twisted.logger`` event with its
    fields kept as event keys (a JSON observer keeps them structured).
    """

    def __init__(self, namespace: str = "twisted_mail_cluster") -> None:
        self._log = Logger(namespace=namespace)

    def __getattr__(self, method_name: str) -> Any:
        level = _TWISTED_LEVELS.get(method_name, LogLevel.info)

        def emit(**event: Any) -> None:
            text = str(event.pop("event", ""))
            event.pop("level", None)  # carried by the Twisted level; also emit()'s own argument
            self._log.emit(level, "{event_text}", event_text=text, **event)

        return emit


def _as_keywords(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Last processor: hand the event dict over as keyword arguments, unrendered."""
    return event_dict


def configure_structlog_to_twisted(level: str = "info") -> None:
    """Route structlog into ``twisted.logger`` (used when twistd's observer stays)."""
    writer = TwistedLogWriter()
    structlog.configure(
        processors=[*_processors(), _as_keywords],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=False,
    )


# ---------------------------------------------------------------------------
# Twisted -> structlog


_STRUCTLOG_METHODS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}


@implementer(ILogObserver)
class TwistedToStructlogObserver:
    """Forward each ``twisted.logger`` event to structlog.

    Two things could make this loop: writing to a stream that is itself
    redirected into Twisted's log (twistd replaces ``sys.stdout`` with a
    ``LoggingFile``), or structlog being routed into Twisted.  An event that
    arrives while this observer is already forwarding one, in the same
    thread, can only be such an echo, so it is dropped.  The observer never
    raises: Twisted would log the failure, and that event would come here.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, event: LogEvent) -> None:
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            self._forward(event)
        except Exception:
            self._report_unforwardable(event)
        finally:
            self._local.busy = False

    def _forward(self, event: LogEvent) -> None:
        method = _STRUCTLOG_METHODS.get(event.get("log_level"), "info")
        fields: dict[str, Any] = {"namespace": str(event.get("log_namespace", "twisted"))}
        system = event.get("log_system")
        if system not in (None, "-"):
            fields["system"] = str(system)
        traceback = _traceback(event.get("log_failure"))
        if traceback is not None:
            fields["exception"] = traceback
        getattr(structlog.get_logger(), method)(_text(event), **fields)

    def _report_unforwardable(self, event: LogEvent) -> None:
        try:
            structlog.get_logger().error(
                "a Twisted log event could not be forwarded",
                namespace="twisted_mail_cluster.logs",
                original=repr(event)[:2000],
            )
        except Exception:
            pass  # nowhere left to report to without risking a loop


def _text(event: LogEvent) -> str:
    """The event's message; formatEvent already survives bad format strings."""
    try:
        return formatEvent(event) or ""
    except Exception:
        return repr(event.get("log_format"))


def _traceback(failure: object) -> str | None:
    if failure is None:
        return None
    if isinstance(failure, Failure):
        try:
            return failure.getTraceback()
        except Exception:
            pass  # a Failure whose frames cannot be formatted: its repr still says what it was
    return repr(failure)


# ---------------------------------------------------------------------------
# twistd integration


def log_destination(twistd_options: Mapping[str, Any]) -> str | None:
    """Where twistd would have logged: ``"-"`` for stdout, a file path, or None.

    None means "leave twistd's logging alone": the operator chose
    ``--logger`` or ``--syslog``, or asked a daemon to log to stdout, which
    twistd itself refuses ("Daemons cannot log to stdout, exiting!").
    Mirrors ``UnixAppLogger._getLogObserver`` (twisted/scripts/_twistd_unix.py).
    """
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    logfile = twistd_options.get("logfile") or ""
    nodaemon = bool(twistd_options.get("nodaemon"))
    if logfile == "-":
        return "-" if nodaemon else None
    if not logfile:
        return "-" if nodaemon else "twistd.log"
    return str(logfile)


def _real_stdout() -> TextIO:
    """stdout, never twistd's redirect of it into the log (that would loop)."""
    if isinstance(sys.stdout, LoggingFile) and sys.__stdout__ is not None:
        return sys.__stdout__
    return sys.stdout


def _rotate_on_sigusr1(logfile: LogFile) -> None:
    """Rotate on SIGUSR1 as twistd does for its own log file, unless taken."""
    if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: object) -> None:
        installed_reactor().callFromThread(logfile.rotate)

    signal.signal(signal.SIGUSR1, rotate)


class LoggingMultiService(MultiService):
    """The plugin's top service: it sets up logging for the whole twistd process.

    ``twistd_options`` is twistd's ``ServerOptions`` (the plugin options'
    ``.parent``); None means "not run by twistd" and changes nothing.
    structlog is configured as soon as this is built, so create it first in
    ``makeService`` and whatever is logged afterwards lands in the right
    place.  Adding it to twistd's application sets the application's
    ``ILogObserver`` component, which twistd then starts logging with.
    When the operator chose their own observer (``--logger``, ``--syslog``)
    or the application already has one, that choice stands and structlog is
    routed into Twisted's log instead, so nothing is lost either way.
    """

    def __init__(
        self,
        twistd_options: Mapping[str, Any] | None,
        level: str = "info",
        *,
        rotate_on_sigusr1: bool = True,
    ) -> None:
        super().__init__()
        self._level = level
        self.observer: TwistedToStructlogObserver | None = None
        self.log_stream: TextIO | LogFile | None = None
        if twistd_options is None:
            return
        destination = log_destination(twistd_options)
        if destination is None:
            configure_structlog_to_twisted(level)
            return
        self.log_stream = _open(destination, rotate_on_sigusr1)
        configure_structlog(self.log_stream, level)
        self.observer = TwistedToStructlogObserver()

    def setServiceParent(self, parent: Any) -> None:
        if self.observer is not None:
            self._offer_observer(parent)
        super().setServiceParent(parent)

    def _offer_observer(self, parent: Any) -> None:
        if not isinstance(parent, Componentized):
            return
        current = parent.getComponent(ILogObserver, None)
        if current is self.observer:
            return
        if current is None and parent.getComponent(legacy_log.ILogObserver, None) is None:
            parent.setComponent(ILogObserver, self.observer)
            return
        # The application already logs somewhere: follow it.
        configure_structlog_to_twisted(self._level)
        self.observer = None


def _open(destination: str, rotate_on_sigusr1: bool) -> TextIO | LogFile:
    if destination == "-":
        return _real_stdout()
    logfile = LogFile.fromFullPath(destination)
    if rotate_on_sigusr1:
        _rotate_on_sigusr1(logfile)
    return logfile
