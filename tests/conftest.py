"""Fixtures every test directory may use.

The fixture modules are loaded as pytest plugins (pytest's documented way to
share fixtures kept outside conftest files), so test modules take
``cassandra_node``, ``rabbitmq``, ``make_site``, ``start`` and the others
as arguments without importing them:

* ``tests.cassandra_cluster``: ``cassandra_node``, ``cassandra_two_dc``;
* ``tests.rabbitmq_broker``: ``rabbitmq``, ``rabbitmq_vhost``;
* ``tests.helpers.imap``: ``make_site`` (the IMAP sites, ours and Twisted's);
* ``tests.helpers.smtp``: ``start`` (the SMTP sites, ours and Twisted's);
* ``tests.helpers.mailserver``: ``provisioned``, ``server``, ``untrusted``,
  ``isolated_home`` (real ``twistd`` nodes, for tests/e2e and tests/hostile).

pytest accepts ``pytest_plugins`` only in the top-level conftest, hence here.
"""

pytest_plugins = [
    "tests.cassandra_cluster",
    "tests.rabbitmq_broker",
    "tests.helpers.imap",
    "tests.helpers.smtp",
    "tests.helpers.mailserver",
]
