"""Configuration shared by the unit tests.

Their shared fixtures (``make_site``, ``start``) come from the plugins that
``tests/conftest.py`` names in ``pytest_plugins``.
"""
