"""tools/rabbitmq.py without a broker: configuration files, the environment
the broker and rabbitmqctl get, node bookkeeping, the AMQP and epmd probes
(against fake servers), the command line.
tests/integration/test_rabbitmq_broker.py runs the real thing."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.rabbitmq_broker import TEST_PORT, tool


def make_node(tmp_path: Path, **kwargs) -> "tool.RabbitNode":
    kwargs.setdefault("name", "n1")
    return tool.RabbitNode(base=tmp_path / "nodes", **kwargs)


def conf_settings(text: str) -> dict[str, str]:
    """key -> value of the 'key = value' lines of a rabbitmq.conf."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not a setting: {line!r}"
            assert key.strip() not in out, f"duplicate key {key}"
            out[key.strip()] = value.strip()
    return out


# -- configuration files


def test_rabbitmq_conf_is_a_test_configuration(tmp_path: Path) -> None:
    text = tool.render_rabbitmq_conf(name="n1", definitions=tmp_path / "defs.json")
    c = conf_settings(text)
    assert c["load_definitions"] == str(tmp_path / "defs.json")
    assert c["cluster_name"] == "mailcluster-n1"
    assert c["disk_free_limit.absolute"] == "10MB"
    assert float(c["vm_memory_high_watermark.relative"]) <= 0.8
    assert c["log.console"] == "false"
    # listeners come from the environment (127.0.0.1 only); the guest user does not exist at all
    assert not [k for k in c if k.startswith(("listeners.", "loopback_users", "default_"))]
    assert not [k for k in c if k.startswith("management.")]


def test_definitions_give_our_user_our_vhost_only() -> None:
    d = tool.render_definitions(vhost="mailcluster", user="mailcluster", password="pw")
    assert d["vhosts"] == [{"name": "mailcluster"}]
    assert d["users"] == [{"name": "mailcluster", "password": "pw", "tags": ""}]  # no administrator tag
    assert d["permissions"] == [
        {"user": "mailcluster", "vhost": "mailcluster", "configure": ".*", "write": ".*", "read": ".*"}]
    json.dumps(d)


def test_env_points_every_path_into_the_node_directory(tmp_path: Path) -> None:
    node = make_node(tmp_path, port=5680, epmd_port=4380)
    inherited = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "RABBITMQ_NODENAME": "other@host",
                 "NODENAME": "other", "RABBITMQ_MNESIA_DIR": "/var/lib/rabbitmq/x", "MNESIA_BASE": "/x",
                 "ERL_FLAGS": "+S 1", "ERL_EPMD_PORT": "4369", "NOTIFY_SOCKET": "/run/systemd/notify",
                 "LOGS": "-", "RABBITMQ_ALLOW_INPUT": "true", "HOME": "/root"}
    env = node.env(inherited)
    assert env["PATH"] == "/usr/bin:/bin" and env["LANG"] == "C.UTF-8"
    for gone in ("NODENAME", "RABBITMQ_MNESIA_DIR", "MNESIA_BASE", "ERL_FLAGS", "NOTIFY_SOCKET", "LOGS",
                 "RABBITMQ_ALLOW_INPUT"):
        assert gone not in env, gone
    assert env["RABBITMQ_NODENAME"] == "n1@localhost"
    assert env["RABBITMQ_NODE_IP_ADDRESS"] == "127.0.0.1"
    assert env["RABBITMQ_NODE_PORT"] == "5680"
    assert env["RABBITMQ_DIST_PORT"] == "25680"
    assert env["ERL_EPMD_PORT"] == "4380"
    assert env["ERL_EPMD_ADDRESS"] == "127.0.0.1"
    for key in ("HOME", "RABBITMQ_CONF_ENV_FILE", "RABBITMQ_CONFIG_FILE", "RABBITMQ_CONFIG_FILES",
                "RABBITMQ_ADVANCED_CONFIG_FILE", "RABBITMQ_ENABLED_PLUGINS_FILE", "RABBITMQ_MNESIA_BASE",
                "RABBITMQ_LOG_BASE", "RABBITMQ_PID_FILE", "RABBITMQ_MOTD_FILE", "ERL_CRASH_DUMP"):
        assert env[key].startswith(str(node.dir) + "/"), (key, env[key])
    for key in ("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "RABBITMQ_CTL_ERL_ARGS"):
        assert env[key] == "-kernel inet_dist_use_interface {127,0,0,1}"
    assert int(env["RABBITMQ_CTL_DIST_PORT_MIN"]) < int(env["RABBITMQ_CTL_DIST_PORT_MAX"])
    assert "/etc/" not in json.dumps(env)


def test_ports_stay_off_rabbitmq_defaults(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    assert (node.port, node.dist_port, node.epmd_port) == (5673, 25673, 4370)
    assert {node.port, node.dist_port, node.epmd_port}.isdisjoint({5672, 25672, 4369})
    assert TEST_PORT == 5673
    assert make_node(tmp_path, port=5690).dist_port == 25690
    assert make_node(tmp_path, port=5690, dist_port=30000).dist_port == 30000
    with pytest.raises(tool.RabbitToolError):
        make_node(tmp_path, name="bad name")
    with pytest.raises(tool.RabbitToolError):
        make_node(tmp_path, name="a@b")


def test_url_quotes_the_credentials(tmp_path: Path) -> None:
    node = make_node(tmp_path, password="p@ss:/w rd%")
    url = urlparse(node.url)
    assert (url.scheme, url.hostname, url.port) == ("amqp", "127.0.0.1", 5673)
    assert unquote(url.username or "") == "mailcluster"
    assert unquote(url.password or "") == "p@ss:/w rd%"
    assert unquote(url.path[1:]) == "mailcluster"
    assert urlparse(node.url_for("t/1")).path == "/t%2F1"
    assert tool._mask(node.url) == "amqp://mailcluster:****@127.0.0.1:5673/mailcluster"
    assert len(make_node(tmp_path).password) >= 20  # generated


def test_write_config_creates_the_node_directory(tmp_path: Path) -> None:
    node = make_node(tmp_path, password="s3cret")
    node.write_config()
    for sub in ("home", "logs", "mnesia", "conf.d"):
        assert (node.dir / sub).is_dir()
    cookie = node.home / ".erlang.cookie"
    assert stat.S_IMODE(cookie.stat().st_mode) == 0o400  # Erlang refuses a cookie others can read
    assert len(cookie.read_text()) == 40
    for private in ("node.json", "definitions.json"):
        assert stat.S_IMODE((node.dir / private).stat().st_mode) == 0o600, private
    defs = json.loads(node.definitions_file.read_text())
    assert defs["users"][0]["password"] == "s3cret"
    assert f"load_definitions = {node.definitions_file}" in node.conf_file.read_text()
    assert (node.dir / "enabled_plugins").read_text() == "[].\n"
    assert conf_settings((node.dir / "rabbitmq-env.conf").read_text()) == {}

    before = cookie.read_text()
    node.write_config()
    assert cookie.read_text() == before  # the cookie is made once

    again = tool.RabbitNode.load("n1", tmp_path / "nodes")
    assert again.to_json() == node.to_json()
    assert [n.name for n in tool.RabbitNode.all(tmp_path / "nodes")] == ["n1"]


def test_start_options_default_to_the_saved_node(tmp_path: Path) -> None:
    base = tmp_path / "nodes"
    first = tool.RabbitNode.load_or_new("n1", base, port=5690, password=None)
    first.write_config()
    same = tool.RabbitNode.load_or_new("n1", base)
    assert (same.port, same.dist_port, same.password) == (5690, 25690, first.password)  # kept
    moved = tool.RabbitNode.load_or_new("n1", base, port=5691)
    assert (moved.port, moved.dist_port, moved.password) == (5691, 25691, first.password)
    new_pw = tool.RabbitNode.load_or_new("n1", base, password="other")
    assert new_pw.password == "other" and new_pw.port == 5690
    with pytest.raises(tool.RabbitToolError, match="start it first"):
        tool.RabbitNode.load("nope", base)


def test_command_runs_the_start_script_with_a_marker(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    cmd = node.command()
    assert cmd[0] == str(tool.RABBITMQ_BIN / "rabbitmq-server")
    if "MAILCLUSTER_RABBITMQ_BIN" not in os.environ:  # not /usr/sbin's wrapper, which switches user
        assert cmd[0] == "/usr/lib/rabbitmq/bin/rabbitmq-server"
    assert cmd[1:] == [tool.MARKER_FLAG, str(node.dir)]
    assert node.ctl_command(["list_queues"]) == [str(tool.RABBITMQ_BIN / "rabbitmqctl"), "-n", "n1@localhost",
                                                 "list_queues"]


# -- processes


def test_pid_ignores_processes_that_are_not_the_node(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    node.write_config()
    assert node.pid() is None and not node.is_running()
    node.beam_pid_file.write_text(f"{os.getpid()}\n")  # alive, but not this node's VM
    node.pid_file.write_text(f"{os.getpid()}\n")
    assert node.pid() is None and node.script_pid() is None
    assert node.stop() is False  # and so never signalled
    assert not node.pid_file.exists() and not node.beam_pid_file.exists()


def test_kill_signals_the_marked_process(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    node.write_config()
    other = make_node(tmp_path, name="n2")
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tool.MARKER_FLAG, str(node.dir)],
                            start_new_session=True)
    try:
        node.beam_pid_file.write_text(f"{fake.pid}\n")
        deadline = time.monotonic() + 10
        while node.pid() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd
        assert node.pid() == fake.pid and node.is_running()
        other.write_config()
        other.beam_pid_file.write_text(f"{fake.pid}\n")
        assert other.pid() is None  # the marker names another node's directory
        assert node.kill() is True
        assert fake.wait(10) == -9
        assert not node.is_running()
    finally:
        fake.kill()
        fake.wait()


def test_ctl_refuses_a_node_that_is_not_running(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    node.write_config()
    with pytest.raises(tool.RabbitToolError, match="not running"):
        node.ctl(["list_queues"])


def test_start_without_rabbitmq_server_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tool, "RABBITMQ_BIN", tmp_path / "missing")
    with pytest.raises(tool.RabbitToolError, match="install-test-deps"):
        make_node(tmp_path).start(5)


# -- fake servers


def serve_once(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    """A one-connection TCP server on 127.0.0.1 running ``handler``; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                handler(conn)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)
    if errors:
        raise errors[0]


def fake_broker(seen: dict, *, refuse: tuple[int, int, str] | None = None) -> Callable[[socket.socket], None]:
    """An AMQP 0-9-1 server's side of a login; ``refuse`` = (after method, code, text)."""

    def handler(conn: socket.socket) -> None:
        assert tool._recv_exact(conn, 8) == tool.PROTOCOL_HEADER
        props = tool.encode_table({"product": "RabbitMQ", "version": "3.10.8",
                                   "capabilities": {"publisher_confirms": True}})
        conn.sendall(tool.encode_method(0, 10, 10, b"\x00\x09" + props + tool._longstr(b"AMQPLAIN PLAIN")
                                        + tool._longstr(b"en_US")))
        cls, meth, args = tool.read_method(conn)
        assert (cls, meth) == (10, 11)
        seen["client"] = args.table()
        seen["mechanism"] = args.shortstr()
        seen["response"] = args.longstr()
        if refuse and refuse[0] == 11:
            conn.sendall(tool.encode_method(0, 10, 50, struct.pack(">H", refuse[1]) + tool._shortstr(refuse[2])
                                            + struct.pack(">HH", 0, 0)))
            tool.read_method(conn)  # close-ok
            return
        conn.sendall(tool.encode_method(0, 10, 30, struct.pack(">HIH", 2047, 131072, 60)))
        assert tool.read_method(conn)[:2] == (10, 31)
        cls, meth, args = tool.read_method(conn)
        assert (cls, meth) == (10, 40)
        seen["vhost"] = args.shortstr()
        if refuse and refuse[0] == 40:
            conn.sendall(tool.encode_method(0, 10, 50, struct.pack(">H", refuse[1]) + tool._shortstr(refuse[2])
                                            + struct.pack(">HH", 10, 40)))
            tool.read_method(conn)
            return
        conn.sendall(struct.pack(">BHI", 8, 0, 0) + b"\xce")  # a heartbeat is skipped
        conn.sendall(tool.encode_method(0, 10, 41, tool._shortstr("")))
        assert tool.read_method(conn)[:2] == (10, 50)
        conn.sendall(tool.encode_method(0, 10, 51, b""))

    return handler


def test_amqp_login_speaks_amqp_0_9_1() -> None:
    seen: dict = {}
    for port in serve_once(fake_broker(seen)):
        props = tool.amqp_login("127.0.0.1", port, "mailcluster", "pw", "mailcluster")
    assert props == {"product": "RabbitMQ", "version": "3.10.8", "capabilities": {"publisher_confirms": True}}
    assert seen["mechanism"] == "PLAIN"
    assert seen["response"] == b"\0mailcluster\0pw"
    assert seen["vhost"] == "mailcluster"
    assert seen["client"]["capabilities"] == {"authentication_failure_close": True}


@pytest.mark.parametrize("after, code, text", [(11, 403, "ACCESS_REFUSED - Login was refused"),
                                               (40, 530, "NOT_ALLOWED - vhost mailcluster not found")])
def test_amqp_login_reports_a_refusal(after: int, code: int, text: str) -> None:
    seen: dict = {}
    for port in serve_once(fake_broker(seen, refuse=(after, code, text))):
        with pytest.raises(tool.AmqpError) as refused:
            tool.amqp_login("127.0.0.1", port, "mailcluster", "bad", "mailcluster")
    assert (refused.value.code, refused.value.text) == (code, text)


def test_amqp_answers() -> None:
    def start_only(conn: socket.socket) -> None:
        assert tool._recv_exact(conn, 8) == tool.PROTOCOL_HEADER
        conn.sendall(tool.encode_method(0, 10, 10, b"\x00\x09" + tool.encode_table({}) + tool._longstr(b"PLAIN")
                                        + tool._longstr(b"en_US")))

    for port in serve_once(start_only):
        assert tool.amqp_answers("127.0.0.1", port)

    def not_amqp(conn: socket.socket) -> None:
        conn.recv(8)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    for port in serve_once(not_amqp):
        assert not tool.amqp_answers("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not tool.amqp_answers("127.0.0.1", closed, timeout=0.5)


def test_field_tables_round_trip() -> None:
    table = {"s": "text é", "n": -5, "t": True, "f": False, "nested": {"x": 1}}
    assert tool._Buf(tool.encode_table(table)).table() == table
    assert tool._Buf(tool.encode_table({})).table() == {}


def test_epmd_names() -> None:
    def epmd(conn: socket.socket) -> None:
        assert conn.recv(3) == b"\x00\x01n"  # NAMES_REQ
        conn.sendall(struct.pack(">I", 4370) + b"name test at port 25673\nname second at port 25681\n")

    for port in serve_once(epmd):
        assert tool.epmd_names(port) == ["test", "second"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert tool.epmd_names(closed, timeout=0.5) is None


def test_epmd_pid_ignores_processes_that_are_not_our_epmd(tmp_path: Path) -> None:
    epmd = tool.Epmd(4399, tmp_path / ".epmd")
    assert epmd.command() == ["epmd", "-port", "4399", "-address", "127.0.0.1"]
    assert epmd.pid() is None
    epmd.pid_file.parent.mkdir()
    epmd.pid_file.write_text(f"{os.getpid()}\n")
    assert epmd.pid() is None
    assert epmd.stop_if_unused() is False and not epmd.pid_file.exists()
    assert make_node(tmp_path).epmd.pid_file.parent == tmp_path / "nodes" / ".epmd"


def test_arguments_as_rabbitmqctl_prints_them() -> None:
    assert tool._arguments([]) == {}
    assert tool._arguments(None) == {}
    assert tool._arguments([["x-dead-letter-exchange", "longstr", "p.dead"], ["x-max-length", "long", 5]]) == {
        "x-dead-letter-exchange": "p.dead", "x-max-length": 5}
    assert tool._arguments([["k", "v"]]) == {"k": "v"}
    assert tool._arguments({"k": "v"}) == {"k": "v"}


# -- command line


def test_command_line_without_a_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = str(tmp_path / "nodes")
    assert tool.main(["--base", base, "status"]) == 0
    assert "no nodes" in capsys.readouterr().out
    assert tool.main(["--base", base, "url", "--name", "nope"]) == 1
    assert "start it first" in capsys.readouterr().err
    make_node(tmp_path, name="x", password="pw").write_config()
    assert tool.main(["--base", base, "url", "--name", "x"]) == 0
    assert capsys.readouterr().out.strip() == "amqp://mailcluster:pw@127.0.0.1:5673/mailcluster"
    assert tool.main(["--base", base, "status"]) == 0
    out = capsys.readouterr().out
    assert "down" in out and "pw@" not in out
    assert tool.main(["--base", base, "ctl", "--name", "x", "--", "list_queues"]) == 1
    assert "not running" in capsys.readouterr().err
    assert tool.main(["--base", base, "stop", "--name", "x"]) == 0
    assert "was not running" in capsys.readouterr().out
    assert tool.main(["--base", base, "stop-all"]) == 0
    assert "no node was running" in capsys.readouterr().out


def test_tool_is_standard_library_only() -> None:
    script = ("import sys; sys.modules['pika'] = None; sys.modules['pytest'] = None; "
              f"import runpy; runpy.run_path({str(tool.__file__)!r}, run_name='rabbitmq_tool')")
    subprocess.run([sys.executable, "-I", "-c", script], check=True, timeout=30)


# -- TLS (start --tls): a listener of its own with a certificate of the test CA


@pytest.fixture
def test_ca_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test CA of tools/test_ca.py, in a folder of the test's own."""
    ca_dir = tmp_path / "test-ca"
    monkeypatch.setattr(tool.load_test_ca(), "DEFAULT_CA_DIR", ca_dir)
    return ca_dir


def test_tls_listener_settings(tmp_path: Path) -> None:
    listener = tool.TlsListener(6673, tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem")
    c = conf_settings(tool.render_rabbitmq_conf(name="n1", definitions=tmp_path / "d.json", tls=listener))
    assert c["listeners.ssl.default"] == "127.0.0.1:6673"
    assert (c["ssl_options.certfile"], c["ssl_options.keyfile"], c["ssl_options.cacertfile"]) == (
        str(tmp_path / "server.pem"), str(tmp_path / "server.key"), str(tmp_path / "ca.pem"))
    assert (c["ssl_options.verify"], c["ssl_options.fail_if_no_peer_cert"]) == ("verify_none", "false")
    assert [v for k, v in sorted(c.items()) if k.startswith("ssl_options.versions.")] == ["tlsv1.3", "tlsv1.2"]


def test_tls_node_gets_a_certificate_and_an_amqps_url(tmp_path: Path, test_ca_dir: Path) -> None:
    from cryptography import x509

    node = make_node(tmp_path, port=5673, tls_port=6673, password="p w")
    node.write_config()
    c = conf_settings(node.conf_file.read_text())
    assert c["listeners.ssl.default"] == "127.0.0.1:6673"
    assert os.stat(node.tls_dir / "server.key").st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificates((node.tls_dir / "server.pem").read_bytes())[0]
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(node.ca_file.read_bytes()))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert node.tls_url == "amqps://mailcluster:p%20w@127.0.0.1:6673/mailcluster"
    assert tool.RabbitNode.load("n1", node.base).tls_port == 6673
    plain = make_node(tmp_path, name="n2")
    with pytest.raises(tool.RabbitToolError, match="no TLS listener"):
        plain.tls_url_for("v")
    plain.write_config()
    assert "listeners.ssl" not in plain.conf_file.read_text() and not plain.tls_dir.exists()


def test_tls_port_option_defaults_next_to_the_amqp_port(tmp_path: Path) -> None:
    def tls_port(**given: object) -> int | None:
        args = dict(name="n1", port=None, tls=False, tls_port=None)
        args.update(given)
        return tool._tls_port(argparse.Namespace(**args), tmp_path)

    assert tls_port() is None
    assert tls_port(tls=True) == 6673
    assert tls_port(tls=True, port=5700) == 6700
    assert tls_port(tls_port=7000) == 7000
