"""Checks on an operator's log that tests share: did the apiserver deny it anything?"""

from __future__ import annotations

import re

# A denial, as kopf and the kubernetes client log it: the apiserver's reason "Forbidden" / message
# "... is forbidden: User ... cannot ...", kopf's "Not enough (RBAC) permissions to ..." warnings, or an
# HTTP 403 printed as a status code. The bare digits "403" are not searched for: they turn up in
# timestamps (",403"), resourceVersions and uids, which once made the RBAC test fail on a run with no
# denial at all.
FORBIDDEN_RESPONSE = re.compile(
    r"forbidden|not enough (rbac )?permissions|['\"]code['\"]:\s*403\b|\(403\)|\bstatus[= ]403\b",
    re.IGNORECASE,
)


def denials(log: str) -> list[str]:
    """The log lines that record a denied API request (empty when the operator was never refused)."""
    return [line for line in log.splitlines() if FORBIDDEN_RESPONSE.search(line)]
