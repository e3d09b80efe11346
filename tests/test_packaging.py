"""The install files name only what any machine can fetch: no `file:` URL, no absolute or home
path (a `pip freeze` of an editable or locally built package writes them, and the lock then
installs nowhere else)."""
import re
import tomllib

from tests.conftest import REPO

# a path token: at the start, or after a space, `=`, `@`, a comma, a quote or a bracket
_ABSOLUTE = re.compile(r"(?:^|[\s=@,'\"(\[])(?:/|~[/\\]|[A-Za-z]:[\\/])")
_FILE_URL = re.compile(r"\bfile:", re.IGNORECASE)


def local_reference(text: str) -> str | None:
    """What makes `text` (a requirement line or a TOML string) machine-local, or None."""
    if _FILE_URL.search(text):
        return "a file: URL"
    if _ABSOLUTE.search(text):
        return "an absolute or home path"
    return None


def lock_problems(text: str, where: str) -> list[str]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*", "", line).strip()  # comments, whole-line or trailing
        why = local_reference(line) if line else None
        if why:
            out.append(f"{where}:{lineno}: {why}: {line}")
    return out


def toml_problems(doc, where: str, key: str = "") -> list[str]:
    """Every string of the TOML document, wherever it sits (dependencies, build requirements,
    tool tables such as [tool.uv.sources])."""
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in toml_problems(v, where, f"{key}.{k}" if key else k)]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in toml_problems(v, where, f"{key}[{i}]")]
    why = local_reference(doc) if isinstance(doc, str) else None
    return [f"{where}: {key}: {why}: {doc}"] if why else []


def test_lock_and_pyproject_name_no_machine_local_path():
    lock = REPO / "requirements.lock"
    pyproject = REPO / "pyproject.toml"
    assert lock_problems(lock.read_text(), "requirements.lock") == []
    assert toml_problems(tomllib.loads(pyproject.read_text()), "pyproject.toml") == []


def test_the_check_finds_each_kind_of_local_reference():
    lock = "\n".join([
        "torch==2.14.1",
        "mypkg @ file:///home/me/mypkg",
        "other @ /home/me/other-1.0-py3-none-any.whl",
        "/tmp/wheels/x-1.0-py3-none-any.whl",
        "-e /home/me/checkout",
        "--find-links=/opt/wheels",
        "winpkg @ C:\\wheels\\winpkg-1.0.whl",
        "homepkg @ ~/wheels/homepkg-1.0.whl",
        "remote @ https://example.com/remote-1.0.tar.gz",
        "numpy==2.4.6  # via /home/me/notes (a comment is not installed)",
        "tool==1.0 ; sys_platform == 'linux'",
    ])
    assert lock_problems(lock, "lock") == [
        "lock:2: a file: URL: mypkg @ file:///home/me/mypkg",
        "lock:3: an absolute or home path: other @ /home/me/other-1.0-py3-none-any.whl",
        "lock:4: an absolute or home path: /tmp/wheels/x-1.0-py3-none-any.whl",
        "lock:5: an absolute or home path: -e /home/me/checkout",
        "lock:6: an absolute or home path: --find-links=/opt/wheels",
        "lock:7: an absolute or home path: winpkg @ C:\\wheels\\winpkg-1.0.whl",
        "lock:8: an absolute or home path: homepkg @ ~/wheels/homepkg-1.0.whl",
    ]
    doc = tomllib.loads('[project]\ndependencies = ["torch==2.14.1", "mine @ file:///src/mine"]\n'
                        '[tool.uv.sources]\nmine = { path = "/home/me/mine" }\n'
                        '[tool.pytest.ini_options]\naddopts = "-ra -m \'not slow\'"\n')
    assert toml_problems(doc, "pyproject.toml") == [
        "pyproject.toml: project.dependencies[1]: a file: URL: mine @ file:///src/mine",
        "pyproject.toml: tool.uv.sources.mine.path: an absolute or home path: /home/me/mine",
    ]
