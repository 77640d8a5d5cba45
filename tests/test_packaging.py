"""A fresh machine gets what the code needs: pyproject.toml declares every package llava_mlx
imports, the reference environment is pinned, and CI starts from an empty virtual env."""

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest
import tomllib

from conftest import ROOT

# Imported only on a path that says it needs them: none (PyTorch .bin files are read without torch).
OPTIONAL = set()


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set:
    names = set()
    for file in (ROOT / "llava_mlx").rglob("*.py"):  # subpackages included
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"llava_mlx"}


def test_pyproject_declares_every_import():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {normalise(re.split(r"[<>=!~;\[ ]", d)[0]) for d in project["dependencies"]}
    distributions = packages_distributions()
    missing = []
    for module in sorted(imported_modules() - OPTIONAL):
        names = {normalise(d) for d in distributions.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} ({', '.join(sorted(names))})")
    assert not missing, f"imported but not in pyproject.toml dependencies: {missing}"
    assert imported_modules() >= {"sentencepiece", "transformers", "tqdm", "mlx", "mlx_lm"}  # the scan works


@pytest.mark.parametrize(
    "script, constraints",
    [
        ("setup_reference.sh", "reference-constraints.txt"),
        ("setup_reference_next.sh", "reference-next-constraints.txt"),
    ],
)
def test_reference_environment_is_pinned(script, constraints):
    """Every package a reference environment's script installs has one exact version."""
    text = (ROOT / "scripts" / script).read_text()
    pins = {}
    for line in (ROOT / "scripts" / constraints).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    installs = re.findall(r'install (?:-c "[^"]+" )?((?:[^\n\\]|\\\n)+)', text)
    requested = set()
    for line in installs:
        for word in line.replace("\\\n", " ").split():
            word = word.strip('"')
            if word.startswith("-") or word.startswith("$") or not re.match(r"[A-Za-z]", word):
                continue
            name, _, version = word.partition("==")
            requested.add(normalise(name))
            if not version:
                assert normalise(name) in pins, f"{name} is installed without a pinned version"
    assert {"sentencepiece", "protobuf", "numpy", "pillow", "safetensors"} <= requested
    assert f'-c "$ROOT/scripts/{constraints}"' in text


def test_ci_starts_from_an_empty_venv():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    create = lines.index("python3 -m venv .venv")
    assert "rm -rf .venv" in lines[:create]


def test_readme_is_a_door_to_the_docs():
    """README under 12 kB; every page in docs/ reachable from it; every link it makes resolves."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12_000
    linked = set(re.findall(r"\]\((docs/[^)#]+)\)", readme))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"
    for page in pages:  # links between the pages resolve too
        for target in re.findall(r"\]\(([^)#:]+\.md)", (ROOT / page).read_text()):
            assert (ROOT / "docs" / target).resolve().exists(), (page, target)
