#!/usr/bin/env python3
"""Run a RabbitMQ broker of our own, from Debian's rabbitmq-server, for tests,
CI and the one-machine demo.

Standard library only: usable as a command-line tool and as a module
(``tests/rabbitmq_broker.py`` imports it).

How it works
------------
* A node is a directory ``.cache/rabbitmq/nodes/NAME/`` holding its own
  configuration (``rabbitmq.conf``, ``definitions.json``, an empty plugin list,
  an empty ``rabbitmq-env.conf``), ``home/.erlang.cookie``, ``mnesia/`` (the
  broker's data), ``logs/`` and ``node.json`` (the node's parameters and its
  password, mode 0600).  Nothing under /etc/rabbitmq or /var/lib/rabbitmq is
  read or written.
* ``start`` runs ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (the script behind
  the ``/usr/sbin`` wrapper, which would switch to the ``rabbitmq`` user) in
  the background as the current user, with environment variables pointing
  every path at the node directory, on ports of its own (AMQP 5673, Erlang
  distribution 25673, epmd 4370: a system RabbitMQ keeps 5672, 25672 and 4369)
  and everything on 127.0.0.1.  The broker imports ``definitions.json`` at
  every boot: the vhost ``mailcluster`` and the user ``mailcluster`` with full
  permissions on it and nowhere else (no ``guest`` user and no ``/`` vhost are
  created).  The command returns once that user can open that vhost over AMQP.
* ``stop`` sends SIGTERM to the Erlang VM (RabbitMQ shuts down cleanly, as
  ``rabbitmqctl stop`` would), SIGKILL after a timeout; then it stops the epmd
  it started, once no node is registered with it.
* ``ctl`` runs ``rabbitmqctl`` with the node's environment.
* ``start --tls`` adds a TLS listener (``amqps://``) on a loopback port of
  its own next to the clear one (default: AMQP port + 1000, 6673), with a
  server certificate from the test CA of ``tools/test_ca.py`` (which needs
  the ``cryptography`` package, so run the tool with the project's venv for
  that).  Clients verify the broker with ``nodes/NAME/tls/ca.pem``.

The settings are for tests and demos on one machine.  Operators run their
own RabbitMQ (see docs/rabbitmq.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(
    os.environ.get("MAILCLUSTER_RABBITMQ_CACHE", REPO_ROOT / ".cache" / "rabbitmq")
).resolve()
DEFAULT_BASE = CACHE_DIR / "nodes"

RABBITMQ_BIN = Path(os.environ.get("MAILCLUSTER_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
EPMD = os.environ.get("MAILCLUSTER_EPMD", "epmd")

DEFAULT_NAME = "mailcluster"
DEFAULT_VHOST = "mailcluster"
DEFAULT_USER = "mailcluster"
ADDRESS = "127.0.0.1"
#: one more than RabbitMQ's defaults, so that a system broker keeps its own
AMQP_PORT = 5673
DIST_PORT_OFFSET = 20000  # RabbitMQ's own rule: distribution port = AMQP port + 20000
#: ``--tls`` without ``--tls-port``: AMQP port + 1000 (RabbitMQ's own 5671 is
#: 5672 - 1, which for our 5673 would be a system broker's 5672)
TLS_PORT_OFFSET = 1000
EPMD_PORT = 4370
#: rabbitmqctl's own distribution listener picks a port in this range
CTL_DIST_PORT_MIN = 35673
CTL_DIST_PORT_MAX = 35693
DEFAULT_START_TIMEOUT = 90.0
DEFAULT_STOP_TIMEOUT = 30.0
CTL_TIMEOUT = 60.0

#: marks the processes of a node (an argument RabbitMQ's start script hands
#: to the Erlang VM, which ignores it), so that stop never signals a reused PID
MARKER_FLAG = "-mailcluster_rabbitmq_node"
#: the Erlang distribution (the VM's and rabbitmqctl's) listens on loopback only
LOOPBACK_DIST_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
#: inherited variables that would change what the broker or rabbitmqctl does:
#: RabbitMQ reads each RABBITMQ_X setting also as plain X (rabbit_env's
#: get_prefixed_env_var), and its start scripts read a few more
_RABBITMQ_SUFFIXES = frozenset("""
    ADVANCED_CONFIG_FILE ALLOW_INPUT BASE BOOT_MODULE CLEAN_BOOT_FILE CONFIG_FILE CONFIG_FILES
    CONF_ENV_FILE CTL_DIST_PORT_MAX CTL_DIST_PORT_MIN CTL_ERL_ARGS DBG DEFAULT_PASS DEFAULT_USER
    DEFAULT_VHOST DISTRIBUTION_BUFFER_SIZE DIST_PORT ENABLED_PLUGINS ENABLED_PLUGINS_FILE
    ERLANG_COOKIE FEATURE_FLAGS FEATURE_FLAGS_FILE IGNORE_SIGINT KEEP_PID_FILE_ON_EXIT LOG LOGS
    LOG_BASE LOG_FF_REGISTRY MAX_NUMBER_OF_ATOMS MAX_NUMBER_OF_PROCESSES MNESIA_BASE MNESIA_DIR
    MOTD_FILE NODENAME NODE_IP_ADDRESS NODE_ONLY NODE_PORT PID_FILE PLUGINS_DIR PLUGINS_EXPAND_DIR
    PRODUCT_NAME PRODUCT_VERSION QUORUM_DIR SASL_BOOT_FILE SCHEDULER_BIND_TYPE
    SCHEDULER_BUSY_WAIT_THRESHOLD SERVER_ADDITIONAL_ERL_ARGS SERVER_CODE_PATH SERVER_ERL_ARGS
    SERVER_START_ARGS STREAM_DIR SYS_PREFIX UPGRADE_LOG USE_LONGNAME
""".split())
#: and systemd's NOTIFY_SOCKET makes the start script exec the VM as under systemd
_OTHER_SCRUBBED = frozenset({"NOTIFY_SOCKET", "detached", "USE_RABBIT_BOOT_SCRIPT"})


def _scrubbed(name: str) -> bool:
    return (name.startswith(("RABBITMQ_", "ERL_")) or name in _RABBITMQ_SUFFIXES
            or name in _OTHER_SCRUBBED)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class RabbitToolError(Exception):
    """A failure the user can act on; the message says what to do."""


# ---------------------------------------------------------------------------
# configuration files


@dataclasses.dataclass(frozen=True)
class TlsListener:
    """The TLS listener of a node: its port and its PEM files (see tools/test_ca.py)."""

    port: int
    certificate: Path
    key: Path
    ca: Path


def render_tls_conf(tls: TlsListener) -> str:
    """The rabbitmq.conf lines of a TLS listener on 127.0.0.1.

    Clients are not asked for a certificate (they log in with a password),
    and only TLS 1.3 and 1.2 are offered.
    """
    return f"""
# TLS (amqps://) on its own loopback port, with a certificate of the test CA
# (tools/test_ca.py); clients verify the broker with {tls.ca}.
listeners.ssl.default = {ADDRESS}:{tls.port}
ssl_options.cacertfile = {tls.ca}
ssl_options.certfile = {tls.certificate}
ssl_options.keyfile = {tls.key}
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
"""


def render_rabbitmq_conf(*, name: str, definitions: Path, tls: TlsListener | None = None) -> str:
    """rabbitmq.conf (new-style "sysctl" format) for a test / demo node.

    The clear listener and the ports come from the environment (see
    ``RabbitNode.env``); a TLS listener, when there is one, from this file.
    """
    return f"""\
# Written by tools/rabbitmq.py for a TEST / DEMO node; regenerated at every start.
# The AMQP listener (127.0.0.1 only) and the ports are set by the environment
# the tool starts the broker with (RABBITMQ_NODE_IP_ADDRESS, RABBITMQ_NODE_PORT,
# RABBITMQ_DIST_PORT, ERL_EPMD_PORT).
cluster_name = mailcluster-{name}

# The vhost, the user and its permissions, imported at every boot.  With
# definitions to load the broker creates neither the guest user nor the "/" vhost.
load_definitions = {definitions}

# Alarms that would block publishers: a test machine may have little free disk
# (the default limit is 50 MB); the memory limit stays at RabbitMQ's default
# share of the machine's memory.
disk_free_limit.absolute = 10MB
vm_memory_high_watermark.relative = 0.6

# Logs to the node's logs/ directory only.
log.console = false
log.file.level = info

# No statistics collection: no management plugin runs.
collect_statistics = none
""" + (render_tls_conf(tls) if tls is not None else "")


def render_definitions(*, vhost: str, user: str, password: str) -> dict[str, Any]:
    """The definitions the broker imports at every boot (``rabbitmqctl
    import_definitions`` takes the same file): one vhost, one user with full
    permissions on it and no tag (no management or policy rights)."""
    return {
        "vhosts": [{"name": vhost}],
        "users": [{"name": user, "password": password, "tags": ""}],
        "permissions": [
            {"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"},
        ],
    }


def scrubbed_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without RabbitMQ and Erlang settings."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if not _scrubbed(k)}


def amqp_url(user: str, password: str, vhost: str, port: int, host: str = ADDRESS, *, tls: bool = False) -> str:
    scheme = "amqps" if tls else "amqp"
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(vhost, safe='')}"


def load_test_ca() -> Any:
    """tools/test_ca.py, loaded by path when TLS is asked for (it needs ``cryptography``).

    By path, as the tests load this tool: with ``tools/`` on ``sys.path``,
    ``import cassandra`` would find tools/cassandra.py.
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
    """A client context that verifies the broker against ``ca_file`` (chain and address)."""
    return load_test_ca().client_context(ca_file)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a password or a cookie)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------
# a minimal AMQP 0-9-1 client: readiness checks and status (the project uses pika)

_FRAME_METHOD, _FRAME_HEARTBEAT, _FRAME_END = 1, 8, 0xCE
_CONNECTION = 10
_START, _START_OK, _TUNE, _TUNE_OK, _OPEN, _OPEN_OK, _CLOSE, _CLOSE_OK = 10, 11, 30, 31, 40, 41, 50, 51
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class AmqpError(Exception):
    """The broker refused: ``code`` is the AMQP reply code (403 access refused, 530 not allowed)."""

    def __init__(self, code: int, text: str):
        super().__init__(f"AMQP {code}: {text}")
        self.code = code
        self.text = text


def _shortstr(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise ValueError("AMQP short string longer than 255 bytes")
    return struct.pack(">B", len(raw)) + raw


def _longstr(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def encode_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table of strings, booleans, ints and nested tables."""
    out = b""
    for key, value in table.items():
        out += _shortstr(key)
        if isinstance(value, bool):
            out += b"t" + struct.pack(">B", value)
        elif isinstance(value, int):
            out += b"l" + struct.pack(">q", value)
        elif isinstance(value, Mapping):
            out += b"F" + encode_table(value)
        else:
            out += b"S" + _longstr(str(value).encode("utf-8"))
    return _longstr(out)


class _Buf:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated AMQP frame")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> Any:
        values = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return values[0] if len(values) == 1 else values

    def shortstr(self) -> str:
        return self.take(self.unpack(">B")).decode("utf-8", "replace")

    def longstr(self) -> bytes:
        return self.take(self.unpack(">I"))

    def value(self) -> Any:
        kind = self.take(1)
        simple = {b"t": ">B", b"b": ">b", b"B": ">B", b"s": ">h", b"u": ">H", b"I": ">i", b"i": ">I",
                  b"l": ">q", b"f": ">f", b"d": ">d", b"T": ">Q"}
        if kind in simple:
            v = self.unpack(simple[kind])
            return bool(v) if kind == b"t" else v
        if kind == b"S":
            return self.longstr().decode("utf-8", "replace")
        if kind == b"x":
            return self.longstr()
        if kind == b"D":
            scale, raw = self.unpack(">Bi")
            return raw / (10 ** scale)
        if kind == b"F":
            return self.table()
        if kind == b"A":
            inner = _Buf(self.longstr())
            items = []
            while inner.pos < len(inner.data):
                items.append(inner.value())
            return items
        if kind == b"V":
            return None
        raise ValueError(f"unknown AMQP field type {kind!r}")

    def table(self) -> dict[str, Any]:
        inner = _Buf(self.longstr())
        out = {}
        while inner.pos < len(inner.data):
            key = inner.shortstr()
            out[key] = inner.value()
        return out


def encode_method(channel: int, class_id: int, method_id: int, args: bytes) -> bytes:
    payload = struct.pack(">HH", class_id, method_id) + args
    return struct.pack(">BHI", _FRAME_METHOD, channel, len(payload)) + payload + bytes([_FRAME_END])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_method(sock: socket.socket) -> tuple[int, int, _Buf]:
    """The next method frame (heartbeats are skipped): class, method, arguments."""
    while True:
        kind, _channel, size = struct.unpack(">BHI", _recv_exact(sock, 7))
        payload = _recv_exact(sock, size)
        if _recv_exact(sock, 1) != bytes([_FRAME_END]):
            raise ValueError("bad AMQP frame end")
        if kind == _FRAME_HEARTBEAT:
            continue
        if kind != _FRAME_METHOD:
            raise ValueError(f"unexpected AMQP frame type {kind}")
        buf = _Buf(payload)
        class_id, method_id = buf.unpack(">HH")
        return class_id, method_id, buf


def _expect(sock: socket.socket, method: int) -> _Buf:
    class_id, method_id, args = read_method(sock)
    if (class_id, method_id) == (_CONNECTION, _CLOSE):
        code, text = args.unpack(">H"), args.shortstr()
        try:
            sock.sendall(encode_method(0, _CONNECTION, _CLOSE_OK, b""))
        except OSError:
            pass
        raise AmqpError(code, text)
    if (class_id, method_id) != (_CONNECTION, method):
        raise ValueError(f"unexpected AMQP method {class_id}.{method_id}, wanted {_CONNECTION}.{method}")
    return args


def amqp_login(host: str, port: int, user: str, password: str, vhost: str,
               timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Open an AMQP connection to ``vhost`` as ``user`` and close it again.

    Returns the broker's server properties (``product``, ``version``,
    ``cluster_name``, ...).  Raises AmqpError when the broker refuses the
    login (403) or the vhost (530), OSError when nothing answers (and
    ssl.SSLError, an OSError, when the TLS handshake of ``ssl_context`` fails).
    """
    with _connect(host, port, timeout, ssl_context) as sock:
        sock.sendall(PROTOCOL_HEADER)
        start = _expect(sock, _START)
        start.unpack(">BB")  # version 0-9
        server = start.table()
        mechanisms = start.longstr().decode().split()
        if "PLAIN" not in mechanisms:
            raise ValueError(f"the broker offers no PLAIN login: {mechanisms}")
        client = {"product": "tools/rabbitmq.py", "capabilities": {"authentication_failure_close": True}}
        response = b"\0" + user.encode() + b"\0" + password.encode()
        sock.sendall(encode_method(0, _CONNECTION, _START_OK,
                                   encode_table(client) + _shortstr("PLAIN") + _longstr(response)
                                   + _shortstr("en_US")))
        tune = _expect(sock, _TUNE)
        channel_max, frame_max, _heartbeat = tune.unpack(">HIH")
        sock.sendall(encode_method(0, _CONNECTION, _TUNE_OK, struct.pack(">HIH", channel_max, frame_max, 0)))
        sock.sendall(encode_method(0, _CONNECTION, _OPEN, _shortstr(vhost) + _shortstr("") + b"\0"))
        _expect(sock, _OPEN_OK)
        sock.sendall(encode_method(0, _CONNECTION, _CLOSE, struct.pack(">H", 200) + _shortstr("bye")
                                   + struct.pack(">HH", 0, 0)))
        try:
            _expect(sock, _CLOSE_OK)
            if isinstance(sock, ssl.SSLSocket):
                # close_notify: without it the broker's TLS side keeps the connection
                # (CLOSE-WAIT, still in list_connections) after the socket is closed.
                sock.unwrap()
        except (OSError, ValueError):
            pass
        return server


def _connect(host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    if ssl_context is None:
        return sock
    try:
        return ssl_context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def amqp_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when an AMQP 0-9-1 server on host:port sends connection.start."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(PROTOCOL_HEADER)
            _expect(sock, _START)
            return True
    except (OSError, ValueError, AmqpError, struct.error):
        return False


# ---------------------------------------------------------------------------
# processes


def _pid_alive(pid: int) -> bool:
    """True while the process exists and has not exited (the main thread of a
    multithreaded process turns zombie before the others have finished, so a
    zombie leader is not enough: its task list must be empty too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        return any(
            (Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")
            for tid in os.listdir(f"/proc/{pid}/task")
        )
    except OSError:
        return False


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _wait_gone(pid: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.pid == pid:
            try:
                proc.wait(timeout=0.05)
                return True
            except subprocess.TimeoutExpired:
                continue
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 64 * 1024, 0))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# epmd: one of our own per port, on loopback, stopped with the last node


def epmd_names(port: int, timeout: float = 2.0) -> list[str] | None:
    """Node names registered with the epmd on 127.0.0.1:port; None if no epmd answers."""
    try:
        with socket.create_connection((ADDRESS, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">HB", 1, 110))  # NAMES_REQ
            data = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    if len(data) < 4:
        return None
    return [m.group(1) for m in re.finditer(r"^name (\S+) at port \d+$", data[4:].decode("latin-1"), re.M)]


_EPMD_CHILDREN: dict[int, subprocess.Popen] = {}


class Epmd:
    """The epmd the tool starts on ``port`` (127.0.0.1 only).  Its PID file
    is in ``state_dir`` (``.epmd/`` in the nodes' base folder), so that any
    invocation of the tool on that base can stop it; the nodes of one base
    share it."""

    def __init__(self, port: int = EPMD_PORT, state_dir: Path = DEFAULT_BASE / ".epmd"):
        self.port = port
        self.pid_file = Path(state_dir) / f"epmd-{port}.pid"
        self.log_file = Path(state_dir) / f"epmd-{port}.log"  # empty unless epmd fails

    def command(self) -> list[str]:
        return [EPMD, "-port", str(self.port), "-address", ADDRESS]

    def pid(self) -> int | None:
        """The PID of our epmd if it runs (an epmd started by anyone else is not ours)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        cmd = _cmdline(pid)
        if not _pid_alive(pid) or not cmd or not cmd[0].endswith(b"epmd") or str(self.port).encode() not in cmd:
            return None
        return pid

    def ensure(self, timeout: float = 10.0) -> bool:
        """Start our epmd unless an epmd already answers on the port; True if
        we started one now."""
        if epmd_names(self.port) is not None:
            return False
        if shutil.which(EPMD) is None:
            raise RabbitToolError(
                f"{EPMD} not found: install Debian's rabbitmq-server (tools/install-test-deps)"
            )
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        env = scrubbed_environ()
        env["ERL_EPMD_ADDRESS"] = ADDRESS
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        _EPMD_CHILDREN[proc.pid] = proc  # reaped when stopped by this process
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while epmd_names(self.port) is None:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise RabbitToolError(
                    f"epmd exited with status {proc.returncode} on port {self.port}:\n{_tail(self.log_file, 10)}")
            if time.monotonic() > deadline:
                proc.kill()
                raise RabbitToolError(f"epmd does not answer on {ADDRESS}:{self.port} after {timeout:.0f}s")
            time.sleep(0.02)
        return True

    def stop_if_unused(self, leaving: str | None = None) -> bool:
        """Stop our epmd when no node is registered with it any more; True if
        stopped.  ``leaving`` is the short name of a node that has just
        stopped: epmd drops it once it sees the node's connection close."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + 3.0
        names = epmd_names(self.port)
        while names and names == [leaving] and time.monotonic() < deadline:
            time.sleep(0.05)
            names = epmd_names(self.port)
        if names:
            return False
        proc = _EPMD_CHILDREN.pop(pid, None)
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 5, proc):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5, proc)
        self.pid_file.unlink(missing_ok=True)
        if self.log_file.is_file() and self.log_file.stat().st_size == 0:
            self.log_file.unlink()
        return True


# ---------------------------------------------------------------------------
# nodes


@dataclasses.dataclass
class RabbitNode:
    """One RabbitMQ broker with its own directory under ``base``."""

    name: str = DEFAULT_NAME
    port: int = AMQP_PORT
    dist_port: int | None = None
    epmd_port: int = EPMD_PORT
    vhost: str = DEFAULT_VHOST
    user: str = DEFAULT_USER
    #: generated when the node is created; kept in node.json (mode 0600)
    password: str | None = None
    base: Path = DEFAULT_BASE
    #: the TLS listener's port on 127.0.0.1; None: no TLS listener
    tls_port: int | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise RabbitToolError(f"not a node name: {self.name!r} (letters, digits, '-', '_')")
        self.base = Path(self.base).resolve()
        if self.dist_port is None:
            self.dist_port = self.port + DIST_PORT_OFFSET
        if self.password is None:
            self.password = secrets.token_urlsafe(18)
        self._proc: subprocess.Popen | None = None

    # -- names and paths
    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def dir(self) -> Path:
        return self.base / self.name

    @property
    def home(self) -> Path:
        return self.dir / "home"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def mnesia_base(self) -> Path:
        return self.dir / "mnesia"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.nodename}.log"

    @property
    def stdout_log(self) -> Path:
        return self.log_dir / "stdout.log"

    @property
    def conf_file(self) -> Path:
        return self.dir / "rabbitmq.conf"

    @property
    def definitions_file(self) -> Path:
        return self.dir / "definitions.json"

    @property
    def pid_file(self) -> Path:
        """The start script's PID (the Erlang VM's parent); written by the tool."""
        return self.dir / "server.pid"

    @property
    def beam_pid_file(self) -> Path:
        """The Erlang VM's PID; written by RabbitMQ."""
        return self.dir / "rabbitmq.pid"

    @property
    def url(self) -> str:
        """amqp://mailcluster:PASSWORD@127.0.0.1:5673/mailcluster"""
        return self.url_for(self.vhost)

    def url_for(self, vhost: str) -> str:
        assert self.password is not None
        return amqp_url(self.user, self.password, vhost, self.port)

    @property
    def tls_dir(self) -> Path:
        """server.pem, server.key (0600) and ca.pem of the TLS listener."""
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients verify the TLS listener with."""
        return self.tls_dir / "ca.pem"

    @property
    def tls_url(self) -> str:
        """amqps://mailcluster:PASSWORD@127.0.0.1:6673/mailcluster (the node must have a TLS port)."""
        return self.tls_url_for(self.vhost)

    def tls_url_for(self, vhost: str) -> str:
        if self.tls_port is None:
            raise RabbitToolError(f"node {self.name} has no TLS listener (start it with --tls)")
        assert self.password is not None
        return amqp_url(self.user, self.password, vhost, self.tls_port, tls=True)

    def tls_listener(self) -> TlsListener | None:
        """The TLS listener's files, issued by the test CA now unless those there still fit."""
        if self.tls_port is None:
            return None
        test_ca = load_test_ca()
        try:
            files = test_ca.server_files(self.tls_dir, [ADDRESS], ["localhost"], common_name=f"rabbitmq {self.name}")
        except test_ca.TestCAError as exc:
            raise RabbitToolError(str(exc)) from None
        return TlsListener(self.tls_port, files.certificate, files.key, files.ca)

    @property
    def epmd(self) -> Epmd:
        return Epmd(self.epmd_port, self.base / ".epmd")

    # -- persistence (for stop/status/ctl from another process)
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "dist_port": self.dist_port,
                "epmd_port": self.epmd_port, "vhost": self.vhost, "user": self.user,
                "password": self.password, "tls_port": self.tls_port}

    @classmethod
    def load(cls, name: str = DEFAULT_NAME, base: Path = DEFAULT_BASE) -> "RabbitNode":
        path = Path(base).resolve() / name / "node.json"
        try:
            params = json.loads(path.read_text())
        except OSError:
            raise RabbitToolError(f"no node {name!r} under {base} (no {path}); start it first") from None
        except ValueError as exc:
            raise RabbitToolError(f"unreadable {path}: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"base"}
        return cls(base=base, **{k: v for k, v in params.items() if k in known})

    @classmethod
    def load_or_new(cls, name: str = DEFAULT_NAME, base: Path = DEFAULT_BASE, **given: Any) -> "RabbitNode":
        """The saved node updated with the options given, or a new one."""
        given = {k: v for k, v in given.items() if v is not None}
        if (Path(base).resolve() / name / "node.json").is_file():
            params = cls.load(name, base).to_json()
            if "port" in given and "dist_port" not in given:
                params.pop("dist_port")  # derived from the AMQP port
            params.update(given)
            params.pop("name")
            return cls(name, base=base, **params)
        return cls(name, base=base, **given)

    @classmethod
    def all(cls, base: Path = DEFAULT_BASE) -> list["RabbitNode"]:
        base = Path(base)
        if not base.is_dir():
            return []
        return [cls.load(p.parent.name, base) for p in sorted(base.glob("*/node.json"))]

    # -- configuration
    def write_config(self) -> None:
        for sub in ("home", "logs", "mnesia", "conf.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.is_file():
            # Erlang refuses a cookie file others can read
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(20).upper())
        _write_private(self.dir / "node.json", json.dumps(self.to_json(), indent=1) + "\n")
        assert self.password is not None
        _write_private(self.definitions_file, json.dumps(
            render_definitions(vhost=self.vhost, user=self.user, password=self.password), indent=1) + "\n")
        self.conf_file.write_text(render_rabbitmq_conf(name=self.name, definitions=self.definitions_file,
                                                       tls=self.tls_listener()))
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text(
            "# Written by tools/rabbitmq.py: empty on purpose, so that\n"
            "# /etc/rabbitmq/rabbitmq-env.conf does not apply to this node.\n")

    def env(self, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of the broker and of rabbitmqctl for this node."""
        env = scrubbed_environ(base_env)
        d = self.dir
        env.update({
            "HOME": str(self.home),  # .erlang.cookie, shared by the broker and rabbitmqctl
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": ADDRESS,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": ADDRESS,
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.conf_file),
            "RABBITMQ_CONFIG_FILES": str(d / "conf.d" / "*.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.mnesia_base),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.beam_pid_file),
            "RABBITMQ_MOTD_FILE": str(d / "motd"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DIST_ARGS,
            "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DIST_ARGS,
            "RABBITMQ_CTL_DIST_PORT_MIN": str(CTL_DIST_PORT_MIN),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(CTL_DIST_PORT_MAX),
            "ERL_CRASH_DUMP": str(self.log_dir / "erl_crash.dump"),
        })
        return env

    def command(self) -> list[str]:
        return [str(RABBITMQ_BIN / "rabbitmq-server"), MARKER_FLAG, str(self.dir)]

    # -- process state
    def _ours(self, pid: int | None) -> int | None:
        if pid is None or not _pid_alive(pid):
            return None
        cmd = _cmdline(pid)
        try:
            i = cmd.index(MARKER_FLAG.encode())
        except ValueError:
            return None
        return pid if i + 1 < len(cmd) and cmd[i + 1] == str(self.dir).encode() else None

    @staticmethod
    def _read_pid(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def pid(self) -> int | None:
        """The PID of the Erlang VM if it runs, else None."""
        return self._ours(self._read_pid(self.beam_pid_file))

    def script_pid(self) -> int | None:
        """The PID of the start script (the VM's parent) if it runs."""
        return self._ours(self._read_pid(self.pid_file))

    def is_running(self) -> bool:
        return self.pid() is not None or self.script_pid() is not None

    def is_up(self, timeout: float = 2.0) -> bool:
        """True when our user can open our vhost over AMQP."""
        try:
            self.login(timeout)
            return True
        except (OSError, ValueError, AmqpError, struct.error):
            return False

    def login(self, timeout: float = 5.0) -> dict[str, Any]:
        """An AMQP login to the node's vhost; the server properties (see amqp_login)."""
        assert self.password is not None
        return amqp_login(ADDRESS, self.port, self.user, self.password, self.vhost, timeout)

    def tls_login(self, timeout: float = 5.0) -> dict[str, Any]:
        """The same login over the TLS listener, verifying the broker with ``ca_file``."""
        if self.tls_port is None:
            raise RabbitToolError(f"node {self.name} has no TLS listener (start it with --tls)")
        assert self.password is not None
        return amqp_login(ADDRESS, self.tls_port, self.user, self.password, self.vhost, timeout,
                          ssl_context=client_context(self.ca_file))

    def rss(self) -> int | None:
        pid = self.pid()
        return rss_bytes(pid) if pid else None

    # -- lifecycle
    def wipe(self) -> None:
        """Remove the node's data (queues, messages, vhosts, users) and logs."""
        if self.is_running():
            raise RabbitToolError(f"node {self.name} is running; stop it before wiping")
        shutil.rmtree(self.mnesia_base, ignore_errors=True)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def start(self, timeout: float = DEFAULT_START_TIMEOUT, *, fresh: bool = False) -> float:
        """Start the broker and wait until our user can open our vhost over
        AMQP; returns the seconds taken.  A node of ours that already runs is
        provisioned again (vhost, user, password, permissions) and left running.

        ``fresh`` wipes earlier data first (otherwise the broker restarts
        with its queues and messages).
        """
        started = time.monotonic()
        script = RABBITMQ_BIN / "rabbitmq-server"
        if not script.is_file():
            raise RabbitToolError(
                f"{script} not found: install Debian's rabbitmq-server "
                "(tools/install-test-deps, or apt-get install rabbitmq-server)")
        if self.is_running():
            if fresh:
                raise RabbitToolError(f"node {self.name} is running; stop it before a fresh start")
            self.write_config()
            if not self.is_up():
                self.provision()
                self.wait_until_up(timeout - (time.monotonic() - started))
            return time.monotonic() - started
        if amqp_answers(ADDRESS, self.port, timeout=1.0):
            raise RabbitToolError(
                f"something else already answers AMQP on {ADDRESS}:{self.port}; stop it or use another "
                "port (--port)")
        if self.tls_port is not None and _listening(ADDRESS, self.tls_port):
            raise RabbitToolError(
                f"something else already listens on {ADDRESS}:{self.tls_port}; stop it or use another "
                "port (--tls-port)")
        if fresh:
            self.wipe()
        self.write_config()
        self.epmd.ensure()
        self.beam_pid_file.unlink(missing_ok=True)
        with open(self.stdout_log, "wb") as out:  # this run's console output only
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.dir, env=self.env(),
                start_new_session=True,  # Ctrl-C in a terminal does not reach it; kill() takes the group
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
        last: Exception | None = None
        while True:
            if self._proc is not None:
                code = self._proc.poll()
                if code is not None:
                    raise RabbitToolError(
                        f"RabbitMQ node {self.name} exited with status {code} while starting\n"
                        + self._log_excerpt())
            elif not self.is_running():
                raise RabbitToolError(f"RabbitMQ node {self.name} is not running\n" + self._log_excerpt())
            try:
                self.login(timeout=2.0)
                if self.tls_port is not None:
                    self.tls_login(timeout=2.0)
                return
            except (OSError, ValueError, AmqpError, struct.error) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise RabbitToolError(
                    f"RabbitMQ node {self.name} did not let {self.user} open vhost {self.vhost} on "
                    f"{ADDRESS}:{self.port} within {timeout:.0f}s (last error: {last!r})\n" + self._log_excerpt())
            time.sleep(0.1)

    def _log_excerpt(self) -> str:
        return (f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}\n"
                f"--- last lines of {self.stdout_log} ---\n{_tail(self.stdout_log, 20)}")

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
        """SIGTERM to the Erlang VM (RabbitMQ closes connections, stops its
        queues and halts), SIGKILL after ``timeout``; then our epmd goes if no
        node uses it.  Returns False if the node was not running."""
        beam, script = self.pid(), self.script_pid()
        if beam is None and script is None:
            self._reap()
            return False
        os.kill(beam or script, signal.SIGTERM)  # type: ignore[arg-type]
        for pid in (beam, script):
            if pid is not None and not _wait_gone(pid, timeout, self._proc):
                self._killpg(pid)
        self._reap()
        return True

    def kill(self) -> bool:
        """SIGKILL the broker's processes at once (a crashed broker)."""
        beam, script = self.pid(), self.script_pid()
        if beam is None and script is None:
            self._reap()
            return False
        for pid in (script, beam):
            if pid is not None:
                self._killpg(pid)
        self._reap()
        return True

    def _killpg(self, pid: int) -> None:
        """SIGKILL the process group the tool started the broker in (the start
        script, the VM and its port programs), or the process alone."""
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            return
        script = self.script_pid()
        try:
            if script is not None and pgid == script:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(pid, 10, self._proc)

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        self.pid_file.unlink(missing_ok=True)
        self.beam_pid_file.unlink(missing_ok=True)
        self.epmd.stop_if_unused(leaving=self.name)

    # -- rabbitmqctl
    def ctl_command(self, args: Sequence[str]) -> list[str]:
        return [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.nodename, *args]

    def ctl(self, args: Sequence[str], *, check: bool = True, timeout: float = CTL_TIMEOUT) -> str:
        """Run rabbitmqctl against the node; its standard output.

        The node must be running: rabbitmqctl would otherwise start an epmd
        daemon of its own (one the tool cannot stop).
        """
        if not self.is_running():
            raise RabbitToolError(
                f"node {self.name} is not running (python3 tools/rabbitmq.py start --name {self.name})"
            )
        result = subprocess.run(self.ctl_command(args), env=self.env(), cwd=self.dir, capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RabbitToolError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout

    def ctl_json(self, args: Sequence[str]) -> Any:
        """A rabbitmqctl listing with ``--formatter json``, decoded."""
        out = self.ctl(["-q", *args, "--formatter", "json"])
        return json.loads(out) if out.strip() else []

    def provision(self) -> None:
        """Create or update the vhost, the user (and its password) and the
        permissions on a running node (what the broker does at boot)."""
        self.write_config()
        self.ctl(["-q", "import_definitions", str(self.definitions_file)])

    # -- what is on the broker
    def queues(self, vhost: str | None = None) -> list[dict[str, Any]]:
        """The queues of a vhost: name, durable, auto_delete, exclusive,
        arguments (a dict), messages, consumers."""
        rows = self.ctl_json(["list_queues", "-p", vhost or self.vhost, "name", "durable", "auto_delete",
                              "exclusive", "arguments", "messages", "consumers"])
        for row in rows:
            row["arguments"] = _arguments(row.get("arguments"))
        return rows

    def bindings(self, vhost: str | None = None) -> list[dict[str, Any]]:
        """The bindings of a vhost: source, destination, destination_kind,
        routing_key, arguments.  The implicit bindings of the default exchange
        (source "") are included."""
        rows = self.ctl_json(["list_bindings", "-p", vhost or self.vhost, "source_name", "destination_name",
                              "destination_kind", "routing_key", "arguments"])
        return [{"source": r.get("source_name", ""), "destination": r.get("destination_name", ""),
                 "destination_kind": r.get("destination_kind", ""), "routing_key": r.get("routing_key", ""),
                 "arguments": _arguments(r.get("arguments"))} for r in rows]

    def exchanges(self, vhost: str | None = None) -> list[dict[str, Any]]:
        """The exchanges of a vhost (RabbitMQ's amq.* ones included): name, type, durable, auto_delete."""
        return self.ctl_json(["list_exchanges", "-p", vhost or self.vhost, "name", "type", "durable",
                              "auto_delete"])

    def connections(self) -> list[dict[str, Any]]:
        """Client connections: vhost, user, peer_port, state."""
        return self.ctl_json(["list_connections", "vhost", "user", "peer_port", "state"])

    def add_vhost(self, vhost: str) -> str:
        """A vhost where our user has full permissions (and no one else); its URL."""
        self.ctl(["-q", "add_vhost", vhost])
        self.ctl(["-q", "set_permissions", "-p", vhost, self.user, ".*", ".*", ".*"])
        return self.url_for(vhost)

    def delete_vhost(self, vhost: str) -> None:
        if vhost == self.vhost:
            raise RabbitToolError(f"refusing to delete the node's own vhost {vhost!r}")
        self.ctl(["-q", "delete_vhost", vhost])


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _arguments(raw: Any) -> dict[str, Any]:
    """Queue or binding arguments as rabbitmqctl's JSON gives them: [] when
    there are none, else AMQP table entries [key, type, value] (3.10), or
    [key, value] pairs, or an object."""
    if not raw:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    out = {}
    for item in raw:
        if isinstance(item, (list, tuple)) and len(item) in (2, 3):
            out[str(item[0])] = item[-1]
        elif isinstance(item, Mapping):
            out.update(item)
        else:
            raise ValueError(f"unexpected argument entry in rabbitmqctl output: {item!r}")
    return out


def stop_nodes(nodes: Iterable[RabbitNode], timeout: float = DEFAULT_STOP_TIMEOUT) -> list[RabbitNode]:
    """Stop several nodes; returns those that were running."""
    return [n for n in list(nodes) if n.stop(timeout)]


# ---------------------------------------------------------------------------
# command line


def _mask(url: str) -> str:
    return re.sub(r"(amqps?://[^:/@]+:)[^@]*@", r"\1****@", url)


def _print_status(base: Path) -> int:
    nodes = RabbitNode.all(base)
    if not nodes:
        print(f"no nodes under {base}")
        return 0
    print(f"{'NAME':<14} {'AMQP':>5} {'TLS':>5} {'DIST':>5} {'EPMD':>5} {'PID':>8} {'RSS':>9}  {'STATE':<5} URL")
    for n in nodes:
        pid = n.pid()
        rss = rss_bytes(pid) if pid else None
        state = "up" if pid and n.is_up() else ("start" if n.is_running() else "down")
        print(f"{n.name:<14} {n.port:>5} {n.tls_port or '-':>5} {n.dist_port:>5} {n.epmd_port:>5} {pid or '-':>8} "
              f"{f'{rss // 2**20} MiB' if rss else '-':>9}  {state:<5} {_mask(n.url)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/rabbitmq.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help=f"folder holding the node directories (default {DEFAULT_BASE})")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser(
        "start", help="start a broker (or provision a running one) and wait until AMQP answers",
        description="Start a node.  For a node that exists under --base, options not given keep "
                    "the values it was created with.  Idempotent: a running node is left running.")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"node name (default {DEFAULT_NAME})")
    p.add_argument("--port", type=int, help=f"AMQP port on 127.0.0.1 (default {AMQP_PORT})")
    p.add_argument("--dist-port", type=int, help=f"Erlang distribution port (default AMQP port + {DIST_PORT_OFFSET})")
    p.add_argument("--epmd-port", type=int, help=f"epmd port (default {EPMD_PORT})")
    p.add_argument("--password", help="password of the mailcluster user (default: generated once, kept in node.json)")
    p.add_argument("--tls", action="store_true",
                   help=f"also listen with TLS (amqps://), on --tls-port (default AMQP port + {TLS_PORT_OFFSET}); "
                        "needs the cryptography package (the project's venv)")
    p.add_argument("--tls-port", type=int, help="port of the TLS listener on 127.0.0.1 (implies --tls)")
    p.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT)
    p.add_argument("--fresh", action="store_true", help="wipe the node's earlier data first")

    p = sub.add_parser("stop", help="stop a broker (SIGTERM, then SIGKILL)")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT)
    p.add_argument("--kill", action="store_true", help="SIGKILL at once")

    sub.add_parser("stop-all", help="stop every node under --base")
    sub.add_parser("status", help="list the nodes under --base")

    p = sub.add_parser("url", help="print the AMQP URL of a node's vhost and user (with the password)")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--tls", action="store_true", help="the amqps:// URL of the TLS listener")

    p = sub.add_parser("ca-file", help="print the path of the CA certificate of a node's TLS listener")
    p.add_argument("--name", default=DEFAULT_NAME)

    p = sub.add_parser("ctl", help="run rabbitmqctl against a node: ctl -- list_queues -p mailcluster name")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("args", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    base: Path = args.base
    try:
        if args.cmd == "start":
            node = RabbitNode.load_or_new(args.name, base, port=args.port, dist_port=args.dist_port,
                                          epmd_port=args.epmd_port, password=args.password,
                                          tls_port=_tls_port(args, base))
            running = node.is_running()
            took = node.start(args.timeout, fresh=args.fresh)
            print(f"{node.name}: {'already running' if running else 'AMQP up'} on {ADDRESS}:{node.port} "
                  f"(pid {node.pid()}, {took:.1f}s); url {_mask(node.url)} "
                  f"(tools/rabbitmq.py url --name {node.name}); logs in {node.log_dir}")
            if node.tls_port is not None:
                print(f"{node.name}: TLS on {ADDRESS}:{node.tls_port}; url {_mask(node.tls_url)} "
                      f"(url --tls), CA file {node.ca_file}")
        elif args.cmd == "stop":
            node = RabbitNode.load(args.name, base)
            stopped = node.kill() if args.kill else node.stop(args.timeout)
            print(f"{node.name}: {'stopped' if stopped else 'was not running'}")
        elif args.cmd == "stop-all":
            nodes = stop_nodes(RabbitNode.all(base))
            for n in nodes:
                print(f"{n.name}: stopped")
            if not nodes:
                print("no node was running")
        elif args.cmd == "status":
            return _print_status(base)
        elif args.cmd == "url":
            node = RabbitNode.load(args.name, base)
            print(node.tls_url if args.tls else node.url)
        elif args.cmd == "ca-file":
            node = RabbitNode.load(args.name, base)
            if node.tls_port is None:
                raise RabbitToolError(f"node {node.name} has no TLS listener (start it with --tls)")
            print(node.ca_file)
        elif args.cmd == "ctl":
            node = RabbitNode.load(args.name, base)
            ctl_args = args.args[1:] if args.args[:1] == ["--"] else args.args
            if not node.is_running():
                raise RabbitToolError(f"node {node.name} is not running")
            return subprocess.call(node.ctl_command(ctl_args), env=node.env(), cwd=node.dir)
    except (RabbitToolError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _tls_port(args: argparse.Namespace, base: Path) -> int | None:
    """The TLS port ``start`` asks for: --tls-port, or --tls with the default; None keeps the node's."""
    if args.tls_port is not None:
        return int(args.tls_port)
    if not args.tls:
        return None
    port = args.port
    if port is None and (Path(base).resolve() / args.name / "node.json").is_file():
        port = RabbitNode.load(args.name, base).port
    return (port or AMQP_PORT) + TLS_PORT_OFFSET


if __name__ == "__main__":
    sys.exit(main())
