"""Accounts: domains, users, provisioning and password checks over a real store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from twisted_mail_cluster.accounts import Accounts
from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.mailbox_service import MailboxService
from twisted_mail_cluster.store.embedded import EmbeddedStore
from twisted_mail_cluster.store.errors import AlreadyExists, InvalidName, NotFound
from twisted_mail_cluster.store.model import User

ensure = pytest_twisted.ensureDeferred
ADDRESS = "alice@example.com"
DEFAULTS = [
    ("Drafts", "\\Drafts"),
    ("INBOX", None),
    ("Junk", "\\Junk"),
    ("Sent", "\\Sent"),
    ("Trash", "\\Trash"),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "mail.sqlite", reactor)
    pytest_twisted.blockon(s.start())
    yield s
    pytest_twisted.blockon(s.close())


@pytest.fixture
def accounts(store) -> Accounts:
    return Accounts(MailboxService(store, InProcessEventBus(reactor)))


@pytest.fixture
def domain(accounts) -> str:
    return pytest_twisted.blockon(accounts.add_domain("example.com"))


async def mailboxes(store, address: str) -> list[tuple[str, str | None]]:
    return [(m.name, m.special_use) for m in await store.list_mailboxes(address)]


@ensure
async def test_add_domain_normalises_and_refuses_bad_names(accounts, store) -> None:
    assert await accounts.add_domain(" Example.COM. ") == "example.com"
    assert await store.list_domains() == ["example.com"]
    with pytest.raises(AlreadyExists):
        await accounts.add_domain("EXAMPLE.com")
    for bad in ["not a domain", "", "-bad.example", "bad-.example", "a..example", "a.-b.example",
                "ex_ample.com", "a@b.c", ".", "\u00e9xample.com", "x" * 64 + ".com",
                "example.com\nevil"]:
        with pytest.raises(InvalidName):
            await accounts.add_domain(bad)
    assert await store.list_domains() == ["example.com"]
    longest_label = "x" * 63 + ".example"
    assert await accounts.add_domain("mail-1." + longest_label) == "mail-1." + longest_label
    assert await accounts.add_domain("localhost") == "localhost"


@ensure
async def test_remove_domain(accounts, store, domain) -> None:
    await accounts.add_domain("example.org")
    await accounts.remove_domain("Example.ORG")
    assert await store.list_domains() == ["example.com"]
    with pytest.raises(NotFound):
        await accounts.remove_domain("example.org")


@ensure
async def test_add_user_provisions_default_mailboxes(accounts, store, domain) -> None:
    user = await accounts.add_user(ADDRESS, "correct horse")
    assert user.address == ADDRESS
    assert user.password_hash.startswith("$argon2id$")
    assert "correct horse" not in user.password_hash
    assert await store.get_user(ADDRESS) == user
    assert await mailboxes(store, ADDRESS) == DEFAULTS
    assert await store.list_subscriptions(ADDRESS) == ["Drafts", "INBOX", "Junk", "Sent", "Trash"]


@ensure
async def test_add_user_normalises_the_address(accounts, store, domain) -> None:
    user = await accounts.add_user("  Alice@Example.COM ", "pw")
    assert user.address == ADDRESS
    assert [u.address for u in await store.list_users()] == [ADDRESS]
    assert await mailboxes(store, ADDRESS) == DEFAULTS
    with pytest.raises(AlreadyExists):
        await accounts.add_user("ALICE@example.com", "other")


@ensure
async def test_add_user_refuses_invalid_addresses(accounts, store, domain) -> None:
    for bad in ["alice", "alice@", "@example.com", "al ice@example.com", "alice@exa mple.com",
                "alice@-example.com", "alice@example-.com", "alice@example..com",
                "a<b@example.com", "alice@example.com@example.com", "alice@example.com\nx", ""]:
        with pytest.raises(InvalidName):
            await accounts.add_user(bad, "pw")
    assert await store.list_users() == []


@ensure
async def test_add_user_to_unknown_domain(accounts, store, domain) -> None:
    with pytest.raises(NotFound):
        await accounts.add_user("alice@example.org", "pw")
    assert await store.list_users() == []
    assert await store.list_mailboxes("alice@example.org") == []


@ensure
async def test_provision_is_idempotent_and_repairs(accounts, store, domain) -> None:
    await accounts.add_user(ADDRESS, "pw")
    junk = await store.get_mailbox(ADDRESS, "Junk")
    await store.delete_mailbox(junk.id)
    await store.unsubscribe(ADDRESS, "Sent")
    inbox = await store.get_mailbox(ADDRESS, "INBOX")

    await accounts.provision(ADDRESS)
    await accounts.provision(ADDRESS)

    assert await mailboxes(store, ADDRESS) == DEFAULTS
    assert await store.get_mailbox(ADDRESS, "INBOX") == inbox
    assert await store.list_subscriptions(ADDRESS) == ["Drafts", "INBOX", "Junk", "Sent", "Trash"]


@ensure
async def test_authenticate(accounts, domain) -> None:
    await accounts.add_user(ADDRESS, "s3cret p\u00e4ss")
    user = await accounts.authenticate(ADDRESS, "s3cret p\u00e4ss")
    assert isinstance(user, User) and user.address == ADDRESS
    assert await accounts.authenticate(" ALICE@example.COM", "s3cret p\u00e4ss") == user
    assert await accounts.authenticate(ADDRESS, "s3cret pass") is None
    assert await accounts.authenticate(ADDRESS, "S3CRET P\u00c4SS") is None
    assert await accounts.authenticate(ADDRESS, "") is None
    assert await accounts.authenticate(ADDRESS, "x" * 5000) is None
    assert await accounts.authenticate("bob@example.com", "s3cret p\u00e4ss") is None


@ensure
async def test_set_password(accounts, store, domain) -> None:
    await accounts.add_user(ADDRESS, "old password")
    await accounts.set_password("Alice@Example.com", "new password")
    assert await accounts.authenticate(ADDRESS, "old password") is None
    assert (await accounts.authenticate(ADDRESS, "new password")).address == ADDRESS
    with pytest.raises(NotFound):
        await accounts.set_password("bob@example.com", "whatever")


@ensure
async def test_remove_user(accounts, store, domain) -> None:
    await accounts.add_user(ADDRESS, "pw")
    await accounts.remove_user("ALICE@example.com")
    assert await store.get_user(ADDRESS) is None
    assert await store.list_mailboxes(ADDRESS) == []
    assert await accounts.authenticate(ADDRESS, "pw") is None


@ensure
async def test_inbox_is_created_on_demand(accounts, store, domain) -> None:
    await accounts.add_user(ADDRESS, "pw")
    inbox = await store.get_mailbox(ADDRESS, "INBOX")
    assert await accounts.inbox(ADDRESS) == inbox
    await store.delete_mailbox(inbox.id)
    again = await accounts.inbox(ADDRESS)
    assert again.name == "INBOX" and again.id != inbox.id
    assert await store.get_mailbox(ADDRESS, "INBOX") == again
