"""Shared pytest wiring: the local control plane (tests/cluster) and the SeaweedFS S3 server
(tests/s3server.py) fixtures, for every test folder."""

pytest_plugins = ["tests.cluster.fixtures", "tests.s3server"]
