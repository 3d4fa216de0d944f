"""Typed configuration: a TOML file, command-line overrides, and defaults for the rest.

Every field has a default, so a node started with no configuration at all runs
the embedded store in ``./mailcluster-data`` on unprivileged loopback ports.

Everything is checked here, at load time, because ``twistd`` calls
:func:`load_config` while it parses its command line: a mistake then costs
the operator one line of output and a non-zero exit, before any port is
opened or any file is written.  A mistake found later would cost a half
started server and a traceback in a log file.  That is also why every
:class:`ConfigError` is a single line that starts with the key at fault.

Relative paths (``server.data``, ``manhole.authorized_keys``,
``manhole.host_key``, ``events.mail_log``, ``store.cassandra.tls_ca_file``,
``events.rabbitmq.ca_file``) are resolved against the working
directory at load time and kept absolute, so that twistd's later ``chdir`` to ``--rundir``
cannot change what they point to.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeVar, cast

__all__ = [
    "AuthConfig",
    "CassandraConfig",
    "Config",
    "ConfigError",
    "EventsConfig",
    "ImapConfig",
    "IPNetwork",
    "LogConfig",
    "ManholeConfig",
    "Pop3Config",
    "RabbitConfig",
    "SmtpConfig",
    "StoreConfig",
    "load_config",
]

MiB = 1024 * 1024
DEFAULT_MAX_MESSAGE_SIZE = 25 * MiB

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

StoreBackend = Literal["embedded", "cassandra"]
EventBus = Literal["in-process", "rabbitmq"]
Pop3View = Literal["message-id", "uid"]
LogLevel = Literal["debug", "info", "warning", "error"]

STORE_BACKENDS: tuple[str, ...] = ("embedded", "cassandra")
EVENT_BUSES: tuple[str, ...] = ("in-process", "rabbitmq")
POP3_VIEWS: tuple[str, ...] = ("message-id", "uid")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
# Levels that make sense for plain reads and writes (ANY and SERIAL do not).
CONSISTENCY_LEVELS: tuple[str, ...] = (
    "ONE",
    "TWO",
    "THREE",
    "QUORUM",
    "ALL",
    "LOCAL_QUORUM",
    "EACH_QUORUM",
    "LOCAL_ONE",
)
SERIAL_CONSISTENCY_LEVELS: tuple[str, ...] = ("SERIAL", "LOCAL_SERIAL")

# What is built in this version; the other values are parsed so that a
# cluster configuration can be written and checked today (the seam).

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF, so a
# smaller limit would refuse mail from compliant clients.
SMTP_MIN_LINE_LENGTH = 1000
# RFC 7162 section 4: servers should accept command lines of at least 8192 octets.
IMAP_MIN_LINE_LENGTH = 8192


class ConfigError(ValueError):
    """A configuration mistake, as one line naming the key at fault.

    Newlines are folded because twistd prints the message as the last line of
    its usage output, and a log line must stay a line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True)
class SmtpConfig:
    """``[smtp]``.

    ``max_line_length`` is 4096 rather than RFC 5321's 1000 (CRLF included):
    real mail (long base64 lines from broken mailers, long headers) exceeds
    1000 often enough that servers are lenient - Postfix's
    ``line_length_limit`` is 2048 - and 4096 still bounds the memory a single
    line can take.
    """

    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_recipients: int = 100
    max_line_length: int = 4096
    timeout: float = 300.0
    #: Postfix's smtpd_soft/hard_error_limit and smtpd_error_sleep_time: after
    #: this many error replies each further one waits error_sleep seconds; at
    #: hard_error_limit the connection is closed (421).  Recipient harvesting
    #: and broken clients slow down instead of costing the node.
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep: float = 1.0
    #: Connections at once from one client (an IPv4 address or IPv6 /64), and in all
    #: (Postfix: smtpd_client_connection_count_limit = 50).
    max_connections_per_address: int = 50
    max_connections: int = 1000
    #: Where mail to "Postmaster" and postmaster@<local domain> goes when no
    #: user of that name exists (RFC 5321 4.5.1: it MUST be accepted).
    postmaster: str | None = None


@dataclass(frozen=True)
class Pop3Config:
    """``[pop3]``."""

    listen: tuple[str, ...] = ("tcp:2110:interface=127.0.0.1",)
    #: Implicit TLS (POP3S, RFC 8314): TCP endpoints; the TLS is the node's ([tls]).
    listen_tls: tuple[str, ...] = ("tcp:2995:interface=127.0.0.1",)
    timeout: float = 600.0
    #: Connections at once from one client (IPv4 address or IPv6 /64), and in all.
    max_connections_per_address: int = 50
    max_connections: int = 1000


@dataclass(frozen=True)
class ImapConfig:
    """``[imap]``.

    ``enabled = false`` is a store-wide choice, not a listener switch: it stops
    maintaining the IMAP view (UIDs, MODSEQs), which is what makes a POP3-only
    deployment run without any lightweight transaction.  To stop serving IMAP
    on one node of a cluster that still has IMAP, empty ``listen`` instead.
    ``max_literal_size`` defaults to ``smtp.max_message_size`` in
    :func:`load_config`: APPEND should take what SMTP would have delivered.
    """

    listen: tuple[str, ...] = ("tcp:2143:interface=127.0.0.1",)
    #: Implicit TLS (IMAPS, RFC 8314): TCP endpoints; the TLS is the node's ([tls]).
    listen_tls: tuple[str, ...] = ("tcp:2993:interface=127.0.0.1",)
    enabled: bool = True
    max_literal_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: Before login: how long a client (or its TLS handshake) may stay silent.
    login_timeout: float = 60.0
    idle_timeout: float = 1800.0
    #: Connections at once from one client (IPv4 address or IPv6 /64), and in all;
    #: sessions of one user from one client (Dovecot's mail_max_userip_connections).
    max_connections_per_address: int = 100
    max_connections: int = 20_000
    max_userip_connections: int = 10
    #: Before login a command is small: literals (a password) of at most this many
    #: bytes, and at most this many of them.  A command's literals after login.
    preauth_max_literal_size: int = 8192
    preauth_max_literals: int = 16
    max_literals_per_command: int = 1000
    #: Seconds a command may take to arrive whole, literals included, after login
    #: (before login: login_timeout).  The idle timeout alone restarts with each byte.
    command_timeout: float = 600.0
    max_line_length: int = 65536
    #: Resource caps (refused with NO [LIMIT], RFC 5530); see the example file for
    #: how each default compares with Dovecot's.
    max_keywords: int = 256
    max_keyword_length: int = 50
    max_flags_per_command: int = 300
    max_search_keys: int = 1000
    max_mailboxes: int = 10_000


def _loopback_networks() -> tuple[IPNetwork, ...]:
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``.

    ``trusted_networks`` are the networks from which a password may be sent
    over an unencrypted connection; from anywhere else a password login needs
    TLS (STARTTLS/STLS or an implicit-TLS listener).  The delays slow down password
    guessing: each failure within ``failure_window`` seconds doubles the delay
    from ``failed_login_delay`` up to ``max_failed_login_delay``.
    """

    trusted_networks: tuple[IPNetwork, ...] = field(default_factory=_loopback_networks)
    failed_login_delay: float = 2.0
    max_failed_login_delay: float = 30.0
    failure_window: float = 300.0
    #: Password checks in flight at once from one address, and on the whole node.
    max_checks_per_address: int = 3
    max_checks: int = 32
    #: Seconds a password found right is trusted without another Argon2 check (0: never).
    cache_ttl: float = 300.0
    #: Threads of the password pool; 0: one per core.
    hash_threads: int = 0


@dataclass(frozen=True)
class CertificateConfig:
    """One certificate chain and its key (PEM files), and the names SNI picks it for."""

    certificate: Path
    private_key: Path
    #: Server names this certificate answers for; empty: the names in the certificate.
    names: tuple[str, ...] = ()
    #: Where it was configured (``tls``, ``tls.sni[0]``), for messages about it.
    key_name: str = "tls"


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]`` and its ``[[tls.sni]]`` entries: the first certificate is the default.

    With none at all the node makes a self-signed certificate in its data
    folder (tls/self-signed.pem) and keeps it across restarts.
    """

    certificates: tuple[CertificateConfig, ...] = ()


def _default_replication() -> Mapping[str, int]:
    return MappingProxyType({"dc1": 1})


@dataclass(frozen=True)
class CassandraConfig:
    """``[store.cassandra]``: parsed and checked now, used once the backend exists.

    ``replication`` is read-only (a mapping proxy) so the frozen config cannot
    be changed through it.
    """

    contact_points: tuple[str, ...] = ("127.0.0.1",)
    port: int = 9042
    local_datacenter: str = "dc1"
    keyspace: str = "mailcluster"
    replication: Mapping[str, int] = field(default_factory=_default_replication)
    consistency: str = "LOCAL_QUORUM"
    serial_consistency: str = "SERIAL"
    pop3_view: Pop3View = "message-id"
    #: Content no message refers to is removed by garbage collection
    #: (``mailcluster-admin gc``) only once it is at least this old: the
    #: margin protects a delivery in progress, whose content is written
    #: before the messages that refer to it.
    gc_grace_seconds: float = 3600.0
    #: TLS to every node (tls/client.py: the chain and each node's address
    #: are verified, TLS 1.2 or newer).
    tls: bool = False
    #: PEM file of the CA certificate(s) to trust; None: the system's trust store.
    tls_ca_file: Path | None = None


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``."""

    backend: StoreBackend = "embedded"
    cassandra: CassandraConfig = field(default_factory=CassandraConfig)


@dataclass(frozen=True)
class RabbitConfig:
    """``[events.rabbitmq]``.

    An ``amqps://`` URL connects with TLS (tls/client.py: the broker's
    certificate and host name are verified before the password is sent).
    """

    url: str = "amqp://guest:guest@127.0.0.1:5672/mailcluster"
    #: PEM file of the CA certificate(s) to trust for amqps://; None: the system's trust store.
    ca_file: Path | None = None


@dataclass(frozen=True)
class EventsConfig:
    """``[events]``."""

    bus: EventBus = "in-process"
    rabbitmq: RabbitConfig = field(default_factory=RabbitConfig)
    #: The ``mail-log`` group listener's file (events/mail_log.py); None: off.
    mail_log: Path | None = None


@dataclass(frozen=True)
class ManholeConfig:
    """``[manhole]``: an SSH Python shell inside the running server.

    Off by default: it is full control of the process.  ``host_key = None``
    means ``<data_dir>/manhole_host_key``, generated on first start.
    """

    enabled: bool = False
    listen: str = "tcp:2222:interface=127.0.0.1"
    authorized_keys: Path | None = None
    host_key: Path | None = None
    username: str = "admin"
    #: A listener off loopback is refused unless this says it is meant.
    allow_non_loopback: bool = False


@dataclass(frozen=True)
class LogConfig:
    """``[log]``."""

    level: LogLevel = "info"


@dataclass(frozen=True)
class Config:
    """The whole node configuration.

    Built by :func:`load_config`, which makes ``data_dir`` absolute; a bare
    ``Config()`` keeps the relative default and is meant for tests.
    """

    hostname: str = field(default_factory=socket.getfqdn)
    data_dir: Path = Path("mailcluster-data")
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    pop3: Pop3Config = field(default_factory=Pop3Config)
    imap: ImapConfig = field(default_factory=ImapConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    manhole: ManholeConfig = field(default_factory=ManholeConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------
# Loading


def load_config(
    path: Path | None = None, overrides: Mapping[str, object] | None = None
) -> Config:
    """Read ``path`` (if any), apply ``overrides``, check everything, return a Config.

    ``overrides`` maps dotted keys (``"smtp.listen"``, ``"server.data"``) to
    values shaped as they would be in the TOML file; they win over the file.
    A value of ``None`` means "not given", so that command-line options can be
    passed through without filtering.  Raises :class:`ConfigError`.
    """
    raw = _read_toml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    return _build(_Table("", raw))


def _read_toml(path: Path) -> dict[str, object]:
    """Parse the file, turning every failure into one line that names the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not valid UTF-8: {e.reason}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {_toml_error_position(str(e))}") from e


_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def _toml_error_position(message: str) -> str:
    """Move tomllib's "(at line L, column C)" to the front, where people look first.

    Python 3.11's TOMLDecodeError only has the position inside its message.
    """
    match = _TOML_POSITION.match(message)
    if match is None:
        return message
    return f"line {match['line']}: {match['msg']} (column {match['col']})"


def _set_dotted(raw: dict[str, object], key: str, value: object) -> None:
    """Put an override where the TOML parser would have put the file's value."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{key}: not a valid configuration key")
    table = raw
    for depth, part in enumerate(parts[:-1]):
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: must be a table, got {_show(child)}")
        table = child
    table[parts[-1]] = value


# ---------------------------------------------------------------------------
# Tables: every key that is read is ticked off, so leftovers are typos.

T = TypeVar("T")
Parser = Callable[[str, object], T]


class _Table:
    """One TOML table being turned into a dataclass."""

    def __init__(self, where: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table, got {_show(raw)}")
        self.where = where
        self._raw: dict[str, object] = raw
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted name of one of this table's keys, as errors show it."""
        return f"{self.where}.{name}" if self.where else name

    def has(self, name: str) -> bool:
        return name in self._raw

    def get(self, name: str, parse: Parser[T], default: T) -> T:
        """The parsed value of ``name``, or ``default`` when the key is absent."""
        self._read.add(name)
        if name not in self._raw:
            return default
        return parse(self.key(name), self._raw[name])

    def table(self, name: str) -> _Table:
        """A sub-table; an absent one reads as empty."""
        self._read.add(name)
        return _Table(self.key(name), self._raw.get(name, {}))

    def done(self) -> None:
        """Refuse any key nobody asked for, suggesting the likely intended one."""
        for name in self._raw:
            if name not in self._read:
                close = difflib.get_close_matches(name, sorted(self._read), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                what = "section" if isinstance(self._raw[name], dict) else "key"
                raise ConfigError(f"{self.key(name)}: unknown {what}{hint}")


# ---------------------------------------------------------------------------
# Sections


def _build(root: _Table) -> Config:
    """Parse every section, then apply the rules that span sections."""
    server = root.table("server")
    hostname = server.get("hostname", _hostname, None)
    data_dir = server.get("data", _path, _absolute(Config.data_dir))
    server.done()
    smtp = _smtp(root.table("smtp"))
    config = Config(
        hostname=hostname if hostname is not None else socket.getfqdn(),
        data_dir=data_dir,
        smtp=smtp,
        pop3=_pop3(root.table("pop3")),
        imap=_imap(root.table("imap"), smtp),
        auth=_auth(root.table("auth")),
        tls=_tls(root.table("tls")),
        store=_store(root.table("store")),
        events=_events(root.table("events")),
        manhole=_manhole(root.table("manhole")),
        log=_log(root.table("log")),
    )
    root.done()
    _check_listeners(config)
    _check_combinations(config)
    return config


def _smtp(t: _Table) -> SmtpConfig:
    d = SmtpConfig()
    config = SmtpConfig(
        listen=t.get("listen", _listen, d.listen),
        max_message_size=t.get("max_message_size", _positive_int, d.max_message_size),
        max_recipients=t.get("max_recipients", _positive_int, d.max_recipients),
        max_line_length=t.get(
            "max_line_length", _int_at_least(SMTP_MIN_LINE_LENGTH), d.max_line_length
        ),
        timeout=t.get("timeout", _seconds, d.timeout),
        postmaster=t.get("postmaster", _address, d.postmaster),
        soft_error_limit=t.get("soft_error_limit", _positive_int, d.soft_error_limit),
        hard_error_limit=t.get("hard_error_limit", _positive_int, d.hard_error_limit),
        error_sleep=t.get("error_sleep", _seconds_or_zero, d.error_sleep),
        max_connections_per_address=t.get(
            "max_connections_per_address", _positive_int, d.max_connections_per_address
        ),
        max_connections=t.get("max_connections", _positive_int, d.max_connections),
    )
    if config.hard_error_limit < config.soft_error_limit:
        raise ConfigError(
            f"{t.key('hard_error_limit')}: must be at least {t.key('soft_error_limit')} "
            f"({config.soft_error_limit}), got {config.hard_error_limit}"
        )
    t.done()
    return config


def _pop3(t: _Table) -> Pop3Config:
    d = Pop3Config()
    config = Pop3Config(
        listen=t.get("listen", _listen, d.listen),
        listen_tls=t.get("listen_tls", _listen_tls, d.listen_tls),
        timeout=t.get("timeout", _seconds, d.timeout),
        max_connections_per_address=t.get(
            "max_connections_per_address", _positive_int, d.max_connections_per_address
        ),
        max_connections=t.get("max_connections", _positive_int, d.max_connections),
    )
    t.done()
    return config


def _imap(t: _Table, smtp: SmtpConfig) -> ImapConfig:
    """IMAP, whose listeners only make sense while the IMAP view is maintained."""
    d = ImapConfig()
    enabled = t.get("enabled", _bool, d.enabled)
    listen = t.get("listen", _listen, d.listen)
    listen_tls = t.get("listen_tls", _listen_tls, d.listen_tls)
    if not enabled:
        for name, given in (("listen", listen), ("listen_tls", listen_tls)):
            if t.has(name) and given:
                raise ConfigError(
                    f"{t.key(name)}: IMAP is disabled ({t.key('enabled')} = false), "
                    "so it cannot listen; remove the listener or enable IMAP"
                )
        listen = listen_tls = ()
    config = ImapConfig(
        listen=listen,
        listen_tls=listen_tls,
        enabled=enabled,
        max_literal_size=t.get("max_literal_size", _positive_int, smtp.max_message_size),
        login_timeout=t.get("login_timeout", _seconds, d.login_timeout),
        idle_timeout=t.get("idle_timeout", _seconds, d.idle_timeout),
        max_line_length=t.get(
            "max_line_length", _int_at_least(IMAP_MIN_LINE_LENGTH), d.max_line_length
        ),
        max_connections_per_address=t.get(
            "max_connections_per_address", _positive_int, d.max_connections_per_address
        ),
        max_connections=t.get("max_connections", _positive_int, d.max_connections),
        max_userip_connections=t.get("max_userip_connections", _positive_int, d.max_userip_connections),
        preauth_max_literal_size=t.get("preauth_max_literal_size", _positive_int, d.preauth_max_literal_size),
        preauth_max_literals=t.get("preauth_max_literals", _positive_int, d.preauth_max_literals),
        max_literals_per_command=t.get("max_literals_per_command", _positive_int, d.max_literals_per_command),
        command_timeout=t.get("command_timeout", _seconds, d.command_timeout),
        max_keywords=t.get("max_keywords", _positive_int, d.max_keywords),
        max_keyword_length=t.get("max_keyword_length", _positive_int, d.max_keyword_length),
        max_flags_per_command=t.get("max_flags_per_command", _positive_int, d.max_flags_per_command),
        max_search_keys=t.get("max_search_keys", _positive_int, d.max_search_keys),
        max_mailboxes=t.get("max_mailboxes", _positive_int, d.max_mailboxes),
    )
    t.done()
    return config


def _tls(t: _Table) -> TLSConfig:
    """The default certificate (``certificate``/``private_key``), then ``[[tls.sni]]``."""
    certificates = []
    if t.has("certificate") or t.has("private_key"):
        certificates.append(_certificate(t, "tls"))
    no_entries: list[dict[str, object]] = []
    sni = t.get("sni", _list_of_tables, no_entries)
    for index, raw in enumerate(sni):
        entry = _Table(f"{t.key('sni')}[{index}]", raw)
        certificates.append(_certificate(entry, entry.where, names=entry.get("names", _server_names, ())))
        entry.done()
    t.done()
    return TLSConfig(tuple(certificates))


def _certificate(t: _Table, where: str, names: tuple[str, ...] = ()) -> CertificateConfig:
    for name in ("certificate", "private_key"):
        if not t.has(name):
            other = "private_key" if name == "certificate" else "certificate"
            raise ConfigError(f"{t.key(name)}: is required with {t.key(other)}")
    return CertificateConfig(
        certificate=t.get("certificate", _path, Path()),
        private_key=t.get("private_key", _path, Path()),
        names=names,
        key_name=where,
    )


def _list_of_tables(key: str, value: object) -> list[dict[str, object]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{key}: must be a list of tables ([[{key}]] entries), got {_show(value)}")
    return value


def _server_names(key: str, value: object) -> tuple[str, ...]:
    """Host names for SNI: exact, or with one leading ``*.`` label."""
    names = _strings(key, value)
    for name in names:
        if not _HOSTNAME.match(name.removeprefix("*.")):
            raise ConfigError(f"{key}: {_show(name)} is not a host name")
    return tuple(n.lower().rstrip(".") for n in names)


def _auth(t: _Table) -> AuthConfig:
    d = AuthConfig()
    config = AuthConfig(
        trusted_networks=t.get("trusted_networks", _networks, d.trusted_networks),
        failed_login_delay=t.get("failed_login_delay", _seconds_or_zero, d.failed_login_delay),
        max_failed_login_delay=t.get(
            "max_failed_login_delay", _seconds_or_zero, d.max_failed_login_delay
        ),
        failure_window=t.get("failure_window", _seconds, d.failure_window),
        max_checks_per_address=t.get("max_checks_per_address", _positive_int, d.max_checks_per_address),
        max_checks=t.get("max_checks", _positive_int, d.max_checks),
        cache_ttl=t.get("cache_ttl", _seconds_or_zero, d.cache_ttl),
        hash_threads=t.get("hash_threads", _int_at_least(0), d.hash_threads),
    )
    if config.max_failed_login_delay < config.failed_login_delay:
        raise ConfigError(
            f"{t.key('max_failed_login_delay')}: must be at least "
            f"{t.key('failed_login_delay')} ({_show(config.failed_login_delay)}), "
            f"got {_show(config.max_failed_login_delay)}"
        )
    t.done()
    return config


def _store(t: _Table) -> StoreConfig:
    config = StoreConfig(
        backend=cast(StoreBackend, t.get("backend", _choice(STORE_BACKENDS), "embedded")),
        cassandra=_cassandra(t.table("cassandra")),
    )
    t.done()
    return config


def _cassandra(t: _Table) -> CassandraConfig:
    d = CassandraConfig()
    config = CassandraConfig(
        contact_points=t.get("contact_points", _strings, d.contact_points),
        port=t.get("port", _port, d.port),
        local_datacenter=t.get("local_datacenter", _nonempty_str, d.local_datacenter),
        keyspace=t.get("keyspace", _keyspace, d.keyspace),
        replication=t.get("replication", _replication, d.replication),
        consistency=t.get("consistency", _choice(CONSISTENCY_LEVELS), d.consistency),
        serial_consistency=t.get(
            "serial_consistency", _choice(SERIAL_CONSISTENCY_LEVELS), d.serial_consistency
        ),
        pop3_view=cast(Pop3View, t.get("pop3_view", _choice(POP3_VIEWS), str(d.pop3_view))),
        gc_grace_seconds=t.get("gc_grace_seconds", _seconds_or_zero, d.gc_grace_seconds),
        tls=t.get("tls", _bool, d.tls),
        tls_ca_file=t.get("tls_ca_file", _ca_file, d.tls_ca_file),
    )
    if config.tls_ca_file is not None and not config.tls:
        # A CA file without TLS would read as an encrypted link that is not one.
        raise ConfigError(f"{t.key('tls_ca_file')}: is only used with {t.key('tls')} = true")
    if config.local_datacenter not in config.replication:
        raise ConfigError(
            f"{t.key('replication')}: has no replication factor for the local "
            f"datacenter {_show(config.local_datacenter)} ({t.key('local_datacenter')})"
        )
    t.done()
    return config


def _events(t: _Table) -> EventsConfig:
    rabbit = t.table("rabbitmq")
    config = EventsConfig(
        bus=cast(EventBus, t.get("bus", _choice(EVENT_BUSES), "in-process")),
        rabbitmq=RabbitConfig(
            url=rabbit.get("url", _amqp_url, RabbitConfig.url),
            ca_file=rabbit.get("ca_file", _ca_file, RabbitConfig.ca_file),
        ),
        mail_log=t.get("mail_log", _path, None),
    )
    if config.rabbitmq.ca_file is not None and not config.rabbitmq.url.startswith("amqps://"):
        # A CA file beside amqp:// would read as an encrypted link that is not one.
        raise ConfigError(f"{rabbit.key('ca_file')}: is only used with an amqps:// {rabbit.key('url')}")
    rabbit.done()
    t.done()
    return config


def _manhole(t: _Table) -> ManholeConfig:
    """The manhole is full control of the process: refuse to open it without keys."""
    d = ManholeConfig()
    config = ManholeConfig(
        enabled=t.get("enabled", _bool, d.enabled),
        listen=t.get("listen", _endpoint, d.listen),
        authorized_keys=t.get("authorized_keys", _path, d.authorized_keys),
        host_key=t.get("host_key", _path, d.host_key),
        username=t.get("username", _username, d.username),
        allow_non_loopback=t.get("allow_non_loopback", _bool, d.allow_non_loopback),
    )
    t.done()
    if config.enabled:
        _check_authorized_keys(t.key("authorized_keys"), config.authorized_keys)
        if not config.allow_non_loopback and not _is_loopback_listener(config.listen):
            raise ConfigError(
                f"{t.key('listen')}: {_show(config.listen)} is not a loopback address, and the manhole is "
                f"root over the node's data: reach it through an SSH tunnel, or set "
                f"{t.key('allow_non_loopback')} = true if you really mean it"
            )
    return config


def _is_loopback_listener(description: str) -> bool:
    """Whether a listener only binds loopback (a TCP interface in 127/8 or ::1; a UNIX socket)."""
    if description.split(":", 1)[0].lower() == "unix":
        return True  # reachable only from this machine, through the file's permissions
    address = _tcp_address(description)
    if address is None:
        return False
    try:
        return ipaddress.ip_address(address[1]).is_loopback
    except ValueError:
        return False


def _log(t: _Table) -> LogConfig:
    config = LogConfig(level=cast(LogLevel, t.get("level", _choice(LOG_LEVELS), "info")))
    t.done()
    return config


# ---------------------------------------------------------------------------
# Rules that span sections


def _check_combinations(config: Config) -> None:
    """Settings that are each valid but do not go together."""
    if config.store.backend == "embedded" and not config.imap.enabled:
        raise ConfigError(
            'imap.enabled: false (a POP3-only deployment without the IMAP view) needs '
            'store.backend = "cassandra"; the embedded store always keeps the IMAP view'
        )
    if config.store.backend == "cassandra" and config.store.cassandra.pop3_view == "uid" and not config.imap.enabled:
        raise ConfigError(
            'store.cassandra.pop3_view: "uid" serves POP3 from the IMAP view, so it needs imap.enabled = true'
        )


def _check_listeners(config: Config) -> None:
    """Two listeners on one TCP port would fail at start; say which keys clash now."""
    seen: dict[tuple[int, str], str] = {}
    for key, description in _all_listeners(config):
        address = _tcp_address(description)
        if address is None or address[0] == 0:
            continue
        for (port, interface), other in seen.items():
            if port == address[0] and _interfaces_overlap(interface, address[1]):
                raise ConfigError(
                    f"{key}: {_show(description)} uses the same port as {other}"
                )
        seen[address] = f"{key} ({_show(description)})"


def _all_listeners(config: Config) -> list[tuple[str, str]]:
    listeners = [("smtp.listen", d) for d in config.smtp.listen]
    listeners += [("pop3.listen", d) for d in config.pop3.listen]
    listeners += [("pop3.listen_tls", d) for d in config.pop3.listen_tls]
    listeners += [("imap.listen", d) for d in config.imap.listen]
    listeners += [("imap.listen_tls", d) for d in config.imap.listen_tls]
    if config.manhole.enabled:
        listeners.append(("manhole.listen", config.manhole.listen))
    return listeners


def _interfaces_overlap(a: str, b: str) -> bool:
    """Whether binding both on one port would clash (Linux, dual-stack "::")."""
    if a == b or "::" in (a, b):
        return True
    a_v4 = ipaddress.ip_address(a).version == 4
    b_v4 = ipaddress.ip_address(b).version == 4
    return "0.0.0.0" in (a, b) and a_v4 and b_v4


def _check_authorized_keys(key: str, path: Path | None) -> None:
    """The file must exist and hold at least one key, or nobody could ever log in."""
    if path is None:
        raise ConfigError(f"{key}: required when manhole.enabled is true")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{key}: file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from e
    if not _count_public_keys(data):
        raise ConfigError(f"{key}: no usable public key in {path}")


def _count_public_keys(data: bytes) -> int:
    """How many lines parse as public keys (lines with OpenSSH options do not)."""
    from twisted.conch.ssh.keys import Key

    count = 0
    for line in data.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            Key.fromString(line)
        except Exception:  # BadKeyError, but truncated lines raise struct.error...
            continue
        count += 1
    return count


# ---------------------------------------------------------------------------
# Value parsers: (dotted key, raw value) -> typed value, or ConfigError.


def _show(value: object) -> str:
    """A value as it would look in the TOML file, so the operator recognises it."""
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except ValueError:
        return repr(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(key: str, value: object) -> int:
    if not _is_int(value) or cast(int, value) < 1:
        raise ConfigError(f"{key}: must be a positive integer, got {_show(value)}")
    return cast(int, value)


def _int_at_least(minimum: int) -> Parser[int]:
    def parse(key: str, value: object) -> int:
        if not _is_int(value) or cast(int, value) < minimum:
            raise ConfigError(f"{key}: must be an integer of at least {minimum}, got {_show(value)}")
        return cast(int, value)

    return parse


def _port(key: str, value: object) -> int:
    if not _is_int(value) or not 1 <= cast(int, value) <= 65535:
        raise ConfigError(f"{key}: must be a port number from 1 to 65535, got {_show(value)}")
    return cast(int, value)


def _number(key: str, value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return None
    return float(value)


def _seconds(key: str, value: object) -> float:
    number = _number(key, value)
    if number is None or number <= 0:
        raise ConfigError(f"{key}: must be a positive number of seconds, got {_show(value)}")
    return number


def _seconds_or_zero(key: str, value: object) -> float:
    number = _number(key, value)
    if number is None or number < 0:
        raise ConfigError(
            f"{key}: must be a number of seconds, zero or more, got {_show(value)}"
        )
    return number


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {_show(value)}")
    return value


def _nonempty_str(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string, got {_show(value)}")
    return value


def _strings(key: str, value: object) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{key}: must be a string or a list of strings, got {_show(value)}")
    return tuple(_nonempty_str(key, item) for item in items)


def _choice(choices: Collection[str]) -> Parser[str]:
    def parse(key: str, value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            allowed = ", ".join(_show(c) for c in choices)
            raise ConfigError(f"{key}: must be one of {allowed}, got {_show(value)}")
        return value

    return parse


_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def _hostname(key: str, value: object) -> str:
    """The name in greetings and Received lines: one DNS-shaped word, nothing else."""
    if not isinstance(value, str) or len(value) > 253 or not _HOSTNAME.match(value):
        raise ConfigError(f"{key}: must be a host name such as mail.example.org, got {_show(value)}")
    return value


_ADDRESS = re.compile(r"^[^@\s<>()\[\]\\,;:\"]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _address(key: str, value: object) -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value.strip()):
        raise ConfigError(f"{key}: must be a mail address such as admin@example.org, got {_show(value)}")
    return value.strip().lower()


_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]+$")


def _username(key: str, value: object) -> str:
    if not isinstance(value, str) or not _USERNAME.match(value):
        raise ConfigError(
            f"{key}: must be a user name of letters, digits and . _ - @, got {_show(value)}"
        )
    return value


_KEYSPACE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")


def _keyspace(key: str, value: object) -> str:
    """An unquoted CQL identifier, so it can go into statements without quoting games."""
    if not isinstance(value, str) or not _KEYSPACE.match(value):
        raise ConfigError(
            f"{key}: must be a letter followed by up to 47 letters, digits or _, got {_show(value)}"
        )
    return value


def _replication(key: str, value: object) -> Mapping[str, int]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{key}: must be a table of datacenter = replicas, got {_show(value)}")
    return MappingProxyType(
        {dc: _positive_int(f"{key}.{dc}", replicas) for dc, replicas in value.items()}
    )


def _amqp_url(key: str, value: object) -> str:
    """amqp:// (clear text) or amqps:// (TLS, port 5671 unless given)."""
    if not isinstance(value, str) or not re.match(r"^amqps?://[^/\s]+(/\S*)?$", value):
        raise ConfigError(f"{key}: must be an amqp:// or amqps:// URL, got {_show(value)}")
    return value


def _ca_file(key: str, value: object) -> Path:
    """A PEM file of CA certificates, read now: a node that cannot verify its peers must not start."""
    from .tls.client import CAFileError, read_ca_certificates

    path = _path(key, value)
    try:
        read_ca_certificates(path)
    except CAFileError as e:
        raise ConfigError(f"{key}: {e}") from None
    return path


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def _path(key: str, value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a path, got {_show(value)}")
    return _absolute(Path(value))


def _networks(key: str, value: object) -> tuple[IPNetwork, ...]:
    """Networks in CIDR form; host bits set is refused as a likely typo."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"{key}: must be a list of networks such as \"10.0.0.0/8\", got {_show(value)}")
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{key}: must be a list of networks such as \"10.0.0.0/8\", got {_show(value)}")
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as e:
            raise ConfigError(f"{key}: invalid network {_show(item)}: {e}") from None
    return tuple(networks)


def _listen(key: str, value: object) -> tuple[str, ...]:
    """A string or a list of strings; an empty list means "do not listen"."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(
            f"{key}: must be an endpoint string or a list of them, got {_show(value)}"
        )
    return tuple(_endpoint(key, item) for item in items)


def _listen_tls(key: str, value: object) -> tuple[str, ...]:
    """Like ``listen``; the node adds the TLS itself, so an ``ssl:`` endpoint would be TLS twice."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for endpoint in items:  # before _listen, which would already try to load an ssl: certificate
        if isinstance(endpoint, str) and endpoint.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise ConfigError(
                f"{key}: takes plain endpoints such as \"tcp:993\" (the TLS is the node's own, "
                f"with the [tls] certificates), got {_show(endpoint)}"
            )
    return _listen(key, value)


def _endpoint(key: str, value: object) -> str:
    """Check an endpoint description the way the listener will read it.

    ``serverFromString`` only parses and builds the endpoint object; nothing
    is bound until ``listen()`` is called on it (twisted/internet/endpoints.py,
    ``serverFromString`` and ``_TCPServerEndpoint.__init__``), so this is safe
    at configuration time.  It does not check the port range or that the
    interface is an address, so those are checked here for TCP.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be an endpoint string such as \"tcp:2525\", got {_show(value)}")
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, value)
    except Exception as e:  # parsers raise ValueError, TypeError, KeyError, OSError...
        raise ConfigError(f"{key}: invalid endpoint {_show(value)}: {e}") from None
    _check_tcp_address(key, value)
    return value


def _tcp_address(description: str) -> tuple[int, str] | None:
    """(port, interface) of a TCP endpoint description, None for other kinds."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import (
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
        serverFromString,
    )

    endpoint = serverFromString(reactor, description)
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        return None
    # Private attributes, stable since Twisted 10.2; getattr keeps a rename harmless.
    port = getattr(endpoint, "_port", None)
    interface = getattr(endpoint, "_interface", None)
    if not isinstance(port, int) or not isinstance(interface, str):
        return None
    # An empty interface is the IPv4 wildcard (listenTCP's default).
    return port, interface or "0.0.0.0"


def _check_tcp_address(key: str, description: str) -> None:
    address = _tcp_address(description)
    if address is None:
        return
    port, interface = address
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: invalid endpoint {_show(description)}: port {port} is not in 0-65535")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ConfigError(
                f"{key}: invalid endpoint {_show(description)}: interface "
                f"{_show(interface)} is not an IP address"
            ) from None
