"""LoginGuard policies, and AccountsChecker + MailRealm through a real cred Portal."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.task import Clock
from zope.interface import Interface

from twisted_mail_cluster.accounts import Accounts
from twisted_mail_cluster.auth import AccountsChecker, MailRealm
from twisted_mail_cluster.login_guard import LoginGuard
from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.mailbox_service import MailboxService
from twisted_mail_cluster.store.embedded import EmbeddedStore

ensure = pytest_twisted.ensureDeferred
TRUSTED = [
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fd00::/8"),
]


def guard(clock: Clock | None = None, **kwargs) -> LoginGuard:
    return LoginGuard(clock or Clock(), TRUSTED, **kwargs)


# -- plaintext logins ---------------------------------------------------------------


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("127.0.0.1", True),
        ("127.200.3.4", True),
        ("10.9.8.7", True),
        ("::1", True),
        ("fd12:3456::1", True),
        ("fd12:3456::1%eth0", True),  # zone index
        ("::ffff:127.0.0.1", True),  # IPv4-mapped, as a dual-stack socket reports it
        ("::ffff:10.1.2.3", True),
        ("::ffff:192.0.2.1", False),
        ("192.0.2.1", False),
        ("11.0.0.1", False),
        ("2001:db8::1", False),
        ("::2", False),
        ("fe80::1%eth0", False),
        ("localhost", False),
        ("", False),
        ("127.0.0.1.evil.example", False),
    ],
)
def test_plaintext_allowed_from_trusted_networks_only(host: str, allowed: bool) -> None:
    assert guard().plaintext_allowed(host) is allowed
    assert guard().plaintext_allowed(host, encrypted=True) is True


def test_no_trusted_networks_means_tls_only() -> None:
    g = LoginGuard(Clock(), [])
    assert g.plaintext_allowed("127.0.0.1") is False
    assert g.plaintext_allowed("::ffff:127.0.0.1") is False
    assert g.plaintext_allowed("127.0.0.1", encrypted=True) is True


# -- failed-login delays --------------------------------------------------------------


def test_delay_doubles_up_to_the_maximum() -> None:
    clock = Clock()
    g = guard(clock, failed_login_delay=2.0, max_failed_login_delay=30.0, failure_window=300.0)
    delays = []
    for _ in range(7):
        delays.append(g.failed("192.0.2.1"))
        clock.advance(1)
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert g.failures("192.0.2.1") == 7


def test_hosts_are_counted_separately() -> None:
    g = guard(failed_login_delay=1.0, max_failed_login_delay=100.0)
    assert [g.failed("192.0.2.1") for _ in range(3)] == [1.0, 2.0, 4.0]
    assert g.failed("192.0.2.2") == 1.0
    assert (g.failures("192.0.2.1"), g.failures("192.0.2.2"), g.failures("192.0.2.3")) == (3, 1, 0)


def test_failures_expire_after_the_window() -> None:
    clock = Clock()
    g = guard(clock, failed_login_delay=2.0, max_failed_login_delay=30.0, failure_window=300.0)
    assert g.failed("192.0.2.1") == 2.0
    clock.advance(100)
    assert g.failed("192.0.2.1") == 4.0
    clock.advance(300)  # exactly the window since the last failure: still counted
    assert g.failures("192.0.2.1") == 2
    assert g.failed("192.0.2.1") == 8.0
    clock.advance(300.5)  # more than the window since the last failure: forgotten
    assert g.failures("192.0.2.1") == 0
    assert g.failed("192.0.2.1") == 2.0
    assert g.failures("192.0.2.1") == 1


def test_success_resets() -> None:
    g = guard(failed_login_delay=2.0)
    for _ in range(3):
        g.failed("192.0.2.1")
    g.failed("192.0.2.2")
    g.succeeded("192.0.2.1")
    assert g.failures("192.0.2.1") == 0
    assert g.failed("192.0.2.1") == 2.0
    assert g.failures("192.0.2.2") == 1
    g.succeeded("192.0.2.99")  # never failed: nothing to forget
    assert g.failures("192.0.2.99") == 0


def test_tracking_is_bounded_oldest_first() -> None:
    clock = Clock()
    g = guard(clock, failed_login_delay=1.0, max_failed_login_delay=64.0)
    g.MAX_TRACKED = 3
    for host in ["192.0.2.1", "192.0.2.2", "192.0.2.3"]:
        g.failed(host)
        clock.advance(1)
    g.failed("192.0.2.1")  # fails again: now the most recent
    g.failed("192.0.2.4")  # one too many: the oldest (192.0.2.2) is forgotten
    assert [g.failures(h) for h in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]] == [2, 0, 1, 1]


# -- checker and realm through a Portal -----------------------------------------------


class IMailAvatar(Interface):
    pass


class IOtherAvatar(Interface):
    pass


class Avatar:
    def __init__(self, address: str) -> None:
        self.address = address
        self.logged_out = False

    def logout(self) -> None:
        self.logged_out = True


@pytest.fixture
def accounts(tmp_path: Path) -> Iterator[Accounts]:
    store = EmbeddedStore(tmp_path / "mail.sqlite", reactor)
    pytest_twisted.blockon(store.start())
    a = Accounts(MailboxService(store, InProcessEventBus(reactor)))
    pytest_twisted.blockon(a.add_domain("example.com"))
    pytest_twisted.blockon(a.add_user("alice@example.com", "right password \u00e9"))
    yield a
    pytest_twisted.blockon(store.close())


@pytest.fixture
def portal(accounts) -> Portal:
    async def make(address: str) -> Avatar:
        return Avatar(address)

    return Portal(MailRealm({IMailAvatar: make}), [AccountsChecker(accounts)])


@ensure
async def test_right_password_logs_in(portal) -> None:
    password = "right password \u00e9".encode()
    interface, avatar, logout = await portal.login(
        UsernamePassword(b"Alice@Example.COM", password), None, IMailAvatar
    )
    assert interface is IMailAvatar
    assert isinstance(avatar, Avatar)
    assert avatar.address == "alice@example.com"
    assert avatar.logged_out is False
    logout()
    assert avatar.logged_out is True


@ensure
async def test_text_credentials_log_in(portal) -> None:
    _, avatar, _ = await portal.login(
        UsernamePassword("alice@example.com", "right password \u00e9"), None, IOtherAvatar, IMailAvatar
    )
    assert avatar.address == "alice@example.com"


@pytest.mark.parametrize(
    "username, password",
    [
        (b"alice@example.com", b"wrong password"),
        (b"alice@example.com", b""),
        (b"bob@example.com", "right password \u00e9".encode()),
        (b"alice@example.com", b"right password \xe9"),  # Latin-1, not UTF-8
        (b"\xff\xfe@example.com", b"x"),
        (b"", b""),
    ],
)
@ensure
async def test_wrong_credentials_are_refused(portal, username, password) -> None:
    with pytest.raises(UnauthorizedLogin):
        await portal.login(UsernamePassword(username, password), None, IMailAvatar)


@ensure
async def test_no_avatar_for_an_unserved_interface(portal) -> None:
    with pytest.raises(NotImplementedError):
        await portal.login(
            UsernamePassword(b"alice@example.com", "right password \u00e9".encode()), None, IOtherAvatar
        )


@ensure
async def test_checker_gives_the_canonical_address(accounts) -> None:
    checker = AccountsChecker(accounts)
    avatar_id = await checker.requestAvatarId(
        UsernamePassword(b" ALICE@example.com", "right password \u00e9".encode())
    )
    assert avatar_id == b"alice@example.com"


def test_ipv6_failures_count_per_64_prefix_and_mapped_ipv4_per_address() -> None:
    clock = Clock()
    guard = LoginGuard(clock, [], failed_login_delay=1.0, max_failed_login_delay=60.0)
    assert guard.failed("2001:db8:1:2::10") == 1.0
    assert guard.failed("2001:db8:1:2:ffff::99") == 2.0  # same /64: the delay keeps growing
    assert guard.failed("2001:db8:1:3::10") == 1.0  # another /64
    assert guard.failed("::ffff:192.0.2.7") == 1.0
    assert guard.failed("192.0.2.7") == 2.0  # the mapped form is the same client
    guard.succeeded("2001:db8:1:2::abcd")
    assert guard.failures("2001:db8:1:2::10") == 0
