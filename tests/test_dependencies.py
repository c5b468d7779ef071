"""Every package the project's code imports is one it declares (pyproject.toml), not one that happens to
come with another: a fresh install of a newer release of that other package must not break an import."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.conftest import ROOT

PROJECT = ("scoft", "tasks", "flows")


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def test_every_third_party_import_is_declared_and_none_is_private():
    declared = {_normal(re.split(r"[\[<>=!~; ]", d)[0])
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = packages_distributions()
    undeclared, private = {}, []
    for folder in PROJECT:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in PROJECT:
                        continue
                    if any(part.startswith("_") and not part.startswith("__") for part in name.split(".")[1:]):
                        private.append(f"{path.relative_to(ROOT)}: {name}")
                    for dist in distributions.get(top, [top]):
                        if _normal(dist) not in declared:
                            undeclared.setdefault(_normal(dist), str(path.relative_to(ROOT)))
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"
    assert private == [], f"private modules of other packages: {private}"
