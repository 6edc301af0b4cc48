"""The package's shape: every folder is an installable package, and no module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import setuptools

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vlmgraft"


def test_every_source_folder_is_a_documented_package():
    found = set(setuptools.find_packages(str(SRC)))
    for folder in sorted({p.parent for p in PACKAGE.rglob("*.py")} - {p for p in PACKAGE.rglob("__pycache__")}):
        name = ".".join(folder.relative_to(SRC).parts)
        assert name in found, f"{name} has no __init__.py: a wheel would leave it out"
        assert ast.get_docstring(ast.parse((folder / "__init__.py").read_text())), f"{name}/__init__.py has no docstring"


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlmgraft"):
                offenders += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders


def test_the_label_ignore_index_is_defined_once():
    defined = [path.relative_to(SRC) for path in PACKAGE.rglob("*.py")
               for node in ast.parse(path.read_text()).body
               if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE" for t in node.targets)]
    assert len(defined) == 1, defined
