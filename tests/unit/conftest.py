"""Fixtures shared by the unit tests."""

from tests.helpers.imap import make_site  # noqa: F401 - a fixture, offered to every unit test
