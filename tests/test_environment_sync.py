"""pyproject.toml and environment.yml declare the same packages with the same versions.

Learners install with pip (``make``) or conda (Binder, ``environment.yml``); both must get
the same dependencies. Names are compared normalised (PEP 503: case, ``-``/``_``/``.``);
``python`` and ``pip`` themselves, and pip options such as ``-e .``, are not
packages to compare.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
# Programs conda installs that are not Python packages (pip has no equivalent):
IGNORED = {"python", "pip", "redis-server", "nginx"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_spec(spec: str) -> tuple[str, SpecifierSet]:
    """``name`` and its version specifiers, from a pip or a (pip-like) conda spec."""
    spec = spec.split("#", 1)[0].strip()
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:=(?![=<>!])\s*(\S+)|(.*))", spec)
    if match and match.group(2):  # conda's "name=1.2" means "1.2.*"
        return normalise(match.group(1)), SpecifierSet(f"=={match.group(2).rstrip('.*')}.*")
    requirement = Requirement(spec.replace(" ", ""))
    assert not requirement.marker and not requirement.url, spec
    return normalise(requirement.name), requirement.specifier


def as_mapping(specs: list[str], where: str) -> dict[str, SpecifierSet]:
    mapping: dict[str, SpecifierSet] = {}
    for spec in specs:
        name, specifier = parse_spec(spec)
        assert name not in mapping, f"{name} is listed twice in {where}"
        mapping[name] = specifier
    return mapping


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pyproject_requirements() -> dict[str, SpecifierSet]:
    project = pyproject()["project"]
    specs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    return as_mapping(specs, "pyproject.toml")


def parse_environment_by_hand(text: str) -> dict:
    """The subset of YAML that environment.yml uses: keys, lists, one nested pip list."""
    data: dict = {}
    key = None
    pip_list: list[str] | None = None
    pip_indent = 0
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        item = line.strip()
        if indent == 0:
            key, _, value = item.partition(":")
            data[key] = value.strip() or []
            pip_list = None
        elif item.startswith("- ") and pip_list is not None and indent > pip_indent:
            pip_list.append(item[2:].strip())
        elif item.startswith("- "):
            value = item[2:].strip()
            if value.endswith(":"):  # "- pip:" opens a nested list
                pip_list, pip_indent = [], indent
                data[key].append({value[:-1]: pip_list})
            else:
                pip_list = None
                data[key].append(value)
    return data


def load_environment() -> dict:
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:  # the hand parser covers what environment.yml uses
        return parse_environment_by_hand(text)
    return yaml.safe_load(text)


def environment_specs() -> tuple[list[str], list[str]]:
    """(conda specs, pip specs) from environment.yml."""
    conda, pip = [], []
    for entry in load_environment()["dependencies"]:
        if isinstance(entry, dict):
            assert set(entry) == {"pip"}, entry
            pip += [str(s) for s in entry["pip"]]
        else:
            conda.append(str(entry))
    return conda, pip


def environment_requirements() -> dict[str, SpecifierSet]:
    conda, pip = environment_specs()
    specs = [s for s in conda if parse_spec(s)[0] not in IGNORED]
    specs += [s for s in pip if not s.startswith("-")]  # pip options, e.g. "-e ."
    return as_mapping(specs, "environment.yml")


def test_same_package_names():
    in_pyproject = set(pyproject_requirements())
    in_environment = set(environment_requirements())
    assert in_pyproject - in_environment == set(), "missing from environment.yml"
    assert in_environment - in_pyproject == set(), "missing from pyproject.toml"


def test_same_version_specifiers():
    in_pyproject = pyproject_requirements()
    in_environment = environment_requirements()
    different = {
        name: (str(in_pyproject[name]), str(in_environment[name]))
        for name in in_pyproject.keys() & in_environment.keys()
        if in_pyproject[name] != in_environment[name]
    }
    assert different == {}, "pyproject.toml vs environment.yml"


def test_every_dependency_is_pinned_to_a_range():
    for name, specifier in pyproject_requirements().items():
        assert any(s.operator in (">=", "==", "~=") for s in specifier), name
        assert any(s.operator in ("<", "==", "~=") for s in specifier), name


def test_python_versions_agree():
    conda, _ = environment_specs()
    pythons = [parse_spec(s)[1] for s in conda if parse_spec(s)[0] == "python"]
    assert pythons == [SpecifierSet(pyproject()["project"]["requires-python"])]


def test_environment_installs_the_project_itself():
    _, pip = environment_specs()
    assert any(re.search(r"(^|\s)-e\s+\.$", s) for s in pip), pip


@pytest.mark.parametrize("spec, expected", [
    ("Nest_Asyncio>=1.6,<2", ("nest-asyncio", SpecifierSet("<2,>=1.6"))),
    ("jupyter.server-proxy >=4.6, <5", ("jupyter-server-proxy", SpecifierSet(">=4.6,<5"))),
    ("numpy=1.26", ("numpy", SpecifierSet("==1.26.*"))),
    ("pip", ("pip", SpecifierSet())),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_hand_parser_agrees_with_yaml():
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    assert parse_environment_by_hand(text) == yaml.safe_load(text)
