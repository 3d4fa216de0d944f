"""``[store.cassandra] tls``/``tls_ca_file`` and ``[events.rabbitmq]`` amqps:// + ``ca_file``.

The CA files are read when the configuration loads, so that a node which
could not verify its peers stops before it opens a port, with one line that
names the key.  The links themselves are tested in tests/unit/test_tls/client.py
(real handshakes on loopback) and tests/integration/test_tls_links.py (the
real servers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.tools import load_tool
from twisted_mail_cluster.config import CassandraConfig, ConfigError, RabbitConfig, load_config

test_ca = load_tool("test_ca.py", "mailcluster_test_ca")

AMQPS = "amqps://u:p@rabbit.example.org/mail"


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    return Path(test_ca.ensure_ca(tmp_path / "ca"))


def cassandra(**keys: object) -> CassandraConfig:
    return load_config(overrides={f"store.cassandra.{k}": v for k, v in keys.items()}).store.cassandra


def rabbit(**keys: object) -> RabbitConfig:
    return load_config(overrides={f"events.rabbitmq.{k}": v for k, v in keys.items()}).events.rabbitmq


def refused(**overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={k.replace("__", "."): v for k, v in overrides.items()})
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults


def test_links_are_clear_text_by_default() -> None:
    config = load_config()
    assert (config.store.cassandra.tls, config.store.cassandra.tls_ca_file) == (False, None)
    assert config.events.rabbitmq.ca_file is None
    assert config.events.rabbitmq.url.startswith("amqp://")


# -- Cassandra


def test_cassandra_tls_with_the_system_trust_store() -> None:
    assert (cassandra(tls=True).tls, cassandra(tls=True).tls_ca_file) == (True, None)


def test_cassandra_tls_ca_file_is_absolute(in_tmp_dir: Path, ca_file: Path) -> None:
    relative = os.path.relpath(ca_file, in_tmp_dir)
    assert cassandra(tls=True, tls_ca_file=relative).tls_ca_file == ca_file


def test_cassandra_tls_ca_file_may_hold_several_certificates(tmp_path: Path, ca_file: Path) -> None:
    other = Path(test_ca.ensure_ca(tmp_path / "other", name="other CA"))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"# two CAs\n" + ca_file.read_bytes() + other.read_bytes())
    assert cassandra(tls=True, tls_ca_file=str(bundle)).tls_ca_file == bundle


def test_cassandra_tls_must_be_a_boolean() -> None:
    assert refused(store__cassandra__tls="yes") == 'store.cassandra.tls: must be true or false, got "yes"'


def test_cassandra_tls_ca_file_without_tls_is_refused(ca_file: Path) -> None:
    assert refused(store__cassandra__tls_ca_file=str(ca_file)) == (
        "store.cassandra.tls_ca_file: is only used with store.cassandra.tls = true"
    )


def test_cassandra_tls_ca_file_missing(in_tmp_dir: Path) -> None:
    assert refused(store__cassandra__tls=True, store__cassandra__tls_ca_file="nope.pem") == (
        f"store.cassandra.tls_ca_file: file not found: {in_tmp_dir / 'nope.pem'}"
    )


def test_cassandra_tls_ca_file_unreadable(in_tmp_dir: Path) -> None:
    (in_tmp_dir / "dir.pem").mkdir()
    assert refused(store__cassandra__tls=True, store__cassandra__tls_ca_file="dir.pem") == (
        f"store.cassandra.tls_ca_file: cannot read {in_tmp_dir / 'dir.pem'}: Is a directory"
    )


def test_cassandra_tls_ca_file_without_a_certificate(in_tmp_dir: Path) -> None:
    (in_tmp_dir / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert refused(store__cassandra__tls=True, store__cassandra__tls_ca_file="key.pem") == (
        "store.cassandra.tls_ca_file: no PEM certificate (-----BEGIN CERTIFICATE-----) in "
        f"{in_tmp_dir / 'key.pem'}"
    )


def test_cassandra_tls_ca_file_with_a_broken_certificate(in_tmp_dir: Path) -> None:
    (in_tmp_dir / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    message = refused(store__cassandra__tls=True, store__cassandra__tls_ca_file="bad.pem")
    assert message.startswith(f"store.cassandra.tls_ca_file: unreadable PEM certificate in {in_tmp_dir / 'bad.pem'}")


def test_cassandra_tls_ca_file_is_checked_even_with_the_embedded_backend() -> None:
    message = refused(store__backend="embedded", store__cassandra__tls=True, store__cassandra__tls_ca_file="x.pem")
    assert message.startswith("store.cassandra.tls_ca_file: file not found: ")


def test_cassandra_tls_in_a_file(in_tmp_dir: Path, ca_file: Path) -> None:
    path = in_tmp_dir / "c.toml"
    path.write_text(f'[store]\nbackend = "cassandra"\n[store.cassandra]\ntls = true\ntls_ca_file = "{ca_file}"\n')
    config = load_config(path).store.cassandra
    assert (config.tls, config.tls_ca_file) == (True, ca_file)


# -- RabbitMQ


def test_amqps_url_is_accepted() -> None:
    assert rabbit(url=AMQPS) == RabbitConfig(url=AMQPS, ca_file=None)


def test_amqps_with_a_ca_file(ca_file: Path) -> None:
    assert rabbit(url=AMQPS, ca_file=str(ca_file)) == RabbitConfig(url=AMQPS, ca_file=ca_file)


def test_rabbitmq_ca_file_with_amqp_is_refused(ca_file: Path) -> None:
    assert refused(events__rabbitmq__ca_file=str(ca_file)) == (
        "events.rabbitmq.ca_file: is only used with an amqps:// events.rabbitmq.url"
    )


def test_rabbitmq_ca_file_missing(in_tmp_dir: Path) -> None:
    assert refused(events__rabbitmq__url=AMQPS, events__rabbitmq__ca_file="ca.pem") == (
        f"events.rabbitmq.ca_file: file not found: {in_tmp_dir / 'ca.pem'}"
    )


def test_rabbitmq_ca_file_must_be_a_path() -> None:
    assert refused(events__rabbitmq__url=AMQPS, events__rabbitmq__ca_file=3) == (
        "events.rabbitmq.ca_file: must be a path, got 3"
    )


def test_rabbitmq_ca_file_typo_is_named() -> None:
    assert refused(events__rabbitmq__cafile="x") == (
        "events.rabbitmq.cafile: unknown key (did you mean 'ca_file'?)"
    )
