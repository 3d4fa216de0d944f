"""A node whose RabbitMQ login is refused: it serves mail, says why in its log, retries with backoff.

Real broker (tests/rabbitmq_broker.py), real ``twistd mailcluster`` on the
embedded store with ``[events] bus = "rabbitmq"`` and a wrong password.
Twisted's ClientService logged an automat ``NoTransition`` "Unhandled Error"
at every such attempt (events/reconnect.py); the operator gets one line that
names the cause instead.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.helpers.mailserver import BIN, free_port, wait_for_ports
from tests.rabbitmq_broker import RabbitService, eventually


def test_refused_login_is_logged_once_per_attempt_with_backoff(tmp_path: Path, rabbitmq: RabbitService) -> None:
    vhost = rabbitmq.unique_vhost("badpw")
    parts = urlsplit(vhost.url)
    wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:not-the-password@{parts.hostname}:{parts.port}"))
    smtp = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[smtp]\nlisten = "tcp:{smtp}:interface=127.0.0.1"\n'
        '[pop3]\nlisten = []\nlisten_tls = []\n[imap]\nlisten = []\nlisten_tls = []\n'
        f'[events]\nbus = "rabbitmq"\n[events.rabbitmq]\nurl = "{wrong}"\n'
    )
    log_path = tmp_path / "twistd.out"
    process = subprocess.Popen(
        [
            str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster",
            "--config", str(config), "--data", str(tmp_path / "d"),
        ],
        cwd=tmp_path, stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_ports(process, (smtp,), log_path)
        with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as client:  # the node serves without its bus
            assert client.ehlo("client.test")[0] == 250

        def refusals() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
            return [e for e in lines if e.get("event") == "bus.setup_failed"]

        seen = eventually(lambda: len(refusals()) >= 4 and refusals(), timeout=30, interval=0.2,
                          message="four refused attempts")
        assert {e["error"] for e in seen} == {
            "RabbitMQ refused the login: check the user and password in events.rabbitmq.url"
        }
        assert [e["failures"] for e in seen[:4]] == [1, 2, 3, 4]
        times = [datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")) for e in seen[:4]]
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
        # 0.5 s, 1 s, 2 s (±20 %), plus the time a refused login takes
        assert gaps[0] < gaps[2] and 0.4 <= gaps[0] and 1.6 <= gaps[2], gaps
        text = log_path.read_text()
        assert "Unhandled Error" not in text and "NoTransition" not in text
        assert "not-the-password" not in text  # the URL's password is never logged
    finally:
        process.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        status = process.wait(timeout=30)
        rabbitmq.delete_vhost(vhost.name)
    # twistd ends a SIGTERM shutdown by re-raising the signal, as its exit status
    assert status == -signal.SIGTERM and time.monotonic() - t0 < 10
    assert '"Server Shut Down."' in log_path.read_text()
