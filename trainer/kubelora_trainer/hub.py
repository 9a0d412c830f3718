"""Decide at once whether a hub model id can be loaded, and say why not in one line.

Why a probe before transformers: given an id that is neither a local path nor reachable on a hub,
transformers retries its downloads for about a minute and then raises a multi-line OSError that
the CLI cannot tell from a crash (exit 1, retried by the operator). One metadata request with a
short timeout answers the same question in well under a second, and huggingface_hub's typed errors
(repository not found, gated, revision not found, refused token) map to specific lines. When the
hub is switched off (HF_HUB_OFFLINE=1) or unreachable, the local hub cache is the only source: a
cached model loads from it without touching the network, an uncached one is bad input.
"""

from __future__ import annotations

import logging

log = logging.getLogger("kubelora")

#: Seconds allowed per phase (connect, read) of the one metadata request.
PROBE_TIMEOUT_S = 5.0


class HubError(ValueError):
    """A hub model id that cannot be loaded, described in one line (the caller re-raises it as ModelError)."""


def _is_transport_error(err: BaseException) -> bool:
    """No answer from the hub at all: DNS, refused or reset connection, timeout (requests, httpx or httpx2)."""
    if isinstance(err, OSError | TimeoutError):
        return True
    return any(c.__name__ == "TransportError" and c.__module__.startswith("httpx") for c in type(err).__mro__)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_cached(repo_id: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)


def hub_answer_error(err: BaseException, repo_id: str, revision: str | None, endpoint: str) -> HubError | None:
    """The one line for the hub's refusal (gated, not found, no such revision, token refused); None for any
    other error (a server error, no answer). Shared by the load probe and the fetch pod (hub_fetch.py)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return HubError(
            f"model {repo_id} is gated on the hub: accept its terms at {endpoint}/{repo_id} and set HF_TOKEN to a "
            "token of an account with access"
        )
    if isinstance(err, RepositoryNotFoundError):
        return HubError(
            f"model {repo_id}: not a local directory and not found on the hub ({endpoint}); check the name, or for "
            "a private repo set HF_TOKEN to a token with access"
        )
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"model {repo_id}: the hub has no revision {revision!r} of it (model.revision)")
    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    if status in (401, 403):
        return HubError(f"the hub ({endpoint}) refused the token for model {repo_id} (HTTP {status}): check HF_TOKEN")
    return None


def check_hub_model(repo_id: str, filename: str, revision: str | None) -> bool:
    """Raise :class:`HubError` unless ``repo_id`` (holding ``filename``) can be loaded.

    Returns True when the model must come from the local hub cache only (the hub is switched off or
    unreachable, but ``filename`` is cached), so the caller passes ``local_files_only`` and
    transformers does not spend a minute retrying the network. A hub that answers with a server
    error (5xx, 429) is not the user's fault: that is logged and left to transformers (exit 1,
    retried).
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = constants.ENDPOINT
    cached = _is_cached(repo_id, filename, revision)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise HubError(
            f"model {repo_id}: not a local directory, not in the hub cache ({constants.HF_HUB_CACHE}), and the "
            "hub is switched off (HF_HUB_OFFLINE=1): give a local model directory or pre-fill the cache"
        )
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except HfHubHTTPError as err:
        refused = hub_answer_error(err, repo_id, revision, endpoint)
        if refused is not None:
            raise refused from None
        status = err.response.status_code if err.response is not None else None
        log.warning("hub answered %s for model %s; trying to load it anyway", status, repo_id)
        return False
    except Exception as err:
        if not _is_transport_error(err):
            raise
        if cached:
            log.warning("hub %s unreachable (%s): loading model %s from the hub cache", endpoint, _first_line(err),
                        repo_id)
            return True
        raise HubError(
            f"model {repo_id}: not a local directory and the hub ({endpoint}) is unreachable ({_first_line(err)}): "
            "give a local model directory, or pre-fill the hub cache and set HF_HUB_OFFLINE=1"
        ) from None
    files = {s.rfilename for s in (info.siblings or [])}
    if files and filename not in files:
        hint = "; set model.ggufFile to one of its .gguf files" if any(f.endswith(".gguf") for f in files) else ""
        raise HubError(f"model {repo_id}: the hub repo has no {filename}{hint}")
    return False
