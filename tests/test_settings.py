"""dart_core.settings: every environment variable the project reads, parsed in one place, read at
call time; the API key never shows; docs/design.md's "Settings" table lists the same set; no module
reads a setting from os.environ on its own."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dart_core.settings import Settings, SettingsError, settings, variables
from flows.cli import app  # imported before a test moves HOME (Prefect sets up its home at import)
from tests.conftest import REPO

KEY = "sk-test-SETTINGS-never-shown-0123456789"
NUMBERS = {"DART_S3_MAX_ATTEMPTS": "integer", "DART_S3_LOCK_TTL": "number", "DART_S3_READ_THREADS": "integer",
           "WORLD_SIZE": "integer", "RANK": "integer", "LOCAL_RANK": "integer"}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No setting in the environment, HOME and the temp dir under tmp_path."""
    for name in variables():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() re-reads TMPDIR
    (tmp_path / "tmp").mkdir()
    (tmp_path / "home").mkdir()
    return monkeypatch


def test_defaults(clean_env, tmp_path):
    s = settings()
    home = tmp_path / "home"
    assert s == Settings(s3_endpoint_url=None, s3_max_attempts=8, s3_lock_ttl=120.0, s3_read_threads=16,
                         cache_dir=home / ".cache" / "dart", openai_api_key=None, openai_base_url=None,
                         tiktoken_cache_dir=tmp_path / "tmp" / "data-gym-cache", xdg_cache_home=home / ".cache",
                         world_size=1, rank=0, local_rank=None, dist_backend=None)
    assert isinstance(s.s3_max_attempts, int) and isinstance(s.s3_lock_ttl, float)


def test_read_at_call_time_not_at_import(clean_env):
    assert settings().world_size == 1
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("DART_CACHE_DIR", "/x/cache")
    assert settings().world_size == 4 and settings().cache_dir == Path("/x/cache")
    clean_env.delenv("WORLD_SIZE")
    assert settings().world_size == 1


def test_parsing(clean_env):
    for name, value in {"DART_S3_MAX_ATTEMPTS": "3", "DART_S3_LOCK_TTL": "2.5", "DART_S3_READ_THREADS": " 4 ",
                        "WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "0", "DART_DIST_BACKEND": "gloo",
                        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "XDG_CACHE_HOME": "/xdg",
                        "TIKTOKEN_CACHE_DIR": "/tk", "DATA_GYM_CACHE_DIR": "/dg"}.items():
        clean_env.setenv(name, value)
    s = settings()
    assert (s.s3_max_attempts, s.s3_lock_ttl, s.s3_read_threads) == (3, 2.5, 4)
    assert (s.world_size, s.rank, s.local_rank, s.dist_backend) == (8, 5, 0, "gloo")  # LOCAL_RANK=0 is set
    assert s.openai_base_url == "http://127.0.0.1:9/v1"
    assert (s.xdg_cache_home, s.tiktoken_cache_dir) == (Path("/xdg"), Path("/tk"))  # TIKTOKEN_ before DATA_GYM_


def test_first_of_two_names_and_empty_text_is_unset(clean_env, tmp_path):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert settings().s3_endpoint_url == "http://127.0.0.1:9000"
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")
    assert settings().s3_endpoint_url == "http://127.0.0.1:9001"
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "")  # empty: the next name
    assert settings().s3_endpoint_url == "http://127.0.0.1:9000"
    clean_env.setenv("AWS_ENDPOINT_URL", "")
    assert settings().s3_endpoint_url is None
    clean_env.setenv("TIKTOKEN_CACHE_DIR", "")
    clean_env.setenv("DATA_GYM_CACHE_DIR", "/dg")
    assert settings().tiktoken_cache_dir == Path("/dg")
    for name in ("DART_CACHE_DIR", "XDG_CACHE_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL", "DART_DIST_BACKEND"):
        clean_env.setenv(name, "")
    s = settings()
    assert s.cache_dir == tmp_path / "home" / ".cache" / "dart" and s.xdg_cache_home == tmp_path / "home" / ".cache"
    assert s.openai_api_key is None and s.openai_base_url is None and s.dist_backend is None


@pytest.mark.parametrize("name, kind", sorted(NUMBERS.items()))
@pytest.mark.parametrize("value", ["abc", "", "1.5x"])
def test_a_bad_number_is_one_line_naming_the_variable(clean_env, name, kind, value):
    clean_env.setenv("OPENAI_API_KEY", KEY)
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        settings()
    msg = str(e.value)
    assert isinstance(e.value, ValueError)  # flows/cli/_guard: one `error:` line, exit 2
    assert msg.startswith(f"environment variable {name}={value!r} is not a") and kind in msg
    assert "\n" not in msg and KEY not in msg


def test_a_bad_number_through_the_cli(clean_env, tmp_path):
    """`dart crg mine` with a malformed DART_S3_MAX_ATTEMPTS: one error line naming it, exit 2, no key."""
    from dart_core.vocab import Vocabulary

    clean_env.setenv("OPENAI_API_KEY", KEY)
    clean_env.setenv("DART_S3_MAX_ATTEMPTS", "eight")
    classes = tmp_path / "classes.csv"
    Vocabulary.from_names(["dog", "cat"], unseen={"cat"}).write_csv(classes)
    r = CliRunner().invoke(app, ["crg", "mine", "--classes", str(classes), "--out", str(tmp_path / "crg.json"),
                                 "--source", "llm", "--base-url", "http://127.0.0.1:9/v1"])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == "error: environment variable DART_S3_MAX_ATTEMPTS='eight' is not an integer " \
                               "(default when unset: 8)"
    assert KEY not in r.output


def test_the_api_key_never_shows(clean_env):
    clean_env.setenv("OPENAI_API_KEY", KEY)
    s = settings()
    assert s.openai_api_key == KEY
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % (s,)):
        assert KEY not in text and "openai_api_key" not in text
    assert [f.name for f in fields(Settings) if not f.repr] == ["openai_api_key"]


def test_design_doc_table_lists_every_variable():
    doc = (REPO / "docs" / "design.md").read_text()
    assert "\n## Settings\n" in doc
    section = doc.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {m for line in rows for m in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])}
    assert set(variables()) <= listed, set(variables()) - listed
    for prefect_own in ("PREFECT_API_URL", "PREFECT_HOME"):
        assert prefect_own in section


# Reads of os.environ that are no setting: the shard writer forwarding AWS_* / DART_* to its
# forkserver workers, flows/__init__ defaulting Prefect's telemetry off, and the rank launcher's
# private parent -> child variables (flows/ranks.py).
ALLOWED = {"dart_core/settings.py": None, "dart_core/data/_worker.py": None, "flows/__init__.py": None,
           "flows/ranks.py": re.compile(r"\b(ERRORS_ENV|REPORT_ENV|PARENT_ENV)\b|\{\*\*os\.environ")}
ENV_READ = re.compile(r"os\.environ|os\.getenv|environ\.get\(")


def test_no_module_reads_a_setting_on_its_own():
    offenders = []
    for py in sorted([*REPO.glob("dart_core/**/*.py"), *REPO.glob("flows/**/*.py")]):
        rel = py.relative_to(REPO).as_posix()
        if rel in ALLOWED and ALLOWED[rel] is None:
            continue
        for n, line in enumerate(py.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if ENV_READ.search(code) and not (rel in ALLOWED and ALLOWED[rel].search(code)):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "read these through dart_core.settings:\n" + "\n".join(offenders)
