"""Fixtures every test directory may use."""

from tests.cassandra_cluster import cassandra_node, cassandra_two_dc  # noqa: F401 - fixtures
from tests.rabbitmq_broker import rabbitmq, rabbitmq_vhost  # noqa: F401 - fixtures
