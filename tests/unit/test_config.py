"""Configuration loading and the ``twistd mailcluster`` options built on it."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key
from twisted.python import usage

from twisted_mail_cluster.config import (
    AuthConfig,
    CassandraConfig,
    Config,
    ConfigError,
    EventsConfig,
    ImapConfig,
    LogConfig,
    ManholeConfig,
    Pop3Config,
    RabbitConfig,
    SmtpConfig,
    StoreConfig,
    load_config,
)
from twisted_mail_cluster.options import ConfigRefused, MailClusterOptions

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Relative paths resolve against the CWD: make that a fresh folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def public_key_line() -> str:
    return Key(ed25519.Ed25519PrivateKey.generate()).public().toString("openssh").decode()


# ---------------------------------------------------------------------------
# Defaults


def test_no_config_gives_a_working_single_node(in_tmp_dir: Path) -> None:
    config = load_config()
    assert config == Config(
        hostname=socket.getfqdn(),
        data_dir=in_tmp_dir / "mailcluster-data",
        smtp=SmtpConfig(
            listen=("tcp:2525:interface=127.0.0.1",),
            max_message_size=25 * MiB,
            max_recipients=100,
            max_line_length=4096,
            timeout=300.0,
        ),
        pop3=Pop3Config(listen=("tcp:2110:interface=127.0.0.1",), timeout=600.0),
        imap=ImapConfig(
            listen=("tcp:2143:interface=127.0.0.1",),
            enabled=True,
            max_literal_size=25 * MiB,
            idle_timeout=1800.0,
            max_line_length=65536,
        ),
        auth=AuthConfig(
            trusted_networks=(
                ipaddress.ip_network("127.0.0.0/8"),
                ipaddress.ip_network("::1/128"),
            ),
            failed_login_delay=2.0,
            max_failed_login_delay=30.0,
            failure_window=300.0,
        ),
        store=StoreConfig(
            backend="embedded",
            cassandra=CassandraConfig(
                contact_points=("127.0.0.1",),
                port=9042,
                local_datacenter="dc1",
                keyspace="mailcluster",
                replication={"dc1": 1},
                consistency="LOCAL_QUORUM",
                serial_consistency="SERIAL",
                pop3_view="message-id",
                gc_grace_seconds=3600.0,
            ),
        ),
        events=EventsConfig(
            bus="in-process",
            rabbitmq=RabbitConfig(url="amqp://guest:guest@127.0.0.1:5672/mailcluster"),
        ),
        manhole=ManholeConfig(
            enabled=False,
            listen="tcp:2222:interface=127.0.0.1",
            authorized_keys=None,
            host_key=None,
            username="admin",
        ),
        log=LogConfig(level="info"),
    )
    assert config.data_dir.is_absolute()


def test_empty_file_equals_no_file(in_tmp_dir: Path) -> None:
    assert load_config(write(in_tmp_dir / "empty.toml", "")) == load_config()


def test_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(AttributeError):
        config.smtp.max_recipients = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.store.cassandra.replication["dc2"] = 3  # type: ignore[index]


# ---------------------------------------------------------------------------
# A file with every key


def test_every_key_is_read(in_tmp_dir: Path) -> None:
    write(in_tmp_dir / "admins.pub", public_key_line() + "\n")
    path = write(
        in_tmp_dir / "full.toml",
        """
        [server]
        hostname = "mx1.example.org"
        data = "/var/lib/mailcluster"

        [smtp]
        listen = ["tcp:25", "tcp6:25:interface=\\\\:\\\\:1"]
        max_message_size = 1048576
        max_recipients = 10
        max_line_length = 2048
        timeout = 60

        [pop3]
        listen = "tcp:110"
        timeout = 30.5

        [imap]
        listen = ["tcp:143"]
        enabled = true
        max_literal_size = 2097152
        idle_timeout = 600
        max_line_length = 8192

        [auth]
        trusted_networks = ["10.0.0.0/8", "2001:db8::/32"]
        failed_login_delay = 0
        max_failed_login_delay = 10
        failure_window = 60

        [store]
        backend = "embedded"

        [store.cassandra]
        contact_points = ["10.1.0.1", "10.1.0.2"]
        port = 19042
        local_datacenter = "paris"
        keyspace = "mail_prod"
        replication = { paris = 3, london = 2 }
        consistency = "EACH_QUORUM"
        serial_consistency = "LOCAL_SERIAL"
        pop3_view = "uid"
        gc_grace_seconds = 600

        [events]
        bus = "in-process"
        mail_log = "logs/mail-log.jsonl"

        [events.rabbitmq]
        url = "amqp://mail:pw@rabbit.example.org:5672/mail"

        [manhole]
        enabled = true
        listen = "tcp:2022:interface=127.0.0.1"
        authorized_keys = "admins.pub"
        host_key = "keys/manhole"
        username = "ops"

        [log]
        level = "debug"
        """,
    )
    config = load_config(path)
    assert config == Config(
        hostname="mx1.example.org",
        data_dir=Path("/var/lib/mailcluster"),
        smtp=SmtpConfig(
            listen=("tcp:25", "tcp6:25:interface=\\:\\:1"),
            max_message_size=1048576,
            max_recipients=10,
            max_line_length=2048,
            timeout=60.0,
        ),
        pop3=Pop3Config(listen=("tcp:110",), timeout=30.5),
        imap=ImapConfig(
            listen=("tcp:143",),
            enabled=True,
            max_literal_size=2097152,
            idle_timeout=600.0,
            max_line_length=8192,
        ),
        auth=AuthConfig(
            trusted_networks=(
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
            failed_login_delay=0.0,
            max_failed_login_delay=10.0,
            failure_window=60.0,
        ),
        store=StoreConfig(
            backend="embedded",
            cassandra=CassandraConfig(
                contact_points=("10.1.0.1", "10.1.0.2"),
                port=19042,
                local_datacenter="paris",
                keyspace="mail_prod",
                replication={"paris": 3, "london": 2},
                consistency="EACH_QUORUM",
                serial_consistency="LOCAL_SERIAL",
                pop3_view="uid",
                gc_grace_seconds=600.0,
            ),
        ),
        events=EventsConfig(
            bus="in-process",
            rabbitmq=RabbitConfig(url="amqp://mail:pw@rabbit.example.org:5672/mail"),
            mail_log=in_tmp_dir / "logs" / "mail-log.jsonl",
        ),
        manhole=ManholeConfig(
            enabled=True,
            listen="tcp:2022:interface=127.0.0.1",
            authorized_keys=in_tmp_dir / "admins.pub",
            host_key=in_tmp_dir / "keys" / "manhole",
            username="ops",
        ),
        log=LogConfig(level="debug"),
    )
    assert isinstance(config.store.cassandra.replication, MappingProxyType)
    assert isinstance(config.smtp.timeout, float)


def test_example_file_loads_and_matches_the_defaults() -> None:
    """conf/mailcluster.example.toml documents the defaults: it must not drift."""
    example = Path(__file__).resolve().parents[2] / "conf" / "mailcluster.example.toml"
    config = load_config(example)
    defaults = load_config()
    assert config.smtp == defaults.smtp
    assert config.pop3 == defaults.pop3
    assert config.imap == defaults.imap
    assert config.auth == defaults.auth
    assert config.store == defaults.store
    assert config.events == defaults.events
    assert config.manhole == defaults.manhole
    assert config.log == defaults.log
    assert config.data_dir == defaults.data_dir


def test_example_file_documents_every_key() -> None:
    """Every key of every section appears in the example, commented or not."""
    example = (Path(__file__).resolve().parents[2] / "conf" / "mailcluster.example.toml").read_text()
    # Where a section's keys are its dataclass's fields, take them from there: a new
    # setting cannot then be left out of the example.
    expected = {
        "server": ["hostname", "data"],
        "smtp": [f.name for f in dataclasses.fields(SmtpConfig)],
        "pop3": [f.name for f in dataclasses.fields(Pop3Config)],
        "imap": [f.name for f in dataclasses.fields(ImapConfig)],
        "auth": [f.name for f in dataclasses.fields(AuthConfig)],
        "store": ["backend"],
        "store.cassandra": [
            "contact_points", "port", "local_datacenter", "keyspace", "replication",
            "consistency", "serial_consistency", "pop3_view", "gc_grace_seconds", "tls", "tls_ca_file",
        ],
        "events": ["bus", "mail_log"],
        "events.rabbitmq": ["url", "ca_file"],
        "manhole": [f.name for f in dataclasses.fields(ManholeConfig)],
        "log": ["level"],
    }
    for section, keys in expected.items():
        header = f"[{section}]"
        assert header in example, header
        body = example.split(header, 1)[1].split("\n[", 1)[0]
        for key in keys:
            assert f"\n{key} = " in body or f"\n# {key} = " in body, f"{section}.{key}"


# ---------------------------------------------------------------------------
# Values


def test_listen_takes_a_string_or_a_list(in_tmp_dir: Path) -> None:
    config = load_config(overrides={"smtp.listen": "tcp:2600", "pop3.listen": ["tcp:2601", "tcp:2602"]})
    assert config.smtp.listen == ("tcp:2600",)
    assert config.pop3.listen == ("tcp:2601", "tcp:2602")


def test_empty_listen_list_means_not_listening() -> None:
    assert load_config(overrides={"smtp.listen": []}).smtp.listen == ()


def test_imap_literal_size_follows_smtp_message_size_unless_set() -> None:
    assert load_config(overrides={"smtp.max_message_size": 1000}).imap.max_literal_size == 1000
    config = load_config(overrides={"smtp.max_message_size": 1000, "imap.max_literal_size": 5000})
    assert config.imap.max_literal_size == 5000


def test_imap_disabled_drops_the_default_listener() -> None:
    config = load_config(overrides={"imap.enabled": False, "store.backend": "cassandra"})
    assert config.imap.enabled is False
    assert config.imap.listen == ()


def test_cassandra_gc_grace_reaches_the_store() -> None:
    """store.cassandra.gc_grace_seconds: 0 is allowed (tests), and the store uses it."""
    from datetime import timedelta

    from twisted.internet import reactor

    from twisted_mail_cluster.store.cassandra import CassandraStore

    config = load_config(overrides={"store.cassandra.gc_grace_seconds": 0})
    assert config.store.cassandra.gc_grace_seconds == 0
    assert CassandraStore(config.store.cassandra, reactor)._gc_grace == timedelta(0)
    default = load_config().store.cassandra
    assert default.gc_grace_seconds == 3600.0
    assert CassandraStore(default, reactor)._gc_grace == timedelta(hours=1)
    assert CassandraStore(default, reactor, gc_grace=timedelta(seconds=5))._gc_grace == timedelta(seconds=5)


def test_relative_paths_resolve_against_the_cwd_at_load_time(
    in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        overrides={"server.data": "here/data", "manhole.host_key": "k", "events.mail_log": "mail.jsonl"}
    )
    monkeypatch.chdir("/")
    assert config.data_dir == in_tmp_dir / "here" / "data"
    assert config.manhole.host_key == in_tmp_dir / "k"
    assert config.events.mail_log == in_tmp_dir / "mail.jsonl"


def test_single_network_string_is_accepted() -> None:
    config = load_config(overrides={"auth.trusted_networks": "192.0.2.7"})
    assert config.auth.trusted_networks == (ipaddress.ip_network("192.0.2.7/32"),)


def test_no_trusted_networks_is_allowed() -> None:
    assert load_config(overrides={"auth.trusted_networks": []}).auth.trusted_networks == ()


def test_overrides_win_over_the_file(in_tmp_dir: Path) -> None:
    path = write(
        in_tmp_dir / "c.toml",
        """
        [server]
        data = "/from/file"
        hostname = "file.example.org"
        [smtp]
        listen = "tcp:2700"
        max_recipients = 7
        """,
    )
    config = load_config(path, {"server.data": "/from/override", "smtp.listen": ["tcp:2701"], "server.hostname": None})
    assert config.data_dir == Path("/from/override")
    assert config.smtp.listen == ("tcp:2701",)
    assert config.smtp.max_recipients == 7
    assert config.hostname == "file.example.org"  # None means "not given"


def test_endpoint_validation_does_not_listen() -> None:
    """serverFromString parses only: a port in use still validates, a free one stays free."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        config = load_config(
            overrides={
                "smtp.listen": f"tcp:{busy_port}:interface=127.0.0.1",
                "pop3.listen": f"tcp:{free_port}:interface=127.0.0.1",
            }
        )
        assert config.smtp.listen == (f"tcp:{busy_port}:interface=127.0.0.1",)
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", free_port))


# ---------------------------------------------------------------------------
# Errors: one line, naming the key


BAD_OVERRIDES = [
    ({"smtp.max_message_size": -5}, "smtp.max_message_size: must be a positive integer, got -5"),
    ({"smtp.max_message_size": 0}, "smtp.max_message_size: must be a positive integer, got 0"),
    ({"smtp.max_message_size": "25M"}, 'smtp.max_message_size: must be a positive integer, got "25M"'),
    ({"smtp.max_recipients": True}, "smtp.max_recipients: must be a positive integer, got true"),
    ({"smtp.max_recipients": 1.5}, "smtp.max_recipients: must be a positive integer, got 1.5"),
    ({"smtp.max_line_length": 999}, "smtp.max_line_length: must be an integer of at least 1000, got 999"),
    ({"imap.max_line_length": 4096}, "imap.max_line_length: must be an integer of at least 8192, got 4096"),
    ({"imap.max_literal_size": -1}, "imap.max_literal_size: must be a positive integer, got -1"),
    ({"smtp.timeout": 0}, "smtp.timeout: must be a positive number of seconds, got 0"),
    ({"pop3.timeout": "10s"}, 'pop3.timeout: must be a positive number of seconds, got "10s"'),
    ({"imap.idle_timeout": float("inf")}, "imap.idle_timeout: must be a positive number of seconds, got Infinity"),
    ({"auth.failed_login_delay": -1}, "auth.failed_login_delay: must be a number of seconds, zero or more, got -1"),
    (
        {"auth.failed_login_delay": 5, "auth.max_failed_login_delay": 4},
        "auth.max_failed_login_delay: must be at least auth.failed_login_delay (5.0), got 4.0",
    ),
    ({"imap.enabled": "yes"}, 'imap.enabled: must be true or false, got "yes"'),
    (
        {"smtp.listen": "tcp:abc"},
        "smtp.listen: invalid endpoint \"tcp:abc\": invalid literal for int() with base 10: 'abc'",
    ),
    ({"smtp.listen": "bogus:25"}, "smtp.listen: invalid endpoint \"bogus:25\": Unknown endpoint type: 'bogus'"),
    (
        {"pop3.listen": ["tcp:2110", "tcp:2111:interfac=127.0.0.1"]},
        "pop3.listen: invalid endpoint \"tcp:2111:interfac=127.0.0.1\": "
        "_parseTCP() got an unexpected keyword argument 'interfac'",
    ),
    ({"imap.listen": "tcp:70000"}, 'imap.listen: invalid endpoint "tcp:70000": port 70000 is not in 0-65535'),
    (
        {"imap.listen": "tcp:143:interface=localhost"},
        'imap.listen: invalid endpoint "tcp:143:interface=localhost": interface "localhost" is not an IP address',
    ),
    ({"smtp.listen": ""}, 'smtp.listen: must be an endpoint string such as "tcp:2525", got ""'),
    ({"smtp.listen": 25}, "smtp.listen: must be an endpoint string or a list of them, got 25"),
    (
        {"manhole.listen": ["tcp:2222"]},
        'manhole.listen: must be an endpoint string such as "tcp:2525", got ["tcp:2222"]',
    ),
    (
        {"pop3.listen": "tcp:2525"},
        'pop3.listen: "tcp:2525" uses the same port as smtp.listen ("tcp:2525:interface=127.0.0.1")',
    ),
    (
        {"imap.enabled": False, "imap.listen": "tcp:2143"},
        "imap.listen: IMAP is disabled (imap.enabled = false), so it cannot listen; "
        "remove the listener or enable IMAP",
    ),
    (
        {"auth.trusted_networks": ["10.0.0.1/8"]},
        'auth.trusted_networks: invalid network "10.0.0.1/8": 10.0.0.1/8 has host bits set',
    ),
    (
        {"auth.trusted_networks": ["not-a-network"]},
        "auth.trusted_networks: invalid network \"not-a-network\": "
        "'not-a-network' does not appear to be an IPv4 or IPv6 network",
    ),
    (
        {"auth.trusted_networks": [10]},
        'auth.trusted_networks: must be a list of networks such as "10.0.0.0/8", got [10]',
    ),
    ({"log.level": "trace"}, 'log.level: must be one of "debug", "info", "warning", "error", got "trace"'),
    ({"store.backend": "sqlite"}, 'store.backend: must be one of "embedded", "cassandra", got "sqlite"'),
    (
        {"imap.enabled": False},
        'imap.enabled: false (a POP3-only deployment without the IMAP view) needs '
        'store.backend = "cassandra"; the embedded store always keeps the IMAP view',
    ),
    (
        {"store.backend": "cassandra", "imap.enabled": False, "imap.listen": [],
         "store.cassandra.pop3_view": "uid"},
        'store.cassandra.pop3_view: "uid" serves POP3 from the IMAP view, so it needs imap.enabled = true',
    ),
    ({"events.bus": "kafka"}, 'events.bus: must be one of "in-process", "rabbitmq", got "kafka"'),
    ({"events.mail_log": ""}, 'events.mail_log: must be a path, got ""'),
    (
        {"events.rabbitmq.url": "http://rabbit"},
        'events.rabbitmq.url: must be an amqp:// or amqps:// URL, got "http://rabbit"',
    ),
    ({"store.cassandra.port": 0}, "store.cassandra.port: must be a port number from 1 to 65535, got 0"),
    (
        {"store.cassandra.keyspace": "mail-prod"},
        'store.cassandra.keyspace: must be a letter followed by up to 47 letters, digits or _, got "mail-prod"',
    ),
    (
        {"store.cassandra.consistency": "local_quorum"},
        'store.cassandra.consistency: must be one of "ONE", "TWO", "THREE", "QUORUM", "ALL", '
        '"LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE", got "local_quorum"',
    ),
    (
        {"store.cassandra.serial_consistency": "QUORUM"},
        'store.cassandra.serial_consistency: must be one of "SERIAL", "LOCAL_SERIAL", got "QUORUM"',
    ),
    (
        {"store.cassandra.pop3_view": "timeuuid"},
        'store.cassandra.pop3_view: must be one of "message-id", "uid", got "timeuuid"',
    ),
    (
        {"store.cassandra.gc_grace_seconds": -1},
        "store.cassandra.gc_grace_seconds: must be a number of seconds, zero or more, got -1",
    ),
    (
        {"store.cassandra.replication": {"dc1": 0}},
        "store.cassandra.replication.dc1: must be a positive integer, got 0",
    ),
    (
        {"store.cassandra.replication": {"dc2": 3}},
        'store.cassandra.replication: has no replication factor for the local datacenter "dc1" '
        "(store.cassandra.local_datacenter)",
    ),
    (
        {"store.cassandra.contact_points": []},
        "store.cassandra.contact_points: must be a string or a list of strings, got []",
    ),
    (
        {"server.hostname": "mail example"},
        'server.hostname: must be a host name such as mail.example.org, got "mail example"',
    ),
    ({"server.data": ""}, 'server.data: must be a path, got ""'),
    (
        {"manhole.username": "ad min"},
        'manhole.username: must be a user name of letters, digits and . _ - @, got "ad min"',
    ),
    ({"manhole.enabled": True}, "manhole.authorized_keys: required when manhole.enabled is true"),
    ({"smtp.max_mesage_size": 5}, "smtp.max_mesage_size: unknown key (did you mean 'max_message_size'?)"),
    ({"smtp.colour": 5}, "smtp.colour: unknown key"),
    ({"smtpp.listen": "tcp:25"}, "smtpp: unknown section (did you mean 'smtp'?)"),
    ({"store.cassandra.hosts": ["a"]}, "store.cassandra.hosts: unknown key"),
    ({"smtp": 5}, "smtp: must be a table, got 5"),
    ({"smtp..listen": "tcp:25"}, "smtp..listen: not a valid configuration key"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES, ids=[m.split(":")[0] for _, m in BAD_OVERRIDES])
def test_bad_values_raise_one_line_naming_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_unknown_key_in_file(in_tmp_dir: Path) -> None:
    path = write(in_tmp_dir / "c.toml", "[pop3]\nlisten = 'tcp:2110'\ntimout = 5\n")
    with pytest.raises(ConfigError, match=r"^pop3\.timout: unknown key \(did you mean 'timeout'\?\)$"):
        load_config(path)


def test_toml_syntax_error_names_the_file_and_line(in_tmp_dir: Path) -> None:
    path = write(in_tmp_dir / "broken.toml", '[smtp]\nmax_recipients = 10\nlisten = "tcp:25\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file {path}: line 3: Illegal character '\\n' (column 17)"


def test_missing_config_file(in_tmp_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(in_tmp_dir / "nope.toml")
    assert str(info.value) == f"config file {in_tmp_dir / 'nope.toml'}: cannot read: No such file or directory"


def test_config_file_that_is_not_utf8(in_tmp_dir: Path) -> None:
    path = in_tmp_dir / "latin1.toml"
    path.write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file {path}: not valid UTF-8: invalid continuation byte"


def test_manhole_authorized_keys_must_exist(in_tmp_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"manhole.enabled": True, "manhole.authorized_keys": "missing.pub"})
    assert str(info.value) == f"manhole.authorized_keys: file not found: {in_tmp_dir / 'missing.pub'}"


def test_manhole_authorized_keys_must_hold_a_key(in_tmp_dir: Path) -> None:
    write(in_tmp_dir / "junk.pub", "# nobody yet\nnot a key\n")
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"manhole.enabled": True, "manhole.authorized_keys": "junk.pub"})
    assert str(info.value) == f"manhole.authorized_keys: no usable public key in {in_tmp_dir / 'junk.pub'}"


def test_manhole_authorized_keys_skips_broken_lines(in_tmp_dir: Path) -> None:
    write(in_tmp_dir / "k.pub", "ssh-ed25519 AAAA\nssh-rsa !!!!\n" + public_key_line() + "\n")
    config = load_config(overrides={"manhole.enabled": True, "manhole.authorized_keys": "k.pub"})
    assert config.manhole.authorized_keys == in_tmp_dir / "k.pub"


def test_manhole_authorized_keys_with_only_broken_lines(in_tmp_dir: Path) -> None:
    write(in_tmp_dir / "k.pub", "ssh-ed25519 AAAA\n")
    with pytest.raises(ConfigError, match=r"^manhole\.authorized_keys: no usable public key in "):
        load_config(overrides={"manhole.enabled": True, "manhole.authorized_keys": "k.pub"})


def test_manhole_disabled_ignores_a_missing_key_file() -> None:
    config = load_config(overrides={"manhole.authorized_keys": "missing.pub"})
    assert config.manhole.enabled is False


def test_manhole_listener_may_not_clash_when_enabled(in_tmp_dir: Path) -> None:
    write(in_tmp_dir / "k.pub", public_key_line() + "\n")
    listen = "tcp:2525:interface=127.0.0.1"
    overrides = {"manhole.authorized_keys": "k.pub", "manhole.listen": listen}
    assert load_config(overrides=overrides).manhole.listen == listen  # disabled: no clash
    with pytest.raises(ConfigError) as info:
        load_config(overrides={**overrides, "manhole.enabled": True})
    assert str(info.value) == (
        f'manhole.listen: "{listen}" uses the same port as smtp.listen ("tcp:2525:interface=127.0.0.1")'
    )


@pytest.mark.parametrize("listen", ["tcp:2222", "tcp:2222:interface=0.0.0.0", "tcp6:2222:interface=\\:\\:"])
def test_a_manhole_off_loopback_needs_an_explicit_yes(in_tmp_dir: Path, listen: str) -> None:
    write(in_tmp_dir / "k.pub", public_key_line() + "\n")
    overrides = {"manhole.authorized_keys": "k.pub", "manhole.listen": listen, "manhole.enabled": True}
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert str(info.value).startswith("manhole.listen: ") and "is not a loopback address" in str(info.value)
    assert "manhole.allow_non_loopback = true" in str(info.value)
    assert load_config(overrides={**overrides, "manhole.allow_non_loopback": True}).manhole.listen == listen


@pytest.mark.parametrize("listen", ["tcp:2222:interface=127.0.0.1", "tcp6:2222:interface=\\:\\:1",
                                    "unix:/tmp/manhole.sock"])
def test_a_manhole_on_loopback_is_fine(in_tmp_dir: Path, listen: str) -> None:
    write(in_tmp_dir / "k.pub", public_key_line() + "\n")
    overrides = {"manhole.authorized_keys": "k.pub", "manhole.listen": listen, "manhole.enabled": True}
    assert load_config(overrides=overrides).manhole.listen == listen


def test_listeners_on_different_interfaces_may_share_a_port() -> None:
    config = load_config(
        overrides={"smtp.listen": "tcp:2525:interface=127.0.0.1", "pop3.listen": "tcp:2525:interface=127.0.0.2"}
    )
    assert config.pop3.listen == ("tcp:2525:interface=127.0.0.2",)


def test_cassandra_section_is_checked_even_with_the_embedded_backend() -> None:
    with pytest.raises(ConfigError, match=r"^store\.cassandra\.port: "):
        load_config(overrides={"store.backend": "embedded", "store.cassandra.port": "9042"})


# ---------------------------------------------------------------------------
# twistd mailcluster options


def parse(*args: str) -> MailClusterOptions:
    options = MailClusterOptions()
    options.parseOptions(list(args))
    return options


def test_options_without_arguments_give_the_defaults() -> None:
    assert parse().config == load_config()


def test_repeated_listener_options_replace_the_configured_list(in_tmp_dir: Path) -> None:
    path = write(in_tmp_dir / "c.toml", '[smtp]\nlisten = ["tcp:2800", "tcp:2801"]\n[pop3]\nlisten = "tcp:2802"\n')
    config = parse("--config", str(path), "--smtp", "tcp:2900", "-s", "tcp:2901", "--imap", "tcp:2903").config
    assert config.smtp.listen == ("tcp:2900", "tcp:2901")
    assert config.pop3.listen == ("tcp:2802",)
    assert config.imap.listen == ("tcp:2903",)


def test_no_protocol_flags_empty_the_listeners() -> None:
    config = parse("--no-smtp", "--no-pop3", "--no-imap").config
    assert (config.smtp.listen, config.pop3.listen, config.imap.listen) == ((), (), ())
    assert config.imap.enabled is True  # not listening is not dropping the IMAP view


def test_data_and_hostname_options_win_over_the_file(in_tmp_dir: Path) -> None:
    path = write(in_tmp_dir / "c.toml", '[server]\ndata = "/file/data"\nhostname = "file.example.org"\n')
    config = parse("-c", str(path), "--data", "cli-data", "-H", "cli.example.org").config
    assert config.data_dir == in_tmp_dir / "cli-data"
    assert config.hostname == "cli.example.org"


def test_protocol_and_no_protocol_together_is_a_usage_error() -> None:
    with pytest.raises(usage.UsageError) as info:
        parse("--pop3", "tcp:2110", "--no-pop3")
    assert str(info.value) == "--pop3 and --no-pop3 cannot be used together"


def test_bad_listener_option_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigRefused) as info:
        parse("--smtp", "tcp:nope")
    assert str(info.value) == (
        "smtp.listen: invalid endpoint \"tcp:nope\": invalid literal for int() with base 10: 'nope'"
    )
    assert info.value.code == 1
    assert capsys.readouterr().err == f"twistd mailcluster: {info.value}\n"


def test_bad_config_file_is_refused(in_tmp_dir: Path) -> None:
    path = write(in_tmp_dir / "c.toml", "[smtp]\nmax_message_size = -5\n")
    with pytest.raises(ConfigRefused) as info:
        parse("--config", str(path))
    assert str(info.value) == "smtp.max_message_size: must be a positive integer, got -5"


def test_options_accept_the_cassandra_backend(in_tmp_dir: Path) -> None:
    path = write(in_tmp_dir / "c.toml", '[store]\nbackend = "cassandra"\n[imap]\nenabled = false\n')
    config = parse("--config", str(path)).config
    assert (config.store.backend, config.imap.enabled, config.imap.listen) == ("cassandra", False, ())


FAKE_PLUGIN = '''
from pathlib import Path
from zope.interface import implementer
from twisted.application.service import IServiceMaker, MultiService
from twisted.plugin import IPlugin
from twisted_mail_cluster.options import MailClusterOptions

@implementer(IServiceMaker, IPlugin)
class _Maker:
    tapname = "mailcluster-optionstest"
    description = "options test double of the mailcluster plugin"
    options = MailClusterOptions

    def makeService(self, options):
        Path("makeService-was-called").touch()
        return MultiService()

maker = _Maker()
'''


def test_twistd_reports_a_config_error_in_one_line_and_exits_non_zero(in_tmp_dir: Path) -> None:
    """The real twistd, with a stand-in plugin using MailClusterOptions.

    Our postOptions runs inside twistd's parseOptions; ConfigRefused is a
    SystemExit that twisted/application/app.py ``run`` does not catch, so
    the process ends there - before runApp, so before makeService and
    before any port.
    """
    plugins = in_tmp_dir / "pluginpath" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "mailcluster_optionstest.py").write_text(FAKE_PLUGIN)
    twistd = Path(sys.executable).with_name("twistd")
    env = {**os.environ, "PYTHONPATH": str(in_tmp_dir / "pluginpath")}
    result = subprocess.run(
        [str(twistd), "-n", "--pidfile=", "mailcluster-optionstest", "--smtp", "tcp:nope"],
        cwd=in_tmp_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "twistd mailcluster: smtp.listen: invalid endpoint \"tcp:nope\": "
        "invalid literal for int() with base 10: 'nope'\n"
    )
    assert result.stdout == ""  # no usage text burying the one line that matters
    assert not (in_tmp_dir / "makeService-was-called").exists()


def test_smtp_postmaster_is_an_address(in_tmp_dir: Path) -> None:
    good = load_config(write(in_tmp_dir / "g.toml", '[smtp]\npostmaster = "Admin@Example.org"\n'))
    assert good.smtp.postmaster == "admin@example.org"
    assert load_config().smtp.postmaster is None
    with pytest.raises(ConfigError) as info:
        load_config(write(in_tmp_dir / "b.toml", '[smtp]\npostmaster = "not an address"\n'))
    assert str(info.value) == 'smtp.postmaster: must be a mail address such as admin@example.org, got "not an address"'


def test_the_rabbitmq_bus_is_available() -> None:
    config = load_config(overrides={"events.bus": "rabbitmq", "events.rabbitmq.url": "amqp://u:p@127.0.0.1:5673/mc"})
    assert (config.events.bus, config.events.rabbitmq.url) == ("rabbitmq", "amqp://u:p@127.0.0.1:5673/mc")
