"""The registry of published dictionaries and downloads from the Hugging Face Hub.

The registry (``configs/registry.yaml``, installed as package data ``srp_jax.configs``) lists
the 17 published dictionaries, laid out on the Hub as ``<model>/<op>/checkpoint.pt``. The repo
id defaults to ``matteohe/sparse-readout-prism`` (the model card's); the reference's manifest
names ``hematteo/sparse-readout-prism``. Choose with ``repo_id=`` or ``$SRP_JAX_HUB_REPO``.

Downloads go through ``huggingface_hub.hf_hub_download`` and its cache. Without network (or
with ``HF_HUB_OFFLINE=1``) a cached file is used; when there is none, the :class:`HubError`
says which file to download and where to put it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.resources
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError, DependencyError, HubError

DEFAULT_REPO_ID = "matteohe/sparse-readout-prism"
ALTERNATE_REPO_ID = "hematteo/sparse-readout-prism"
REPO_ENV = "SRP_JAX_HUB_REPO"
REGISTRY_RESOURCE = "registry.yaml"

# Published (Hub / registry) metric names -> the metric names evaluate_model writes.
METRIC_ALIASES = {
    "rowEV": "row_centered_ev",
    "top1": "val_top1_match",
    "KL": "val_logit_kl_bits_mean",
}
DISPLAY_NAMES = {"row_centered_ev": "rowEV", "val_top1_match": "top-1", "val_logit_kl_bits_mean": "KL"}


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """One published dictionary. ``path`` = ``<slug>/<operating_point>``; ``hub_file`` is the
    file inside the Hub repo; ``metrics`` as published (keys rowEV, top1, KL, dead, rare)."""

    path: str
    model: str
    hf_id: str
    slug: str
    operating_point: str
    hub_file: str
    architecture: str
    d_model: int
    d_features: int
    k: int
    width: int
    vocab: int | None
    softcap: float | None
    recipe: str
    size: str
    metrics: Mapping[str, float]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["metrics"] = dict(self.metrics)
        out["notes"] = list(self.notes)
        return out


def canonical_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics with published aliases (``rowEV``, ``top1``, ``KL``) renamed to the
    ``evaluate_model`` names; when both spellings are present the evaluate_model one wins."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        name = METRIC_ALIASES.get(key, key)
        if name in out and key in METRIC_ALIASES:
            continue
        out[name] = value
    return out


def metric(metrics: Mapping[str, Any] | None, name: str, default: Any = None) -> Any:
    """One metric under either spelling: ``metric(m, "rowEV") == metric(m, "row_centered_ev")``."""
    canon = canonical_metrics(metrics)
    return canon.get(METRIC_ALIASES.get(name, name), default)


@functools.lru_cache(maxsize=1)
def _registry_document() -> dict[str, Any]:
    import yaml

    try:
        text = importlib.resources.files("srp_jax.configs").joinpath(REGISTRY_RESOURCE).read_text("utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise HubError(f"the dictionary registry (srp_jax.configs/{REGISTRY_RESOURCE}) is not installed: {exc}") from None
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("dictionaries"), list):
        raise HubError(f"srp_jax.configs/{REGISTRY_RESOURCE}: malformed registry (no 'dictionaries' list)")
    return doc


def published_ranges() -> dict[str, tuple[float, float]]:
    """(min, max) of each headline metric (``rowEV``, ``top1``, ``KL``) over the registry."""
    out: dict[str, tuple[float, float]] = {}
    for name in ("rowEV", "top1", "KL"):
        values = [float(v) for v in (metric(e.metrics, name) for e in registry()) if isinstance(v, (int, float))]
        if values:
            out[name] = (min(values), max(values))
    return out


def registry() -> tuple[RegistryEntry, ...]:
    """Every published dictionary, in registry order."""
    fields = {f.name for f in dataclasses.fields(RegistryEntry)}
    entries = []
    for item in _registry_document()["dictionaries"]:
        kwargs = {k: v for k, v in item.items() if k in fields}
        kwargs["metrics"] = dict(kwargs.get("metrics") or {})
        kwargs["notes"] = tuple(kwargs.get("notes") or ())
        entries.append(RegistryEntry(**kwargs))
    return tuple(entries)


def _normalize_spec(spec: str) -> str:
    text = os.fspath(spec).strip()
    if text.startswith("hub:"):
        text = text[len("hub:"):]
    text = text.strip("/")
    file_name = _registry_document().get("file_name", "checkpoint.pt")
    if text.endswith("/" + file_name):
        text = text[: -len(file_name) - 1]
    return text.lower()


def find_entry(spec: str) -> RegistryEntry:
    """The registry entry for ``"<model>/<op>"`` (also accepts a ``hub:`` prefix and a
    trailing ``/checkpoint.pt``); an unknown spec is a HubError listing close matches."""
    if not isinstance(spec, (str, os.PathLike)):
        raise HubError(f"a Hub dictionary is named '<model>/<op>', got {type(spec).__name__}")
    wanted = _normalize_spec(spec)
    entries = registry()
    for entry in entries:
        if entry.path.lower() == wanted:
            return entry
    paths = [e.path for e in entries]
    close = difflib.get_close_matches(wanted, paths, n=4, cutoff=0.5)
    if not close and "/" not in wanted:
        close = [p for p in paths if p.startswith(wanted)][:4]
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise HubError(f"unknown Hub dictionary {spec!r}{hint} (srp-jax hub list shows all {len(paths)})")


def verify_entry(dictionary: Any, entry: RegistryEntry, *, source: str | os.PathLike = "") -> None:
    """Check a fetched dictionary against its registry entry (architecture, d_model,
    d_features, k): a file that disagrees is another dictionary (a wrong repo, revision or
    cache file), reported as a CheckpointError naming every mismatch."""
    got = {
        "architecture": dictionary.architecture,
        "d_model": int(dictionary.d_model),
        "d_features": int(dictionary.d_features),
        "k": int(dictionary.k),
    }
    wanted = {"architecture": entry.architecture, "d_model": entry.d_model, "d_features": entry.d_features, "k": entry.k}
    wrong = [f"{key} {got[key]} (registry: {wanted[key]})" for key in wanted if got[key] != wanted[key]]
    if wrong:
        where = os.fspath(source) or entry.hub_file
        raise CheckpointError(
            f"{where}: not the published {entry.path}: {', '.join(wrong)}; check the repo id / revision "
            "(for a repo with other dictionaries at these paths: --no-verify, or load the fetched file by path)"
        )


def resolve_repo_id(repo_id: str | None = None) -> str:
    """``repo_id``, else ``$SRP_JAX_HUB_REPO``, else the default (the model card's id)."""
    return repo_id or os.environ.get(REPO_ENV) or DEFAULT_REPO_ID


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def endpoint_unreachable() -> str | None:
    """A reason when the Hub endpoint's host name does not even resolve (and no proxy is
    set, which would resolve it for us): then downloads cannot work, and trying would only
    spend huggingface_hub's retry back-off (about 25 s) before failing. None otherwise."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    parsed = urlparse(constants.ENDPOINT)
    host = parsed.hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except OSError as exc:
        return f"{host} does not resolve ({exc.strerror or exc})"
    return None


@contextlib.contextmanager
def _quiet_hub_logs():
    """huggingface_hub logs each retry as a warning; our error message says what matters."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def cached_file_location(entry: RegistryEntry, repo_id: str, cache_dir: Path, revision: str | None) -> str:
    """Where the Hub cache expects the file (for error messages)."""
    folder = cache_dir / f"models--{repo_id.replace('/', '--')}"
    ref = revision or "main"
    return f"{folder}/snapshots/<commit>/{entry.hub_file} (with {folder}/refs/{ref} holding <commit>)"


def fetch_checkpoint(
    spec: str,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Download (or find in the Hub cache) the ``checkpoint.pt`` of a published dictionary.

    ``spec`` is ``"<model>/<op>"`` (e.g. ``"qwen3.5-2b/k256_32x"``), checked against the
    registry. ``local_files_only`` defaults to ``$HF_HUB_OFFLINE``; when a download fails for
    lack of network the cache is tried before giving up. Returns the local file path.
    """
    entry = find_entry(spec)
    repo = resolve_repo_id(repo_id)
    cache = _cache_dir(cache_dir)
    offline = _env_flag("HF_HUB_OFFLINE") if local_files_only is None else bool(local_files_only)
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise DependencyError(f"Hub downloads need huggingface_hub: pip install huggingface_hub ({exc})") from None

    def _download(local_only: bool) -> Path:
        with _quiet_hub_logs():
            return Path(
                hf_hub_download(
                    repo_id=repo,
                    filename=entry.hub_file,
                    revision=revision,
                    cache_dir=str(cache),
                    local_files_only=local_only,
                )
            )

    url = f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{entry.hub_file}"
    # two short lines: what failed, then the easy way out first (the cache layout last)
    manual = (
        f"\n  download {url} and run: srp-jax convert checkpoint.pt --out DIR"
        f" (or put it in the Hub cache: {cached_file_location(entry, repo, cache, revision)})"
    )
    unreachable = None if offline else endpoint_unreachable()
    if unreachable:
        try:
            return _download(True)
        except Exception:  # noqa: BLE001 - no cached copy: say so at once
            raise HubError(f"{entry.path}: not in the Hub cache and no network ({unreachable}){manual}") from None
    try:
        return _download(offline)
    except (hf_errors.GatedRepoError, hf_errors.RepositoryNotFoundError) as exc:
        other = ALTERNATE_REPO_ID if repo != ALTERNATE_REPO_ID else DEFAULT_REPO_ID
        raise HubError(
            f"Hub repo {repo!r} not found or not accessible ({type(exc).__name__}); try --repo-id {other} "
            f"or set ${REPO_ENV}"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in Hub repo {repo!r}") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise HubError(f"{entry.hub_file} is not in Hub repo {repo!r} (revision {revision or 'main'})") from None
    except Exception as exc:  # noqa: BLE001 - no network, offline mode, cache miss, HTTP errors
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if not offline:
            try:
                return _download(True)
            except Exception:  # noqa: BLE001 - fall through to the instructions below
                pass
        why = "offline mode (HF_HUB_OFFLINE)" if offline else f"download failed: {type(exc).__name__}: {first}"
        raise HubError(f"{entry.path}: not in the Hub cache ({repo}) and {why}{manual}") from None


__all__ = [
    "DEFAULT_REPO_ID",
    "ALTERNATE_REPO_ID",
    "REPO_ENV",
    "METRIC_ALIASES",
    "RegistryEntry",
    "registry",
    "find_entry",
    "resolve_repo_id",
    "fetch_checkpoint",
    "verify_entry",
    "canonical_metrics",
    "metric",
    "published_ranges",
]
