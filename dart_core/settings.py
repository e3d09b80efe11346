"""Every environment variable dart-annotate reads, with its default, type and parsing: one place.

    from dart_core.settings import settings
    settings().s3_max_attempts

`settings()` reads the environment each time it is called; nothing is cached at import. A variable
set by a test (monkeypatch), inherited by a subprocess or set by torchrun for a rank counts from the
next call, and each caller still reads at the moment it always did (the S3 client when it is
created, the lease TTL when a lease starts, ...). The whole set, who reads each variable and the
variables read by others (Prefect's PREFECT_*, boto3's credentials, the openai client's own
lookups) are in docs/design.md, "Settings".

Parsing: a text variable set to the empty string counts as unset (the code always read them with
`or`). A number must parse: `DART_S3_MAX_ATTEMPTS=abc` raises `SettingsError` (a ValueError, so
`dart` ends with one `error:` line naming the variable and exit code 2), also when empty.

Secrets: `openai_api_key` is left out of the repr (and so of any log line or message that formats
a `Settings`), and no error message here quotes it: only the numbers can fail to parse.
Not read here: the rank launcher's private parent-to-child variables (flows/ranks.py,
DART_RANK_ERRORS / DART_LAUNCH_REPORT / DART_LAUNCH_PARENT), which are a protocol between two of its
own processes, not settings.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value that does not parse; the message names it."""


def _home() -> Path:
    # os.path.expanduser never raises (Path.home() does where no home is known)
    return Path(os.path.expanduser("~"))


def _var(*names: str, parse: Callable[[str], object] | None = None, default: object = None,
         kind: str = "text", secret: bool = False):
    """A field read from the first of `names` that is set. Text (`parse` None): the empty string
    counts as unset. A number (`parse` int / float): must parse, also when set but empty.
    `default` is a value or a zero-argument callable (evaluated at read time: HOME may change)."""
    return field(repr=not secret, metadata={"names": names, "parse": parse, "default": default, "kind": kind})


@dataclass(frozen=True)
class Settings:
    # ---- S3 (dart_core.storage and the prediction folder on s3://)
    s3_endpoint_url: str | None = _var("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    s3_max_attempts: int = _var("DART_S3_MAX_ATTEMPTS", parse=int, default=8, kind="integer")
    s3_lock_ttl: float = _var("DART_S3_LOCK_TTL", parse=float, default=120.0, kind="number")
    s3_read_threads: int = _var("DART_S3_READ_THREADS", parse=int, default=16, kind="integer")
    cache_dir: Path = _var("DART_CACHE_DIR", parse=Path, default=lambda: _home() / ".cache" / "dart")
    # ---- LLM (CRG mining, flows/crg.py); the openai client also reads both itself
    openai_api_key: str | None = _var("OPENAI_API_KEY", secret=True)
    openai_base_url: str | None = _var("OPENAI_BASE_URL")
    # ---- caches
    tiktoken_cache_dir: Path = _var("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", parse=Path,
                                    default=lambda: Path(tempfile.gettempdir()) / "data-gym-cache")
    xdg_cache_home: Path = _var("XDG_CACHE_HOME", parse=Path, default=lambda: _home() / ".cache")
    # ---- distributed training (set by torchrun for each rank)
    world_size: int = _var("WORLD_SIZE", parse=int, default=1, kind="integer")
    rank: int = _var("RANK", parse=int, default=0, kind="integer")
    local_rank: int | None = _var("LOCAL_RANK", parse=int, default=None, kind="integer")  # None: not set
    dist_backend: str | None = _var("DART_DIST_BACKEND")


def _read(f, env: Mapping[str, str]):
    names, parse, default, kind = (f.metadata[k] for k in ("names", "parse", "default", "kind"))
    for name in names:
        raw = env.get(name)
        if raw is None:
            continue
        if kind == "text":
            if raw == "":
                continue  # empty text = unset (the next name, or the default)
            return parse(raw) if parse else raw
        try:
            return parse(raw)
        except ValueError:
            article = "an" if kind == "integer" else "a"
            hint = "" if default is None else f" (default when unset: {default})"
            raise SettingsError(f"environment variable {name}={raw!r} is not {article} {kind}{hint}") from None
    return default() if callable(default) else default


def settings(env: Mapping[str, str] | None = None) -> Settings:
    """The settings from `env` (default: os.environ, read now). Raises SettingsError naming the
    variable when a number does not parse."""
    env = os.environ if env is None else env
    return Settings(**{f.name: _read(f, env) for f in fields(Settings)})


def variables() -> list[str]:
    """Every environment variable `Settings` reads, in field order (docs/design.md lists the same)."""
    return [name for f in fields(Settings) for name in f.metadata["names"]]
