"""Shared pytest wiring: the local control plane fixtures (tests/cluster) for every test folder."""

pytest_plugins = ["tests.cluster.fixtures"]
