"""``mailcluster-admin``: domains, users and maintenance from a shell.

It opens the store the config names, as the server does (the embedded store's SQLite file is
safe to share between processes in WAL mode), so it works whether or not a
node is running.  Passwords are never taken from the command line, where
``ps`` and shell history would show them: they are read from standard input
when it is not a terminal (one line), or prompted for twice on a terminal.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from ..accounts import Accounts
from ..config import Config, ConfigError, load_config
from ..events.inprocess import InProcessEventBus
from ..events.model import encode
from ..events.rabbitmq import RabbitMQEventBus
from ..logs import configure_structlog
from ..mailbox_service import MailboxService
from ..service import open_store
from ..store.interfaces import IMailStore
from ..store.errors import StoreError
from ..private_files import keep_private
from .tls import show_certificates

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class AdminError(Exception):
    """A problem to report in one line, with exit status 1."""


#: The end of ``--help``: how to give a password without putting it in argv.
EPILOG = """\
Passwords are read from standard input when it is not a terminal (the first
line, without its newline), for example:

    printf '%s\\n' "$PW" | mailcluster-admin user add alice@example.test

On a terminal they are prompted for twice. They are never accepted as arguments.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailcluster-admin",
        description="Manage domains and users of a twisted-mail-cluster store.",
        # Raw: the example is a command to paste, so it keeps its own line, unwrapped.
        # argparse does not %-format an epilog (only help= strings): a single % here.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--config", type=Path, help="the node's TOML configuration file")
    parser.add_argument(
        "--data", type=Path,
        help="data folder of the embedded store (default ./mailcluster-data; wins over the config's)",
    )
    topics = parser.add_subparsers(dest="topic", required=True)

    domain = topics.add_parser("domain", help="local domains").add_subparsers(dest="action", required=True)
    domain.add_parser("list", help="list local domains")
    for action, text in (("add", "add a local domain"), ("remove", "remove a domain without users")):
        domain.add_parser(action, help=text).add_argument("name")

    user = topics.add_parser("user", help="users (mail addresses)").add_subparsers(dest="action", required=True)
    user.add_parser("list", help="list users").add_argument("domain", nargs="?")
    for action, text in (
        ("add", "add a user (password from stdin or prompt) with INBOX, Sent, Drafts, Trash, Junk"),
        ("remove", "remove a user with all their mail"),
        ("passwd", "set a user's password (from stdin or prompt)"),
    ):
        user.add_parser(action, help=text).add_argument("address")

    topics.add_parser("gc", help="remove stored content that no message refers to")

    tls = topics.add_parser("tls", help="the node's TLS certificates").add_subparsers(dest="action", required=True)
    tls.add_parser("show", help="each certificate's names, end of validity and SHA-256 fingerprint")

    events = topics.add_parser("events", help="the cluster event bus (RabbitMQ)").add_subparsers(
        dest="action", required=True
    )
    events.add_parser("dead-letters", help="list a group listener's dead letters").add_argument("group")
    events.add_parser("replay", help="hand a group's dead letters to it again").add_argument("group")
    return parser


def read_password(stdin: TextIO) -> str:
    """One password: a line of a pipe, or typed twice on a terminal."""
    if not stdin.isatty():
        line = stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise AdminError("the passwords do not match")
    if not password:
        raise AdminError("no password given (empty line on standard input?)")
    return password


def _config(args: argparse.Namespace) -> Config:
    overrides = {"server.data": str(args.data)} if args.data else None
    return load_config(args.config, overrides)


async def run(args: argparse.Namespace, reactor: Any, stdin: TextIO, stdout: TextIO) -> None:
    config = _config(args)
    if args.topic == "tls":
        show_certificates(config, stdout)
        return
    if args.topic == "events":
        await _events(args, config, reactor, stdout)
        return
    if config.store.backend == "embedded":
        for warning in keep_private(config.data_dir):  # the same files the node writes
            sys.stderr.write(f"mailcluster-admin: warning: {warning}\n")
    store = open_store(config, reactor)
    await store.start()
    try:
        accounts = Accounts(MailboxService(store, InProcessEventBus(reactor)))
        await _act(args, accounts, store, stdin, stdout)
    finally:
        await store.close()


async def _act(args: argparse.Namespace, accounts: Accounts, store: IMailStore, stdin: TextIO, stdout: TextIO) -> None:
    topic, action = args.topic, getattr(args, "action", None)
    if topic == "domain":
        if action == "list":
            for name in await store.list_domains():
                stdout.write(name + "\n")
        elif action == "add":
            stdout.write(f"domain {await accounts.add_domain(args.name)} added\n")
        else:
            await accounts.remove_domain(args.name)
            stdout.write(f"domain {args.name} removed\n")
    elif topic == "user":
        if action == "list":
            for user in await store.list_users(args.domain):
                stdout.write(user.address + "\n")
        elif action == "add":
            user = await accounts.add_user(args.address, read_password(stdin))
            stdout.write(f"user {user.address} added\n")
        elif action == "remove":
            await accounts.remove_user(args.address)
            stdout.write(f"user {args.address} removed\n")
        else:
            await accounts.set_password(args.address, read_password(stdin))
            stdout.write(f"password of {args.address} changed\n")
    elif topic == "gc":
        stdout.write(f"{await store.collect_garbage()} unreferenced contents removed\n")


async def _events(args: argparse.Namespace, config: Config, reactor: Any, stdout: TextIO) -> None:
    """Dead letters live in the broker; an in-process bus keeps them inside its node."""
    if config.events.bus != "rabbitmq":
        raise AdminError(
            "events.bus is in-process: its dead letters live inside the running node; "
            "use the manhole: bus.dead_letters('GROUP')"
        )
    bus = RabbitMQEventBus(config.events.rabbitmq.url, reactor, ca_file=config.events.rabbitmq.ca_file)
    await bus.start()
    try:
        connected = bus.when_connected()
        connected.addTimeout(15, reactor)
        try:
            await connected
        except Exception:
            raise AdminError(f"cannot reach RabbitMQ at {_without_password(config.events.rabbitmq.url)}") from None
        if args.action == "dead-letters":
            for event in await bus.dead_letters(args.group):
                stdout.write(encode(event).decode() + "\n")
        else:
            stdout.write(f"{await bus.replay_dead_letters(args.group)} dead letters handed to {args.group} again\n")
    finally:
        await bus.stop()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; exits 0 on success, 1 with one line on stderr on failure, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    # What the shell user asked for goes to stdout; the store's own log lines
    # would only be noise there, so only warnings and errors, as JSON, on stderr.
    configure_structlog(sys.stderr, "warning")

    def job(reactor: Any) -> Deferred[None]:
        d = Deferred.fromCoroutine(run(args, reactor, sys.stdin, sys.stdout))
        d.addErrback(_one_line)
        return d

    react(job)


def _one_line(failure: Any) -> None:
    """Expected problems become one line and status 1; anything else keeps its traceback."""
    error = failure.value
    if isinstance(error, (StoreError, AdminError, ConfigError, ValueError)):
        sys.stderr.write(f"mailcluster-admin: {error}\n")
        raise SystemExit(EXIT_FAILED)
    failure.raiseException()
