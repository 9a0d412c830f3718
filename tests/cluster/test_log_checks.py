"""The denial check that the RBAC tests run on the operator's log (pure: no server)."""

from __future__ import annotations

import pytest

from tests.cluster.log_checks import denials


@pytest.mark.parametrize(
    ("line", "denied"),
    [
        ("[2026-11-23 02:41:09,403] kopf.objects [DEBUG] Handler 'reconcile-create' is invoked.", False),
        ("... 'resourceVersion': '2403', 'uid': '7552d693-4030-4d3e' ...", False),
        ("APIForbiddenError: ('pods is forbidden: User \"system:serviceaccount:x:y\" cannot list', ...)", True),
        ("Not enough permissions to watch for resources: changes will not be noticed", True),
        ("HTTP response body: {'kind': 'Status', 'reason': 'Forbidden', 'code': 403}", True),
        ("kubernetes.client.exceptions.ApiException: (403)", True),
    ],
)
def test_denial_pattern_tells_denials_from_digits(line: str, denied: bool) -> None:
    """The log check above must catch every form a denial takes and nothing else."""
    assert bool(denials(line)) is denied
