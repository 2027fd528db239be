"""The package's layering holds: lower stages never import higher ones."""

import ast

import pytest
from conftest import ROOT

PACKAGE = ROOT / "src" / "tinystories_lab"


def imported_modules(folder: str) -> dict[str, set[str]]:
    """file -> every `tinystories_lab...` module it imports, at the top or inside a function."""
    found = {}
    for path in (PACKAGE / folder).glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[path.name] = {n for n in names if n.startswith("tinystories_lab")}
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("evaluate", "tinystories_lab.finetune"),
        ("experiments", "tinystories_lab.bench"),  # measuring a step is probe.py's, below both
        ("experiments", "tinystories_lab.pretrain"),  # the training process is started, never imported
    ],
)
def test_a_stage_does_not_import_a_later_one(folder, forbidden):
    offenders = {f: m for f, m in imported_modules(folder).items() if any(n.startswith(forbidden) for n in m)}
    assert not offenders, f"{folder}/ imports {forbidden}: {offenders}"


def test_the_lifeline_imports_only_the_standard_library():
    """A training process imports it first, before torch: it must stay fast to import."""
    tree = ast.parse((PACKAGE / "experiments" / "lifeline.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "ctypes", "os", "signal", "sys"}, imported
