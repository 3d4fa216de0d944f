"""Command-line options of ``twistd mailcluster``.

The configuration is loaded and checked inside :meth:`postOptions`, that is
while twistd is still parsing its command line.  A :class:`ConfigError`
prints one line, ``twistd mailcluster: <key>: <problem>``, on stderr and
exits with status 1 (:class:`ConfigRefused`) - before twistd builds the
application, so before any port is opened, any file is written, or logging
starts.  Misused options themselves (``--smtp`` with ``--no-smtp``) stay
twistd's usual UsageError, with the usage text.

The listener options behave like ``twistd mail``'s ``--smtp``: each use adds
one endpoint, and if any is given they replace the configured list for that
protocol (``--smtp`` twice gives two SMTP listeners and drops the file's).
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.python import usage

from twisted_mail_cluster.config import Config, ConfigError, load_config

__all__ = ["MailClusterOptions"]

_PROTOCOLS = ("smtp", "pop3", "imap")
#: Implicit-TLS listener options and the protocol whose --no-* also silences them.
_TLS_LISTENERS = {"imaps": "imap", "pop3s": "pop3"}


class ConfigRefused(SystemExit):
    """A bad configuration value: one line on stderr, exit status 1, nothing started.

    A SystemExit rather than twistd's UsageError, because twistd answers a
    UsageError with its whole usage text, and the operator needs the one
    line that names the key and the problem, not four screens of options.
    """

    def __init__(self, message: str) -> None:
        sys.stderr.write(f"twistd mailcluster: {message}\n")
        sys.stderr.flush()
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


class MailClusterOptions(usage.Options):
    """Options of the ``mailcluster`` twistd plugin; the result is ``self.config``."""

    synopsis = "[options]"
    longdesc = (
        "Run a twisted-mail-cluster node: SMTP, POP3 and IMAP on one mailbox store. "
        "With no options at all it serves the embedded store in ./mailcluster-data "
        "on loopback ports 2525 (SMTP), 2110 (POP3), 2143 (IMAP), 2995 (POP3S) and "
        "2993 (IMAPS). Options given here win over the --config file."
    )

    optFlags = [
        ["no-smtp", None, "Do not serve SMTP on this node."],
        ["no-pop3", None, "Do not serve POP3 (nor POP3S) on this node."],
        [
            "no-imap",
            None,
            "Do not serve IMAP (nor IMAPS) on this node (deliveries still maintain the IMAP "
            "view; set imap.enabled = false in the config file to drop it).",
        ],
    ]

    optParameters = [
        ["config", "c", None, "TOML configuration file (see conf/mailcluster.example.toml)."],
        ["data", None, None, "Data folder of the embedded store [server] data."],
        ["hostname", "H", None, "Host name in greetings and Received lines [server] hostname."],
    ]

    compData = usage.Completions(
        optActions={
            "config": usage.CompleteFiles("*.toml"),
            "data": usage.CompleteDirs(),
        },
        mutuallyExclusive=[(p, f"no-{p}") for p in _PROTOCOLS],
    )

    config: Config

    def __init__(self) -> None:
        super().__init__()
        for name in (*_PROTOCOLS, *_TLS_LISTENERS):
            self[name] = []

    def opt_smtp(self, endpoint: str) -> None:
        """SMTP listener endpoint, e.g. tcp:25 (repeatable; replaces [smtp] listen)."""
        self["smtp"].append(endpoint)

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 listener endpoint, e.g. tcp:110 (repeatable; replaces [pop3] listen)."""
        self["pop3"].append(endpoint)

    def opt_imap(self, endpoint: str) -> None:
        """IMAP listener endpoint, e.g. tcp:143 (repeatable; replaces [imap] listen)."""
        self["imap"].append(endpoint)

    def opt_imaps(self, endpoint: str) -> None:
        """IMAP with implicit TLS, e.g. tcp:993 (repeatable; replaces [imap] listen_tls)."""
        self["imaps"].append(endpoint)

    def opt_pop3s(self, endpoint: str) -> None:
        """POP3 with implicit TLS, e.g. tcp:995 (repeatable; replaces [pop3] listen_tls)."""
        self["pop3s"].append(endpoint)

    opt_s = opt_smtp
    opt_p = opt_pop3
    opt_i = opt_imap

    def postOptions(self) -> None:
        """Build the Config now, so a mistake stops twistd before anything starts."""
        overrides = self.overrides()
        path = Path(self["config"]) if self["config"] else None
        try:
            self.config = load_config(path, overrides)
        except ConfigError as e:
            raise ConfigRefused(str(e)) from e

    def overrides(self) -> dict[str, object]:
        """The dotted-key overrides these options stand for (None = not given)."""
        overrides: dict[str, object] = {
            "server.data": self["data"],
            "server.hostname": self["hostname"],
        }
        for protocol in _PROTOCOLS:
            given: list[str] = self[protocol]
            if self[f"no-{protocol}"]:
                if given:
                    raise usage.UsageError(
                        f"--{protocol} and --no-{protocol} cannot be used together"
                    )
                overrides[f"{protocol}.listen"] = []
            elif given:
                overrides[f"{protocol}.listen"] = list(given)
        for option, protocol in _TLS_LISTENERS.items():
            given = self[option]
            if self[f"no-{protocol}"]:
                if given:
                    raise usage.UsageError(f"--{option} and --no-{protocol} cannot be used together")
                overrides[f"{protocol}.listen_tls"] = []
            elif given:
                overrides[f"{protocol}.listen_tls"] = list(given)
        return overrides
