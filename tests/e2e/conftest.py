"""The e2e tests' fixtures and node harness are in tests/helpers/mailserver.py
(registered in tests/conftest.py), shared with tests/hostile."""
