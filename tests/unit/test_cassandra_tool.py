"""tools/cassandra.py without Java: configuration files, JVM flags, the CQL
framing of its readiness check, the fetch stamp, node bookkeeping.
tests/integration/test_cassandra_node.py runs the real thing."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.cassandra_cluster import TOOL_PATH, tool, two_dc_addresses


@pytest.fixture
def lib_dir(tmp_path: Path) -> Path:
    """A lib folder as a fetch leaves it (empty jars, a valid stamp)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    jars = [f"cassandra-all-{tool.CASSANDRA_VERSION}.jar", "jamm-0.4.0.jar", "netty-all-4.1.130.Final.jar"]
    for name in jars:
        (lib / name).write_bytes(b"")
    (lib / tool.STAMP_NAME).write_text(json.dumps({"pom_sha256": tool._pom_digest(), "jars": jars}))
    return lib


def make_node(tmp_path: Path, lib_dir: Path, **kwargs) -> "tool.CassandraNode":
    kwargs.setdefault("name", "n1")
    return tool.CassandraNode(base=tmp_path / "nodes", lib_dir=lib_dir, **kwargs)


def top_level_yaml(text: str) -> dict[str, str]:
    """key -> raw value of the top-level 'key: value' lines."""
    out = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            assert key not in out, f"duplicate key {key}"
            out[key] = value.strip()
    return out


# -- cassandra.yaml


def test_yaml_has_the_node_identity_and_test_settings(tmp_path: Path) -> None:
    text = tool.render_cassandra_yaml(
        cluster_name="mc-test", address="127.0.0.2", seeds=["127.0.0.2", "127.0.0.3"],
        node_dir=tmp_path / "n2",
    )
    y = top_level_yaml(text)
    assert json.loads(y["cluster_name"]) == "mc-test"
    assert y["listen_address"] == y["rpc_address"] == "127.0.0.2"
    assert y["native_transport_port"] == "9042"
    assert y["storage_port"] == "7000"
    assert y["endpoint_snitch"] == "GossipingPropertyFileSnitch"
    assert y["num_tokens"] == "16"
    assert y["allocate_tokens_for_local_replication_factor"] == "1"
    assert y["start_native_transport"] == "true"
    assert y["auto_snapshot"] == "false"
    assert y["cdc_enabled"] == "false"
    assert y["user_defined_functions_enabled"] == "false"
    assert y["materialized_views_enabled"] == "false"
    assert y["commitlog_sync"] == "periodic"
    assert '- seeds: "127.0.0.2:7000,127.0.0.3:7000"' in text
    for key in ("commitlog_directory", "saved_caches_directory", "hints_directory", "cdc_raw_directory"):
        assert json.loads(y[key]).startswith(str(tmp_path / "n2") + "/")
    assert f'  - "{tmp_path / "n2" / "data"}"' in text
    # 5.0 names only: the old *_in_mb / *_in_ms spellings are deprecated
    assert not [k for k in y if k.endswith(("_in_mb", "_in_ms", "_in_kb"))]
    assert "scripted_user_defined_functions_enabled" not in y


def test_yaml_quotes_strings_safely(tmp_path: Path) -> None:
    text = tool.render_cassandra_yaml(
        cluster_name='odd: "name" #1', address="127.0.0.1", seeds=["127.0.0.1"], node_dir=tmp_path / "a b",
    )
    y = top_level_yaml(text)
    assert json.loads(y["cluster_name"]) == 'odd: "name" #1'
    assert json.loads(y["commitlog_directory"]) == str(tmp_path / "a b" / "commitlog")


def test_seed_with_explicit_port_is_kept(tmp_path: Path) -> None:
    text = tool.render_cassandra_yaml(
        cluster_name="c", address="127.0.0.1", seeds=["127.0.0.9:7010"], node_dir=tmp_path, storage_port=7010,
    )
    assert '- seeds: "127.0.0.9:7010"' in text
    assert top_level_yaml(text)["storage_port"] == "7010"


def test_rackdc_and_logback() -> None:
    assert tool.render_rackdc("dc2", "rack1").splitlines()[1:] == ["dc=dc2", "rack=rack1"]
    root = ET.fromstring(tool.render_logback())
    classes = {a.get("class") for a in root.iter("appender")}
    assert "ch.qos.logback.core.ConsoleAppender" not in classes  # nothing on stdout
    files = [f.text for f in root.iter("file")]
    assert files == ["${cassandra.logdir}/system.log", "${cassandra.logdir}/warn.log"]


# -- JVM command line


def test_jvm_args(tmp_path: Path, lib_dir: Path) -> None:
    node = make_node(tmp_path, lib_dir, address="127.0.0.3", heap="1G")
    args = node.jvm_args()
    assert "-Xmx1G" in args and "-Xms256M" in args
    assert f"-javaagent:{lib_dir / 'jamm-0.4.0.jar'}" in args
    assert "-Dcassandra.jmx.local.port=7201" in args
    assert f"-Dcassandra.config=file://{node.conf_dir}/cassandra.yaml" in args
    assert f"-Dcassandra.storagedir={node.dir}" in args
    assert f"-Dcassandra.logdir={node.log_dir}" in args
    assert f"-Dlogback.configurationFile=file://{node.conf_dir}/logback.xml" in args
    assert "-Djava.net.preferIPv4Stack=true" in args
    assert "-Dcassandra.skip_wait_for_gossip_to_settle=0" in args
    assert "-XX:+AlwaysPreTouch" not in args
    # the JPMS flags of jvm17-server.options come in pairs
    pairs = {(a, b) for a, b in zip(args, args[1:]) if a in ("--add-exports", "--add-opens")}
    assert ("--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED") in pairs
    assert ("--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED") in pairs
    assert ("--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED") in pairs
    assert len(pairs) == tool.JVM17_MODULE_FLAGS.count("--add-exports") + tool.JVM17_MODULE_FLAGS.count("--add-opens")


def test_command_runs_the_daemon_with_conf_first_on_the_classpath(tmp_path: Path, lib_dir: Path) -> None:
    node = make_node(tmp_path, lib_dir)
    cmd = node.command()
    assert cmd[-1] == "org.apache.cassandra.service.CassandraDaemon"
    cp = cmd[cmd.index("-cp") + 1].split(os.pathsep)
    assert cp[0] == str(node.conf_dir)
    assert str(lib_dir / f"cassandra-all-{tool.CASSANDRA_VERSION}.jar") in cp


def test_heap_sizes(tmp_path: Path, lib_dir: Path) -> None:
    assert tool.parse_size("1G") == 2**30 and tool.parse_size("512m") == 2**29 and tool.parse_size("4096") == 4096
    small = make_node(tmp_path, lib_dir, heap="128M")
    assert "-Xms128M" in small.jvm_args()  # -Xms never above -Xmx
    extra = make_node(tmp_path, lib_dir, jvm_extra=["-Xms1G"])
    assert extra.jvm_args()[-1] == "-Xms1G"  # extra options come last and win
    with pytest.raises(tool.CassandraToolError):
        make_node(tmp_path, lib_dir, heap="lots")


def test_missing_jamm_is_a_clear_error(tmp_path: Path) -> None:
    node = make_node(tmp_path, tmp_path)
    with pytest.raises(tool.CassandraToolError, match="fetch"):
        node.jvm_args()


def test_jmx_ports_differ_per_loopback_address() -> None:
    assert tool.default_jmx_port("127.0.0.1") == 7199
    assert tool.default_jmx_port("127.0.0.2") == 7200
    assert tool.default_jmx_port("127.0.0.3") == 7201


# -- node directory and bookkeeping


def test_write_config_creates_the_node_directory(tmp_path: Path, lib_dir: Path) -> None:
    node = make_node(tmp_path, lib_dir, name="x", address="127.0.0.4", dc="dc2", cluster_name="cx")
    node.write_config()
    for sub in ("conf", "data", "commitlog", "saved_caches", "hints", "logs"):
        assert (node.dir / sub).is_dir()
    assert "dc=dc2" in (node.conf_dir / "cassandra-rackdc.properties").read_text()
    again = tool.CassandraNode.load("x", tmp_path / "nodes")
    assert (again.address, again.dc, again.cluster_name, again.seeds) == ("127.0.0.4", "dc2", "cx", ("127.0.0.4",))
    assert [n.name for n in tool.CassandraNode.all(tmp_path / "nodes")] == ["x"]


def test_pid_ignores_processes_that_are_not_the_node(tmp_path: Path, lib_dir: Path) -> None:
    node = make_node(tmp_path, lib_dir)
    node.write_config()
    assert node.pid() is None
    node.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not this node's JVM
    assert node.pid() is None
    assert node.stop() is False  # and so never signalled
    assert not node.pid_file.exists()


def test_two_dc_cluster_nodes_are_all_seeds() -> None:
    nodes = tool.two_dc_cluster(addresses=("127.0.0.2", "127.0.0.3"), names=("a", "b"), cluster_name="c2")
    assert [(n.name, n.address, n.dc) for n in nodes] == [("a", "127.0.0.2", "dc1"), ("b", "127.0.0.3", "dc2")]
    assert all(n.seeds == ("127.0.0.2", "127.0.0.3") and n.cluster_name == "c2" for n in nodes)
    assert len({n.jmx_port for n in nodes}) == 2


def test_test_clusters_do_not_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    assert two_dc_addresses() == ("127.0.0.2", "127.0.0.3")
    monkeypatch.setenv("MAILCLUSTER_TEST_CASSANDRA_TWO_DC", "127.0.0.1,127.0.0.2")
    with pytest.raises(tool.CassandraToolError):
        two_dc_addresses()


def test_start_options_default_to_the_saved_node(tmp_path: Path, lib_dir: Path) -> None:
    base = tmp_path / "nodes"
    tool.CassandraNode("n2", address="127.0.0.2", dc="dc2", seeds=("127.0.0.1", "127.0.0.2"),
                       base=base, lib_dir=lib_dir).write_config()
    parser_args = dict(address=None, dc=None, rack=None, cluster_name=None, heap="2G",
                       jmx_port=None, seeds=None, initial_heap=None, jvm_extra=None, tls=False, no_tls=False)
    node = tool._node_from_args(argparse.Namespace(name="n2", **parser_args), base)
    assert (node.address, node.dc, node.seeds, node.heap) == ("127.0.0.2", "dc2", ("127.0.0.1", "127.0.0.2"), "2G")
    fresh = tool._node_from_args(argparse.Namespace(name="new", **parser_args), base)
    assert (fresh.address, fresh.dc, fresh.seeds) == ("127.0.0.1", "dc1", ("127.0.0.1",))


# -- fetch stamp


def test_fetch_stamp(lib_dir: Path, tmp_path: Path) -> None:
    assert tool.is_fetched(lib_dir)
    assert tool.ensure_fetched(lib_dir) == lib_dir  # no Maven run
    assert not tool.is_fetched(tmp_path / "nowhere")
    (lib_dir / "netty-all-4.1.130.Final.jar").unlink()
    assert not tool.is_fetched(lib_dir)  # a jar went missing


def test_fetch_stamp_of_another_pom_is_stale(lib_dir: Path) -> None:
    stamp = lib_dir / tool.STAMP_NAME
    stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "pom_sha256": "0" * 64}))
    assert not tool.is_fetched(lib_dir)


def test_fetch_without_maven_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tool.shutil, "which", lambda name: None)
    with pytest.raises(tool.CassandraToolError, match="install-test-deps"):
        tool.ensure_fetched(tmp_path / "lib")


def test_pom_asks_for_cassandra_all() -> None:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(tool.POM).getroot()
    deps = [(d.findtext("m:groupId", namespaces=ns), d.findtext("m:artifactId", namespaces=ns))
            for d in root.iterfind("m:dependencies/m:dependency", ns)]
    assert deps == [("org.apache.cassandra", "cassandra-all")]
    assert root.findtext("m:properties/m:cassandra.version", namespaces=ns) == tool.CASSANDRA_VERSION


# -- the CQL v4 framing of the readiness check


def test_frame_header() -> None:
    frame = tool.encode_frame(0x05, b"", stream=7)
    assert frame == bytes([0x04, 0, 0, 7, 0x05, 0, 0, 0, 0])


def _string(s: str) -> bytes:
    return struct.pack(">H", len(s)) + s.encode()


def _cell(b: bytes | None) -> bytes:
    return struct.pack(">i", -1) if b is None else struct.pack(">i", len(b)) + b


def test_decode_rows() -> None:
    host = uuid.uuid4()
    tokens = _cell(b"a") + _cell(b"bc")
    body = (
        struct.pack(">iii", 2, 0x0001, 5)  # Rows, global table spec, 5 columns
        + _string("system") + _string("peers_v2")
        + _string("peer") + struct.pack(">H", 0x0010)
        + _string("data_center") + struct.pack(">H", 0x000D)
        + _string("host_id") + struct.pack(">H", 0x000C)
        + _string("tokens") + struct.pack(">HH", 0x0022, 0x000D)
        + _string("n") + struct.pack(">H", 0x0002)
        + struct.pack(">i", 1)
        + _cell(bytes([127, 0, 0, 2])) + _cell(b"dc2") + _cell(host.bytes)
        + _cell(struct.pack(">i", 2) + tokens) + _cell(None)
    )
    assert tool.decode_rows(body) == [
        {"peer": "127.0.0.2", "data_center": "dc2", "host_id": host, "tokens": {"a", "bc"}, "n": None}
    ]
    assert tool.decode_rows(struct.pack(">i", 1)) == []  # Void result


def test_cql_answers_is_false_without_a_server() -> None:
    assert tool.cql_answers("127.0.0.1", 1, timeout=0.5) is False


# -- command line


def test_cli_status_and_help(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(TOOL_PATH), "--base", str(tmp_path), "status"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "no nodes" in run.stdout
    run = subprocess.run([sys.executable, str(TOOL_PATH), "--help"], capture_output=True, text=True, timeout=60)
    for word in ("fetch", "start", "stop", "stop-all", "status", "cluster"):
        assert word in run.stdout
    run = subprocess.run([sys.executable, str(TOOL_PATH), "--base", str(tmp_path), "stop", "--name", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "no node 'nope'" in run.stderr


# -- TLS (start --tls): client_encryption_options with PEM files of the test CA


@pytest.fixture
def test_ca_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test CA of tools/test_ca.py, in a folder of the test's own."""
    ca_dir = tmp_path / "test-ca"
    monkeypatch.setattr(tool.load_test_ca(), "DEFAULT_CA_DIR", ca_dir)
    return ca_dir


def test_yaml_with_tls_serves_cql_with_tls_only(tmp_path: Path) -> None:
    text = tool.render_cassandra_yaml(cluster_name="c", address="127.0.0.9", seeds=["127.0.0.9"],
                                      node_dir=tmp_path, tls=(tmp_path / "k.pem", tmp_path / "ca.pem"))
    block = text.split("client_encryption_options:\n", 1)[1]
    settings = dict(line.strip().split(": ", 1) for line in block.splitlines() if ": " in line)
    assert settings["enabled"] == "true" and settings["optional"] == "false"
    assert settings["require_client_auth"] == "false"
    assert settings["class_name"] == "org.apache.cassandra.security.PEMBasedSslContextFactory"
    assert settings["keystore"] == json.dumps(str(tmp_path / "k.pem"))
    assert settings["truststore"] == json.dumps(str(tmp_path / "ca.pem"))
    assert settings["accepted_protocols"] == "[TLSv1.3, TLSv1.2]"
    assert "client_encryption_options" not in tool.render_cassandra_yaml(
        cluster_name="c", address="127.0.0.1", seeds=["127.0.0.1"], node_dir=tmp_path)


def test_tls_node_gets_a_certificate_for_its_address(tmp_path: Path, lib_dir: Path, test_ca_dir: Path) -> None:
    from cryptography import x509

    node = make_node(tmp_path, lib_dir, address="127.0.0.9", tls=True)
    node.write_config()
    yaml = (node.conf_dir / "cassandra.yaml").read_text()
    keystore = node.tls_dir / "server-keystore.pem"
    assert f"keystore: {json.dumps(str(keystore))}" in yaml
    assert stat_mode(keystore) == 0o600 and stat_mode(node.tls_dir / "server.key") == 0o600
    assert stat_mode(test_ca_dir / "ca.key") == 0o600
    pem = keystore.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----") and pem.count(b"BEGIN CERTIFICATE") == 2
    server, ca = x509.load_pem_x509_certificates((node.tls_dir / "server.pem").read_bytes())
    assert node.ca_file.read_bytes() == (test_ca_dir / "ca.pem").read_bytes()
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(node.ca_file.read_bytes()))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.9"]
    assert json.loads((node.dir / "node.json").read_text())["tls"] is True
    assert tool.CassandraNode.load("n1", node.base).tls is True
    node.write_config()  # a second start keeps the certificate that still fits
    assert x509.load_pem_x509_certificates((node.tls_dir / "server.pem").read_bytes())[0] == server
    assert node.is_up(timeout=0.5) is False  # nothing runs there


def test_tls_node_is_not_up_before_its_first_start(tmp_path: Path, lib_dir: Path) -> None:
    assert make_node(tmp_path, lib_dir, address="127.0.0.9", tls=True).is_up(timeout=0.5) is False


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
