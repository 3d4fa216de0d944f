#!/usr/bin/env python3
"""Obtain, configure, start and stop a real Apache Cassandra 5.0 for tests,
CI and the one-machine demo.

Standard library only: usable as a command-line tool and as a module
(``tests/cassandra_cluster.py`` imports it).

How it works
------------
* ``fetch``: Maven resolves ``org.apache.cassandra:cassandra-all`` and its
  runtime dependencies (``tools/cassandra/pom.xml``) and copies the jars into
  ``.cache/cassandra/lib``.  A stamp file (the pom's SHA-256) makes a second
  call a no-op.
* ``start``: writes a node directory (``conf/``, ``data/``, ``commitlog/``,
  ``saved_caches/``, ``hints/``, ``cdc_raw/``, ``logs/``) with our own
  ``cassandra.yaml``, ``cassandra-rackdc.properties`` and ``logback.xml``, then
  runs ``java ... org.apache.cassandra.service.CassandraDaemon`` in the
  background with the JPMS flags of Cassandra's ``jvm17-server.options`` and
  the jamm agent, writes its PID, and waits until the node answers a CQL
  STARTUP on ``address:9042``.
* ``stop`` sends SIGTERM (Cassandra drains), then SIGKILL after a timeout.
* ``start --tls``: the node serves CQL with TLS only (client-to-node
  encryption, ``optional: false``), with a certificate of the test CA of
  ``tools/test_ca.py`` for its address (an IP subjectAltName), in PEM files
  read by Cassandra's ``PEMBasedSslContextFactory``.  Making the certificate
  needs the ``cryptography`` package (the project's venv); the tool's own
  CQL client then speaks TLS to the node, verifying it with
  ``nodes/NAME/tls/ca.pem``.

The settings are for tests and demos on one machine (small caches, periodic
commit log sync, no authentication).  Operators run their own Cassandra.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

CASSANDRA_VERSION = "5.0.9"
MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"
NODETOOL_CLASS = "org.apache.cassandra.tools.NodeTool"

REPO_ROOT = Path(__file__).resolve().parent.parent
POM = REPO_ROOT / "tools" / "cassandra" / "pom.xml"
CACHE_DIR = Path(
    os.environ.get("MAILCLUSTER_CASSANDRA_CACHE", REPO_ROOT / ".cache" / "cassandra")
).resolve()
LIB_DIR = CACHE_DIR / "lib"
DEFAULT_BASE = CACHE_DIR / "nodes"
STAMP_NAME = ".fetched"

DEFAULT_CLUSTER_NAME = "mailcluster"
DEFAULT_HEAP = "1G"
# -Xms: the heap starts small and grows to -Xmx under load.  Cassandra locks
# its memory at start (mlockall, which succeeds as root), so -Xms equal to
# -Xmx would make every idle test node resident at its whole heap.
DEFAULT_INITIAL_HEAP = "256M"
NATIVE_PORT = 9042
STORAGE_PORT = 7000
JMX_BASE_PORT = 7199
DEFAULT_START_TIMEOUT = 180.0
DEFAULT_STOP_TIMEOUT = 60.0

# Java 17 module-system flags, as in Cassandra 5.0's conf/jvm17-server.options
# (the "JPMS" section).  Cassandra reaches into JDK internals (jamm, Netty,
# Chronicle, the attach API); without these it fails at start-up.
JVM17_MODULE_FLAGS = (
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED",
)

# General JVM settings after Cassandra's jvm-server.options and
# jvm17-server.options, minus what only matters for big production heaps
# (-XX:+AlwaysPreTouch would make every test node resident at its full heap).
JVM_GENERAL_FLAGS = (
    "-ea",
    "-da:net.openhft...",
    "-XX:+UseThreadPriorities",
    # a node out of heap stops (Cassandra's start-up check asks for it); no
    # heap dump: a test node's would be a gigabyte on the CI disk
    "-XX:+ExitOnOutOfMemoryError",
    "-Xss256k",
    "-XX:+UseTLAB",
    "-XX:+ResizeTLAB",
    "-XX:+PerfDisableSharedMem",
    "-XX:+UseG1GC",
    "-XX:+ParallelRefProcEnabled",
    "-XX:MaxTenuringThreshold=1",
    "-XX:G1RSetUpdatingPauseTimePercent=5",
    "-XX:MaxGCPauseMillis=300",
    "-XX:InitiatingHeapOccupancyPercent=70",
    "-Djava.net.preferIPv4Stack=true",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
)

# Start-up shortcuts for throw-away test nodes.  All our nodes are seeds, so
# none bootstraps (streams data) and the ring delay only bounds the waits
# gossip does at start.
JVM_FAST_START_FLAGS = (
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    "-Dcassandra.ring_delay_ms=1000",
    "-Dcassandra.superuser_setup_delay_ms=0",
)


class CassandraToolError(Exception):
    """A failure the user can act on; the message says what to do."""


# ---------------------------------------------------------------------------
# fetch


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _stamp_path(lib_dir: Path) -> Path:
    return lib_dir / STAMP_NAME


def jamm_jar(lib_dir: Path = LIB_DIR) -> Path:
    jars = sorted(lib_dir.glob("jamm-*.jar"))
    if not jars:
        raise CassandraToolError(
            f"no jamm agent jar in {lib_dir}; run: python3 tools/cassandra.py fetch"
        )
    return jars[-1]


def is_fetched(lib_dir: Path = LIB_DIR) -> bool:
    """True when ``lib_dir`` holds a complete fetch of the current pom."""
    stamp = _stamp_path(lib_dir)
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("pom_sha256") != _pom_digest():
        return False
    return all((lib_dir / name).is_file() for name in recorded.get("jars", [])) and any(
        lib_dir.glob(f"cassandra-all-{CASSANDRA_VERSION}.jar")
    ) and any(lib_dir.glob("jamm-*.jar"))


def ensure_fetched(lib_dir: Path = LIB_DIR, *, quiet: bool = True) -> Path:
    """Download Cassandra's jars with Maven unless already there; returns lib_dir."""
    if is_fetched(lib_dir):
        return lib_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise CassandraToolError(
            "Maven (mvn) is not installed; run tools/install-test-deps "
            "(Debian: apt-get install maven openjdk-17-jre-headless)"
        )
    if lib_dir.exists():
        shutil.rmtree(lib_dir)  # no stale jars from an older pom on the classpath
    tmp = lib_dir.with_name(lib_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    cmd = [
        mvn, "-B", "-f", str(POM), "dependency:copy-dependencies",
        # an absolute path: Maven resolves relative ones against the pom's folder
        f"-DoutputDirectory={tmp}",
        "-DincludeScope=runtime",
    ]
    if quiet:
        cmd.insert(1, "-q")
    result = subprocess.run(cmd, capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = ((result.stdout or "") + (result.stderr or ""))[-4000:] if quiet else ""
        raise CassandraToolError(f"mvn failed ({result.returncode}): {' '.join(cmd)}\n{detail}")
    jars = sorted(p.name for p in tmp.glob("*.jar"))
    if not any(name == f"cassandra-all-{CASSANDRA_VERSION}.jar" for name in jars):
        raise CassandraToolError(f"mvn ran but cassandra-all-{CASSANDRA_VERSION}.jar is not in {tmp}")
    jamm_jar(tmp)
    _stamp_path(tmp).write_text(
        json.dumps({"pom_sha256": _pom_digest(), "version": CASSANDRA_VERSION, "jars": jars}, indent=1)
    )
    tmp.rename(lib_dir)
    return lib_dir


def classpath(conf_dir: Path, lib_dir: Path = LIB_DIR) -> str:
    # conf first: Cassandra finds logback.xml and cassandra-rackdc.properties there
    return os.pathsep.join([str(conf_dir)] + [str(p) for p in sorted(lib_dir.glob("*.jar"))])


def java_executable() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise CassandraToolError(
            "Java 17 is not installed; run tools/install-test-deps "
            "(Debian: apt-get install openjdk-17-jre-headless)"
        )
    return java


# ---------------------------------------------------------------------------
# configuration files


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(str(value))


def parse_size(size: str) -> int:
    """A JVM memory size ("512M", "1G", "1048576k") in bytes."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = str(size).strip().upper()
    unit = text[-1] if text and text[-1] in "KMGT" else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit():
        raise CassandraToolError(f"not a JVM memory size: {size!r} (e.g. 512M, 1G)")
    return int(number) * units[unit]


def default_jmx_port(address: str) -> int:
    """7199 for 127.0.0.1, 7200 for 127.0.0.2, ...: JMX listens on 127.0.0.1
    whatever the node's address, so nodes on one machine need distinct ports."""
    try:
        last = int(address.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return JMX_BASE_PORT
    return JMX_BASE_PORT + max(last - 1, 0)


def render_client_encryption(keystore: Path, truststore: Path) -> str:
    """cassandra.yaml's client-to-node TLS: TLS only, PEM files, TLS 1.3 and 1.2.

    ``keystore`` holds the private key (PKCS#8, unencrypted, so no
    ``keystore_password``) followed by the certificate chain;
    ``truststore`` the CA certificates, which PEMBasedSslContextFactory
    requires even though clients are not asked for a certificate.
    """
    return f"""
# Client-to-node TLS (tools/cassandra.py --tls): CQL on this address speaks TLS only.
client_encryption_options:
  enabled: true
  optional: false
  require_client_auth: false
  ssl_context_factory:
    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory
  keystore: {_q(keystore)}
  truststore: {_q(truststore)}
  accepted_protocols: [TLSv1.3, TLSv1.2]
"""


def render_cassandra_yaml(
    *,
    cluster_name: str,
    address: str,
    seeds: Sequence[str],
    node_dir: Path,
    num_tokens: int = 16,
    local_replication_factor: int = 1,
    native_port: int = NATIVE_PORT,
    storage_port: int = STORAGE_PORT,
    tls: tuple[Path, Path] | None = None,
) -> str:
    """``tls``: (keystore, truststore) PEM files for client_encryption_options; None: clear text."""
    seed_list = ",".join(f"{s}:{storage_port}" if ":" not in s else s for s in seeds)
    d = node_dir
    return f"""\
# Written by tools/cassandra.py for a TEST / DEMO node; regenerated at every start.
# Not a production configuration: no authentication, small caches, and
# periodic commit log sync (a crash can lose the last 10 s of acknowledged writes).
cluster_name: {_q(cluster_name)}
num_tokens: {num_tokens}
allocate_tokens_for_local_replication_factor: {local_replication_factor}
partitioner: org.apache.cassandra.dht.Murmur3Partitioner

seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: {_q(seed_list)}
listen_address: {address}
rpc_address: {address}
storage_port: {storage_port}
native_transport_port: {native_port}
start_native_transport: true
endpoint_snitch: GossipingPropertyFileSnitch

data_file_directories:
  - {_q(d / "data")}
commitlog_directory: {_q(d / "commitlog")}
saved_caches_directory: {_q(d / "saved_caches")}
hints_directory: {_q(d / "hints")}
cdc_raw_directory: {_q(d / "cdc_raw")}

authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
role_manager: CassandraRoleManager
network_authorizer: AllowAllNetworkAuthorizer

# test setting: fsync every 10 s, not before acknowledging a write
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 32MiB
commitlog_total_space: 1024MiB
disk_failure_policy: stop
commit_failure_policy: stop

hinted_handoff_enabled: true
max_hint_window: 3h

# small footprint for one-machine clusters
memtable_heap_space: 128MiB
memtable_offheap_space: 128MiB
memtable_allocation_type: offheap_objects
memtable_flush_writers: 1
concurrent_reads: 8
concurrent_writes: 16
concurrent_counter_writes: 4
concurrent_compactors: 1
compaction_throughput: 64MiB/s
key_cache_size: 16MiB
row_cache_size: 0MiB
counter_cache_size: 0MiB
file_cache_size: 64MiB
networking_cache_size: 32MiB
native_transport_max_threads: 32

auto_snapshot: false
snapshot_before_compaction: false
cdc_enabled: false
materialized_views_enabled: false
sasi_indexes_enabled: false
user_defined_functions_enabled: false
""" + (render_client_encryption(*tls) if tls is not None else "")


def render_rackdc(dc: str, rack: str) -> str:
    return f"# Written by tools/cassandra.py (GossipingPropertyFileSnitch)\ndc={dc}\nrack={rack}\n"


def render_logback() -> str:
    # Nothing on the console: everything goes to files in logs/.
    return """\
<!-- Written by tools/cassandra.py: INFO to logs/system.log, WARN and above
     also to logs/warn.log; nothing on stdout. -->
<configuration scan="false">
  <appender name="SYSTEMLOG" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter"><level>INFO</level></filter>
    <file>${cassandra.logdir}/system.log</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>${cassandra.logdir}/system.log.%i.zip</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>3</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>20MB</maxFileSize>
    </triggeringPolicy>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <appender name="WARNLOG" class="ch.qos.logback.core.FileAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter"><level>WARN</level></filter>
    <file>${cassandra.logdir}/warn.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="SYSTEMLOG" />
    <appender-ref ref="WARNLOG" />
  </root>
</configuration>
"""


# ---------------------------------------------------------------------------
# a minimal CQL native protocol v4 client (readiness checks, status, demo)

_OP_ERROR, _OP_STARTUP, _OP_READY, _OP_AUTHENTICATE = 0x00, 0x01, 0x02, 0x03
_OP_OPTIONS, _OP_SUPPORTED, _OP_QUERY, _OP_RESULT = 0x05, 0x06, 0x07, 0x08
_CONSISTENCY = {"ONE": 0x0001, "QUORUM": 0x0004, "ALL": 0x0005, "LOCAL_QUORUM": 0x0006, "LOCAL_ONE": 0x000A}


class CqlError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"CQL error 0x{code:04x}: {message}")
        self.code = code


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(">H", len(b)) + b


def _string_map(m: dict[str, str]) -> bytes:
    return struct.pack(">H", len(m)) + b"".join(_string(k) + _string(v) for k, v in m.items())


def encode_frame(opcode: int, body: bytes, stream: int = 0) -> bytes:
    return struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated CQL message")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def short(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def string(self) -> str:
        return self.take(self.short()).decode("utf-8")

    def bytes(self) -> bytes | None:
        n = self.int()
        return None if n < 0 else self.take(n)

    def string_multimap(self) -> dict[str, list[str]]:
        return {self.string(): [self.string() for _ in range(self.short())] for _ in range(self.short())}

    def option(self) -> tuple:
        type_id = self.short()
        if type_id == 0x0000:
            return (type_id, self.string())
        if type_id in (0x0020, 0x0022):  # list, set
            return (type_id, self.option())
        if type_id == 0x0021:  # map
            return (type_id, self.option(), self.option())
        if type_id == 0x0031:  # tuple
            return (type_id, *[self.option() for _ in range(self.short())])
        if type_id == 0x0030:  # UDT
            self.string(), self.string()
            return (type_id, *[(self.string(), self.option())[1] for _ in range(self.short())])
        return (type_id,)


def decode_value(option: tuple, raw: bytes | None) -> Any:
    """Decode the CQL types the tool's queries need; others stay bytes."""
    if raw is None:
        return None
    t = option[0]
    if t in (0x0001, 0x000D):  # ascii, varchar
        return raw.decode("utf-8")
    if t in (0x0002, 0x0005, 0x000B):  # bigint, counter, timestamp
        return struct.unpack(">q", raw)[0]
    if t == 0x0009:
        return struct.unpack(">i", raw)[0]
    if t == 0x0004:
        return raw != b"\x00"
    if t in (0x000C, 0x000F):
        return uuid.UUID(bytes=raw)
    if t == 0x0010:
        return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    if t in (0x0020, 0x0022):
        r = _Reader(raw)
        items = [decode_value(option[1], r.bytes()) for _ in range(r.int())]
        return items if t == 0x0020 else set(items)
    if t == 0x0021:
        r = _Reader(raw)
        return {decode_value(option[1], r.bytes()): decode_value(option[2], r.bytes()) for _ in range(r.int())}
    return raw


def decode_rows(body: bytes) -> list[dict[str, Any]]:
    """Decode the body of a RESULT message; [] for non-row results."""
    r = _Reader(body)
    kind = r.int()
    if kind != 0x0002:
        return []
    flags, ncols = r.int(), r.int()
    if flags & 0x0002:  # has_more_pages
        r.bytes()
    columns: list[tuple[str, tuple]] = []
    if not flags & 0x0004:  # metadata present
        global_spec = flags & 0x0001
        if global_spec:
            r.string(), r.string()
        for _ in range(ncols):
            if not global_spec:
                r.string(), r.string()
            columns.append((r.string(), r.option()))
    rows = []
    for _ in range(r.int()):
        rows.append({name: decode_value(opt, r.bytes()) for name, opt in columns})
    return rows


def load_test_ca() -> Any:
    """tools/test_ca.py, loaded by path when TLS is asked for (it needs ``cryptography``).

    By path, as the tests load this tool: with ``tools/`` on ``sys.path``,
    ``import cassandra`` would find this file instead of cassandra-driver.
    """
    name = "mailcluster_test_ca"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_ca.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A client context that verifies a node against ``ca_file`` (chain and address)."""
    return load_test_ca().client_context(ca_file)


class CqlConnection:
    """A blocking CQL v4 connection: enough to see a node is serving and to
    run simple queries; the project itself uses cassandra-driver.
    ``ssl_context``: speak TLS (the node's certificate must name ``address``)."""

    def __init__(self, address: str, port: int = NATIVE_PORT, timeout: float = 5.0,
                 ssl_context: ssl.SSLContext | None = None):
        sock = socket.create_connection((address, port), timeout=timeout)
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=address)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self._stream = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "CqlConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise ConnectionError("connection closed by the node")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def request(self, opcode: int, body: bytes) -> tuple[int, bytes]:
        self._stream = (self._stream + 1) % 32768
        self.sock.sendall(encode_frame(opcode, body, self._stream))
        while True:
            version, _flags, stream, op, length = struct.unpack(">BBhBi", self._recv_exact(9))
            payload = self._recv_exact(length)
            if stream != self._stream:  # e.g. an event on stream -1
                continue
            if op == _OP_ERROR:
                r = _Reader(payload)
                raise CqlError(r.int(), r.string())
            return op, payload

    def options(self) -> dict[str, list[str]]:
        op, body = self.request(_OP_OPTIONS, b"")
        if op != _OP_SUPPORTED:
            raise ConnectionError(f"unexpected opcode {op} for OPTIONS")
        return _Reader(body).string_multimap()

    def startup(self) -> None:
        op, _ = self.request(_OP_STARTUP, _string_map({"CQL_VERSION": "3.0.0"}))
        if op not in (_OP_READY, _OP_AUTHENTICATE):
            raise ConnectionError(f"unexpected opcode {op} for STARTUP")

    def query(self, cql: str, consistency: str = "ONE") -> list[dict[str, Any]]:
        q = cql.encode("utf-8")
        body = struct.pack(">i", len(q)) + q + struct.pack(">HB", _CONSISTENCY[consistency], 0)
        op, payload = self.request(_OP_QUERY, body)
        if op != _OP_RESULT:
            raise ConnectionError(f"unexpected opcode {op} for QUERY")
        return decode_rows(payload)


def cql_query(address: str, cql: str, *, port: int = NATIVE_PORT, timeout: float = 10.0,
              consistency: str = "ONE", ssl_context: ssl.SSLContext | None = None) -> list[dict[str, Any]]:
    with CqlConnection(address, port, timeout, ssl_context) as conn:
        conn.startup()
        return conn.query(cql, consistency)


def cql_answers(address: str, port: int = NATIVE_PORT, timeout: float = 2.0,
                ssl_context: ssl.SSLContext | None = None) -> bool:
    """True when a CQL server on address:port completes OPTIONS and STARTUP (over TLS with ``ssl_context``)."""
    try:
        with CqlConnection(address, port, timeout, ssl_context) as conn:
            conn.options()
            conn.startup()
            return True
    except (OSError, ValueError, CqlError, struct.error):
        return False


# ---------------------------------------------------------------------------
# nodes


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 64 * 1024, 0))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _listening(address: str, port: int) -> bool:
    """Whether anything accepts TCP connections there (a CQL node, in clear or TLS, or not)."""
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass
class CassandraNode:
    """One Cassandra process with its own directory under ``base``.

    ``seeds`` defaults to the node's own address (a one-node cluster).
    """

    name: str
    address: str = "127.0.0.1"
    dc: str = "dc1"
    seeds: Sequence[str] = ()
    cluster_name: str = DEFAULT_CLUSTER_NAME
    heap: str = DEFAULT_HEAP
    initial_heap: str = DEFAULT_INITIAL_HEAP
    base: Path = DEFAULT_BASE
    rack: str = "rack1"
    jmx_port: int | None = None
    native_port: int = NATIVE_PORT
    storage_port: int = STORAGE_PORT
    num_tokens: int = 16
    local_replication_factor: int = 1
    jvm_extra: Sequence[str] = ()
    lib_dir: Path = LIB_DIR
    #: CQL with TLS only (client_encryption_options), certificate from tools/test_ca.py
    tls: bool = False

    def __post_init__(self) -> None:
        parse_size(self.heap), parse_size(self.initial_heap)  # fail early on a typo
        self.base = Path(self.base).resolve()
        self.seeds = tuple(self.seeds) or (self.address,)
        self.jvm_extra = tuple(self.jvm_extra)
        if self.jmx_port is None:
            self.jmx_port = default_jmx_port(self.address)
        self._proc: subprocess.Popen | None = None

    # -- paths
    @property
    def dir(self) -> Path:
        return self.base / self.name

    @property
    def conf_dir(self) -> Path:
        return self.dir / "conf"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def system_log(self) -> Path:
        return self.log_dir / "system.log"

    @property
    def stdout_log(self) -> Path:
        return self.log_dir / "stdout.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "cassandra.pid"

    @property
    def contact_point(self) -> tuple[str, int]:
        return (self.address, self.native_port)

    @property
    def tls_dir(self) -> Path:
        """The node's TLS files (tools/test_ca.py): server-keystore.pem (0600), ca.pem, ..."""
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients verify a TLS node with."""
        return self.tls_dir / "ca.pem"

    def client_context(self) -> ssl.SSLContext | None:
        """What the tool's CQL client needs to talk to this node: TLS for a TLS node, else None."""
        return client_context(self.ca_file) if self.tls else None

    def tls_files(self) -> tuple[Path, Path] | None:
        """(keystore, truststore) for cassandra.yaml, issued now unless those there still fit."""
        if not self.tls:
            return None
        test_ca = load_test_ca()
        try:
            files = test_ca.server_files(self.tls_dir, [self.address], ["localhost"],
                                         common_name=f"cassandra {self.name}")
        except test_ca.TestCAError as exc:
            raise CassandraToolError(str(exc)) from None
        return files.key_and_chain, files.ca

    # -- persistence of the node's parameters (for stop/status from another process)
    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "address": self.address, "dc": self.dc, "seeds": list(self.seeds),
            "cluster_name": self.cluster_name, "heap": self.heap,
            "initial_heap": self.initial_heap, "rack": self.rack,
            "jmx_port": self.jmx_port, "native_port": self.native_port,
            "storage_port": self.storage_port, "num_tokens": self.num_tokens,
            "local_replication_factor": self.local_replication_factor,
            "jvm_extra": list(self.jvm_extra), "tls": self.tls,
        }

    @classmethod
    def load(cls, name: str, base: Path = DEFAULT_BASE) -> "CassandraNode":
        path = Path(base).resolve() / name / "node.json"
        try:
            params = json.loads(path.read_text())
        except OSError:
            raise CassandraToolError(f"no node {name!r} under {base} (no {path})") from None
        except ValueError as exc:
            raise CassandraToolError(f"unreadable {path}: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"base", "lib_dir"}
        return cls(base=base, **{k: v for k, v in params.items() if k in known})

    @classmethod
    def all(cls, base: Path = DEFAULT_BASE) -> list["CassandraNode"]:
        base = Path(base)
        if not base.is_dir():
            return []
        return [cls.load(p.parent.name, base) for p in sorted(base.glob("*/node.json"))]

    # -- configuration
    def write_config(self) -> None:
        for sub in ("conf/triggers", "data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "cassandra.yaml").write_text(render_cassandra_yaml(
            cluster_name=self.cluster_name, address=self.address, seeds=self.seeds,
            node_dir=self.dir, num_tokens=self.num_tokens,
            local_replication_factor=self.local_replication_factor,
            native_port=self.native_port, storage_port=self.storage_port, tls=self.tls_files(),
        ))
        (self.conf_dir / "cassandra-rackdc.properties").write_text(render_rackdc(self.dc, self.rack))
        (self.conf_dir / "logback.xml").write_text(render_logback())
        (self.dir / "node.json").write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def jvm_args(self) -> list[str]:
        return [
            f"-Xms{min(self.initial_heap, self.heap, key=parse_size)}", f"-Xmx{self.heap}",
            *JVM_GENERAL_FLAGS,
            *JVM17_MODULE_FLAGS,
            f"-javaagent:{jamm_jar(self.lib_dir)}",
            *JVM_FAST_START_FLAGS,
            f"-Dcassandra.triggers_dir={self.conf_dir / 'triggers'}",
            f"-Dcassandra.jmx.local.port={self.jmx_port}",
            f"-Dcassandra.config={(self.conf_dir / 'cassandra.yaml').as_uri()}",
            f"-Dcassandra.storagedir={self.dir}",
            f"-Dcassandra.logdir={self.log_dir}",
            f"-Dlogback.configurationFile={(self.conf_dir / 'logback.xml').as_uri()}",
            "-Dcassandra-foreground=yes",
            # marks the process as this node's, so stop never signals a reused PID
            f"-Dmailcluster.cassandra.node={self.dir}",
            *self.jvm_extra,  # last, so they override ours
        ]

    def command(self) -> list[str]:
        return [java_executable(), *self.jvm_args(), "-cp", classpath(self.conf_dir, self.lib_dir), MAIN_CLASS]

    # -- process state
    def pid(self) -> int | None:
        """The node's PID if its process is running, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if f"-Dmailcluster.cassandra.node={self.dir}".encode() not in cmdline:
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_up(self, timeout: float = 2.0) -> bool:
        """True when the node answers CQL on its address and port (over TLS for a TLS node)."""
        try:
            context = self.client_context()
        except OSError:  # a TLS node that never started has no CA file yet
            return False
        return cql_answers(self.address, self.native_port, timeout, context)

    def rss(self) -> int | None:
        pid = self.pid()
        return rss_bytes(pid) if pid else None

    def query(self, cql: str, consistency: str = "ONE") -> list[dict[str, Any]]:
        return cql_query(self.address, cql, port=self.native_port, consistency=consistency,
                         ssl_context=self.client_context())

    # -- lifecycle
    def wipe(self) -> None:
        """Remove the node's data, commit log, caches, hints and logs."""
        if self.is_running():
            raise CassandraToolError(f"node {self.name} is running; stop it before wiping")
        for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)

    def start(self, timeout: float = DEFAULT_START_TIMEOUT, *, fresh: bool = False) -> float:
        """Start the node and wait until CQL answers; returns the seconds taken.

        ``fresh`` wipes earlier data first (otherwise the node restarts with it).
        """
        started = time.monotonic()
        ensure_fetched(self.lib_dir)
        if self.is_running():
            raise CassandraToolError(f"node {self.name} is already running (pid {self.pid()})")
        if _listening(self.address, self.native_port):
            raise CassandraToolError(
                f"something else already listens on {self.address}:{self.native_port}; "
                "stop it first (python3 tools/cassandra.py status / stop-all)"
            )
        if fresh:
            self.wipe()
        self.write_config()
        cmd = self.command()
        with open(self.stdout_log, "wb") as out:  # this run's JVM output only
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True,  # Ctrl-C in a terminal does not reach it
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        try:
            self.wait_until_up(timeout - (time.monotonic() - started))
        except BaseException:
            self.kill()
            raise
        return time.monotonic() - started

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None:
                code = self._proc.poll()
                if code is not None:
                    raise CassandraToolError(
                        f"Cassandra node {self.name} exited with status {code} while starting\n"
                        + self._log_excerpt()
                    )
            elif not self.is_running():
                raise CassandraToolError(f"Cassandra node {self.name} is not running\n" + self._log_excerpt())
            if self.is_up(timeout=2.0):
                return
            if time.monotonic() > deadline:
                raise CassandraToolError(
                    f"Cassandra node {self.name} did not answer CQL on "
                    f"{self.address}:{self.native_port} within {timeout:.0f}s\n" + self._log_excerpt()
                )
            time.sleep(0.5)

    def _log_excerpt(self) -> str:
        return (
            f"--- last lines of {self.system_log} ---\n{_tail(self.system_log)}\n"
            f"--- last lines of {self.stdout_log} ---\n{_tail(self.stdout_log, 20)}"
        )

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                try:
                    self._proc.wait(timeout=0.2)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not _pid_alive(pid):
                return True
            time.sleep(0.2)
        return not _pid_alive(pid)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
        """SIGTERM (Cassandra drains and exits), SIGKILL after ``timeout``.
        Returns False if the node was not running."""
        pid = self.pid()
        if pid is None:
            self._reap()
            return False
        os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)
        self._reap()
        return True

    def kill(self) -> bool:
        """SIGKILL at once (a crashed node)."""
        pid = self.pid()
        if pid is None:
            self._reap()
            return False
        os.kill(pid, signal.SIGKILL)
        self._wait_exit(pid, 10)
        self._reap()
        return True

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        self.pid_file.unlink(missing_ok=True)

    # -- cluster view
    def peers(self) -> list[dict[str, Any]]:
        return self.query("SELECT peer, data_center, rack, host_id, tokens FROM system.peers_v2")

    def local(self) -> dict[str, Any]:
        rows = self.query(
            "SELECT cluster_name, data_center, rack, release_version, host_id FROM system.local"
        )
        return rows[0] if rows else {}


def stop_nodes(nodes: Iterable[CassandraNode], timeout: float = DEFAULT_STOP_TIMEOUT) -> list[CassandraNode]:
    """Stop several nodes at once (they drain in parallel); returns those that were running."""
    running = [n for n in nodes if n.is_running()]
    for node in running:
        pid = node.pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
    for node in running:
        node.stop(timeout)
    return running


def wait_for_ring(nodes: Sequence[CassandraNode], timeout: float = 60.0) -> None:
    """Wait until every node lists every other node, with tokens, in system.peers_v2."""
    deadline = time.monotonic() + timeout
    want = {n.address for n in nodes}
    while True:
        missing = {}
        for node in nodes:
            try:
                seen = {str(p["peer"]) for p in node.peers() if p.get("tokens")}
            except (OSError, ValueError, CqlError):
                seen = set()
            lacking = want - seen - {node.address}
            if lacking:
                missing[node.name] = sorted(lacking)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise CassandraToolError(f"nodes do not see each other after {timeout:.0f}s: {missing}")
        time.sleep(0.5)


def two_dc_cluster(
    *,
    addresses: Sequence[str] = ("127.0.0.1", "127.0.0.2"),
    names: Sequence[str] = ("node1", "node2"),
    dcs: Sequence[str] = ("dc1", "dc2"),
    cluster_name: str = DEFAULT_CLUSTER_NAME,
    heap: str = DEFAULT_HEAP,
    base: Path = DEFAULT_BASE,
) -> list[CassandraNode]:
    """The nodes of a cluster with one node per datacenter, all of them seeds."""
    return [
        CassandraNode(name, address=addr, dc=dc, seeds=tuple(addresses),
                      cluster_name=cluster_name, heap=heap, base=base)
        for name, addr, dc in zip(names, addresses, dcs, strict=True)
    ]


def start_cluster(nodes: Sequence[CassandraNode], timeout: float = DEFAULT_START_TIMEOUT,
                  *, fresh: bool = False) -> float:
    """Start nodes one after the other (Cassandra adds nodes to a ring one at a
    time), then wait until they all see each other.  Returns seconds taken."""
    started = time.monotonic()
    ours: list[CassandraNode] = []
    try:
        for node in nodes:
            node.start(timeout, fresh=fresh)
            ours.append(node)
        wait_for_ring(nodes, timeout=60.0)
    except BaseException:
        for node in ours:
            node.kill()
        raise
    return time.monotonic() - started


# ---------------------------------------------------------------------------
# command line


def _print_status(base: Path) -> int:
    nodes = CassandraNode.all(base)
    if not nodes:
        print(f"no nodes under {base}")
        return 0
    print(f"{'NAME':<12} {'ADDRESS':<12} {'DC':<6} {'CLUSTER':<22} {'PID':>8} {'RSS':>9}  CQL")
    for n in nodes:
        pid = n.pid()
        rss = rss_bytes(pid) if pid else None
        print(
            f"{n.name:<12} {n.address:<12} {n.dc:<6} {n.cluster_name:<22} "
            f"{pid or '-':>8} {f'{rss // 2**20} MiB' if rss else '-':>9}  "
            f"{'up' if pid and n.is_up() else 'down'}"
        )
    return 0


def _node_from_args(args: argparse.Namespace, base: Path) -> CassandraNode:
    """The node ``start`` means: the saved one updated with the options given, or a new one."""
    given = {
        "address": args.address, "dc": args.dc, "rack": args.rack,
        "cluster_name": args.cluster_name, "heap": args.heap, "jmx_port": args.jmx_port,
        "initial_heap": args.initial_heap,
        "jvm_extra": tuple(args.jvm_extra) if args.jvm_extra else None,
        "seeds": tuple(s.strip() for s in args.seeds.split(",")) if args.seeds else None,
        "tls": True if args.tls else (False if args.no_tls else None),
    }
    given = {k: v for k, v in given.items() if v is not None}
    if (Path(base).resolve() / args.name / "node.json").is_file():
        params = CassandraNode.load(args.name, base).to_json()
        if "address" in given and "jmx_port" not in given:
            params.pop("jmx_port")  # derived from the address
        if "address" in given and "seeds" not in given and params["seeds"] == [params["address"]]:
            params.pop("seeds")  # a one-node cluster follows its address
        params.update(given)
        return CassandraNode(base=base, **params)
    return CassandraNode(args.name, base=base, **given)


def _start(args: argparse.Namespace, base: Path) -> None:
    node = _node_from_args(args, base)
    took = node.start(args.timeout, fresh=args.fresh)
    print(f"{node.name}: CQL{' (TLS only)' if node.tls else ''} up on {node.address}:{node.native_port} "
          f"(dc {node.dc}, pid {node.pid()}, {took:.1f}s); logs in {node.log_dir}")
    if node.tls:
        print(f"{node.name}: CA file {node.ca_file}")


def _stop_all(args: argparse.Namespace, base: Path) -> None:
    nodes = stop_nodes(CassandraNode.all(base), args.timeout)
    for n in nodes:
        print(f"{n.name}: stopped")
    if not nodes:
        print("no node was running")


def _tls_node(name: str, base: Path) -> CassandraNode:
    node = CassandraNode.load(name, base)
    if not node.tls:
        raise CassandraToolError(f"node {node.name} does not use TLS (start it with --tls)")
    return node


def _fmt_row(row: dict[str, Any]) -> str:
    return " | ".join(f"{k}={v}" for k, v in row.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/cassandra.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help=f"folder holding the node directories (default {DEFAULT_BASE})")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fetch", help="download Cassandra's jars with Maven (no-op when cached)")
    p.add_argument("--verbose", action="store_true", help="show Maven's output")

    p = sub.add_parser(
        "start", help="start one node and wait until CQL answers",
        description="Start a node. For a node that exists under --base, options not given "
                    "keep the values it was created with.")
    p.add_argument("--name", required=True)
    p.add_argument("--address", help="listen and CQL address (default 127.0.0.1)")
    p.add_argument("--dc", help="datacenter (default dc1)")
    p.add_argument("--rack", help="rack (default rack1)")
    p.add_argument("--seeds", help="comma-separated seed addresses (default: the node itself)")
    p.add_argument("--cluster-name", help=f"default {DEFAULT_CLUSTER_NAME}")
    p.add_argument("--heap", help=f"-Xmx (default {DEFAULT_HEAP})")
    p.add_argument("--initial-heap", help=f"-Xms (default {DEFAULT_INITIAL_HEAP}, at most --heap)")
    p.add_argument("--jmx-port", type=int, help="local JMX port (default 7199 + last octet - 1)")
    p.add_argument("--jvm-opt", action="append", dest="jvm_extra",
                   help="an extra JVM option, after ours (repeatable), e.g. --jvm-opt=-Xms256M")
    p.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT)
    p.add_argument("--fresh", action="store_true", help="wipe the node's earlier data first")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls", action="store_true",
                     help="CQL with TLS only, certificate of the test CA (needs the cryptography package: "
                          "the project's venv); clients verify it with the file `ca-file` prints")
    tls.add_argument("--no-tls", action="store_true", help="CQL in clear text again (the default)")

    p = sub.add_parser("ca-file", help="print the CA certificate file of a TLS node")
    p.add_argument("--name", required=True)

    p = sub.add_parser("stop", help="stop one node (SIGTERM, then SIGKILL)")
    p.add_argument("--name", required=True)
    p.add_argument("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT)
    p.add_argument("--kill", action="store_true", help="SIGKILL at once")

    p = sub.add_parser("stop-all", help="stop every node under --base")
    p.add_argument("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT)

    sub.add_parser("status", help="list the nodes under --base")

    p = sub.add_parser("cluster", help="start a cluster")
    p.add_argument("--two-dc", action="store_true", required=True,
                   help="node1 in dc1 and node2 in dc2, both seeds")
    p.add_argument("--addresses", default="127.0.0.1,127.0.0.2")
    p.add_argument("--names", default="node1,node2")
    p.add_argument("--cluster-name", default=DEFAULT_CLUSTER_NAME)
    p.add_argument("--heap", default=DEFAULT_HEAP)
    p.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT)
    p.add_argument("--fresh", action="store_true", help="wipe the nodes' earlier data first")

    p = sub.add_parser("cql", help="run one CQL statement (stdlib client, simple types only)")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--port", type=int, default=NATIVE_PORT)
    p.add_argument("--consistency", default="ONE", choices=sorted(_CONSISTENCY))
    p.add_argument("--ca-file", type=Path, help="speak TLS, verifying the node with this CA file")
    p.add_argument("statement")

    p = sub.add_parser("nodetool", help="run Cassandra's nodetool against a node (JMX)")
    p.add_argument("--name", required=True)
    p.add_argument("args", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    base: Path = args.base
    try:
        if args.cmd == "fetch":
            t0 = time.monotonic()
            already = is_fetched()
            ensure_fetched(quiet=not args.verbose)
            print(f"cassandra {CASSANDRA_VERSION} jars in {LIB_DIR} "
                  f"({'already there' if already else 'fetched'}, {time.monotonic() - t0:.1f}s)")
        elif args.cmd == "start":
            _start(args, base)
        elif args.cmd == "stop":
            node = CassandraNode.load(args.name, base)
            stopped = node.kill() if args.kill else node.stop(args.timeout)
            print(f"{node.name}: {'stopped' if stopped else 'was not running'}")
        elif args.cmd == "stop-all":
            _stop_all(args, base)
        elif args.cmd == "status":
            return _print_status(base)
        elif args.cmd == "cluster":
            addresses = [a.strip() for a in args.addresses.split(",")]
            names = [n.strip() for n in args.names.split(",")]
            nodes = two_dc_cluster(addresses=addresses, names=names, cluster_name=args.cluster_name,
                                   heap=args.heap, base=base)
            took = start_cluster(nodes, args.timeout, fresh=args.fresh)
            for n in nodes:
                print(f"{n.name}: CQL up on {n.address}:{n.native_port} (dc {n.dc}, pid {n.pid()})")
            print(f"cluster {args.cluster_name!r} up in {took:.1f}s")
        elif args.cmd == "cql":
            context = client_context(args.ca_file) if args.ca_file else None
            for row in cql_query(args.address, args.statement, port=args.port, consistency=args.consistency,
                                 ssl_context=context):
                print(_fmt_row(row))
        elif args.cmd == "ca-file":
            print(_tls_node(args.name, base).ca_file)
        elif args.cmd == "nodetool":
            node = CassandraNode.load(args.name, base)
            ensure_fetched(node.lib_dir)
            cmd = [java_executable(), "-Xmx256m", *JVM17_MODULE_FLAGS,
                   f"-Dlogback.configurationFile={(node.conf_dir / 'logback.xml').as_uri()}",
                   f"-Dcassandra.logdir={node.log_dir}",
                   "-cp", classpath(node.conf_dir, node.lib_dir), NODETOOL_CLASS,
                   "-h", "127.0.0.1", "-p", str(node.jmx_port), *args.args]
            return subprocess.call(cmd)
    except (CassandraToolError, CqlError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
