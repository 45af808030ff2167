"""The set-up is consistent: environment.yml lists pyproject's packages; CI runs the README's commands."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}  # conda-forge name -> PyPI name
NOT_PACKAGES = {"python", "pip"}  # the interpreter and the installer, not dependencies


def _name(requirement: str) -> str:
    """'transformers>=5,<6' -> 'transformers' (PEP 503 normalized)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def pyproject_packages() -> set[str]:
    try:
        import tomllib
    except ImportError:  # python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))
    return {_name(r) for r in reqs}


def conda_packages() -> set[str]:
    """Names under `dependencies:` in environment.yml, without the nested `pip:` section."""
    names, in_deps = set(), False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if re.match(r"^\S", line):  # a top-level key
            in_deps = line.startswith("dependencies:")
            continue
        m = re.match(r"^  - ([^#\s][^#]*?)\s*(#.*)?$", line)  # exactly one level deep: conda packages
        if in_deps and m and not m.group(1).endswith(":"):
            name = _name(m.group(1))
            names.add(CONDA_TO_PIP.get(name, name))
    return names - NOT_PACKAGES


def readme_setup_commands() -> list[str]:
    """The command lines in the README's set-up section (its fenced bash blocks)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## [^\n]*[Ss]et-?up[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, "README.md has no '## ...Set-up...' section"
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", m.group(1), flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_environment_yml_lists_the_same_packages_as_pyproject():
    conda, pip = conda_packages(), pyproject_packages()
    assert conda == pip, f"only in environment.yml: {sorted(conda - pip)}; only in pyproject: {sorted(pip - conda)}"
    assert {"torch", "transformers", "pytest", "nbmake", "jupytext", "ruff"} <= pip


def test_environment_yml_installs_the_package_with_pip():
    text = (ROOT / "environment.yml").read_text()
    assert "conda-forge" in text
    assert re.search(r"^  - pip:\n\s+- -e \.", text, flags=re.M), "environment.yml must pip-install the package"


def test_transformers_is_pinned_to_major_5_in_both():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"transformers>=5,<6"', text)
    assert re.search(r"^  - transformers>=5,<6\s*$", (ROOT / "environment.yml").read_text(), flags=re.M)


def test_ci_runs_the_readme_setup_commands_verbatim():
    commands = readme_setup_commands()
    assert len(commands) >= 2, f"expected the two set-up commands in README.md, found {commands}"
    ci = (ROOT / ".ci" / "run").read_text()
    missing = [c for c in commands if c not in ci]
    assert not missing, f".ci/run does not run these README commands verbatim: {missing}"
    assert ci.index("pip install -q torch==2.13.0") < min(ci.index(c) for c in commands)  # CPU wheel first
