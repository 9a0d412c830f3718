"""Load the control-plane fixtures for ``pytest tests/cluster`` runs.

import_plugin is idempotent: when tests/conftest.py already lists "tests.cluster.fixtures" in
pytest_plugins, this is a no-op and the session fixture stays single (one control plane per run).
"""


def pytest_configure(config):
    config.pluginmanager.import_plugin("tests.cluster.fixtures")
