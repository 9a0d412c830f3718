"""Exclusive run directories: at most one LoRAFineTune per run directory of a claim in a namespace.

Why: two resources with the same `output.pvc` (or `output.s3.workdirPvc`) claim and subPath would
share checkpoints and config.yaml: the second resumes from the first's checkpoint and both report one
adapter. A run directory belongs to one resource for as long as that resource exists (finished ones
too: the directory holds the adapter their status points at). Directories that nest (`runs` and
`runs/a`) count as shared: an overwrite of the outer one would delete the inner one.

Who keeps it, deterministically (every reconcile of either resource reaches the same answer): a
started resource over one that has not started, then the older creationTimestamp, then the name. A
resource refused for another reason before it started (Validated=False: a missing Secret) keeps
nothing, so it never blocks a valid one. The loser is not started; the resync timer re-validates it,
so it starts by itself once the holder is deleted. The trainer's own claim on the directory (an
owner file with the run's uid) remains the last line of defence against a race between two
reconciles that see each other's resource a moment late.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .api import LoRAFineTuneResource, SpecError, parse_spec
from .plan import run_sub_path


@dataclass(frozen=True)
class RunDir:
    """A directory inside a claim (subPath without leading/trailing slashes)."""

    claim: str
    sub_path: str

    def overlaps(self, other: RunDir) -> bool:
        """Same claim and the same directory, or one inside the other."""
        if self.claim != other.claim:
            return False
        a, b = self.sub_path + "/", other.sub_path + "/"
        return a.startswith(b) or b.startswith(a)

    def __str__(self) -> str:
        return f"pvc://{self.claim}/{self.sub_path}"


def run_dir_of(resource: LoRAFineTuneResource) -> RunDir | None:
    """The resource's run directory on a claim, or None (an emptyDir: private to its pods)."""
    out = resource.spec.output
    claim = out.pvc if out.pvc is not None else (out.s3.workdir_pvc if out.s3 is not None else None)
    if claim is None:
        return None
    return RunDir(claim.claim_name, run_sub_path(resource, claim).strip("/"))


@dataclass(frozen=True)
class Claimant:
    """A resource as far as run-directory ownership goes."""

    name: str
    created: str
    """creationTimestamp (RFC 3339 in UTC, so it sorts as text)."""
    started: bool
    run_dir: RunDir

    @property
    def rank(self) -> tuple[bool, str, str]:
        """Lower keeps the directory: started first, then older, then by name."""
        return (not self.started, self.created, self.name)


def claimant(
    name: str, namespace: str, created: str, raw_spec: Mapping[str, Any], *, started: bool, refused: bool
) -> Claimant | None:
    """A resource of the namespace as a claimant, or None when it holds no directory: no claim, a spec
    that does not parse, or `refused` (not started and Validated=False for another reason)."""
    if refused and not started:
        return None
    run_dir = run_dir_of_spec(name, namespace, raw_spec)
    return None if run_dir is None else Claimant(name, created, started, run_dir)


def run_dir_of_spec(name: str, namespace: str, raw_spec: Mapping[str, Any]) -> RunDir | None:
    """The run directory of a stored spec, or None: no claim, or a spec that does not parse.

    A stored spec naming no claim (`output.pvc`, `output.s3.workdirPvc`) is answered without parsing
    it: the claim index (controller/claims.py) asks for every resource, and most deliver to S3."""
    output = raw_spec.get("output")
    if isinstance(output, Mapping) and not output.get("pvc"):
        s3 = output.get("s3")
        if not (isinstance(s3, Mapping) and s3.get("workdirPvc")):
            return None
    try:
        spec = parse_spec(raw_spec)
    except SpecError:
        return None
    return run_dir_of(LoRAFineTuneResource(name, namespace, "", 1, spec))


def holder(me: Claimant, others: Iterable[Claimant]) -> Claimant | None:
    """The resource that keeps `me` out of its run directory, or None when `me` may use it."""
    rivals = sorted(
        (o for o in others if o.name != me.name and o.run_dir.overlaps(me.run_dir) and o.rank < me.rank),
        key=lambda o: o.rank,
    )
    return rivals[0] if rivals else None


def in_use_message(me: Claimant, other: Claimant) -> str:
    """The Validated=False message: which directory, who has it, what to do."""
    where = str(me.run_dir) if me.run_dir == other.run_dir else f"{me.run_dir} (overlaps {other.run_dir})"
    why = "started first" if other.started else "created earlier"
    return (
        f"run directory {where} is in use by LoRAFineTune {other.name} ({why}); nothing is created until "
        f"{other.name} is deleted (this one then starts by itself), or set another output subPath"
    )
