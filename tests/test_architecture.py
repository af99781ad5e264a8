"""The house rules of the package, checked on its source: which floors import which, where the
text-to-image family may be named, no branch on a loss or family name in the method and its
stages, and modules and functions of a size one can read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "disback_cli"
STORE_MAY_NOT_IMPORT = ("models", "method", "evaluation", "runtime", "stages", "cli")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
PORTED = ("models/networks/unets.py", "models/networks/layers.py")  # EDM's constructors
MAX_FMT_SKIPS = 20


def modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("disback_cli")}


def test_store_is_the_ground_floor():
    upward = {
        (module, name)
        for module, tree in modules().items()
        if module.startswith("store/")
        for name in imports(tree)
        if name.split(".")[1:2] and name.split(".")[1] in STORE_MAY_NOT_IMPORT
    }
    assert upward == set()


def test_the_text_to_image_family_is_named_by_at_most_three_modules_outside_it():
    outside = {
        module
        for module, tree in modules().items()
        if not module.startswith("models/text_to_image/")
        and any(name.startswith("disback_cli.models.text_to_image") for name in imports(tree))
    }
    assert len(outside) <= 3, outside


def test_the_method_and_its_stages_do_not_branch_on_names():
    """A loss, family or fake side is an object chosen once: nothing in stages/ or method/
    compares a name to a string literal, or asks whether a teacher is text-to-image."""
    found = []
    for module, tree in modules().items():
        if not module.startswith(("stages/", "method/")):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Constant) and side.value in NAMES
                for side in (node.left, *node.comparators)
            ):
                found.append(f"{module}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "text_to_image":
                found.append(f"{module}:{node.lineno}")
    assert found == []


NAMES = {"vsd", "dmd", "sid", "diffratio", "text", "edm", "diffusers", "score", "ratio"}


def test_modules_and_functions_stay_readable():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = str(path.relative_to(PACKAGE))
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(module)
        if module in PORTED:
            continue
        for node in ast.walk(ast.parse(text)):
            function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if function and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long_functions.append(f"{module}:{node.name}")
    assert long_modules == [] and long_functions == []


def test_one_formatting_style():
    skips = sum(
        len(re.findall(r"# fmt: (skip|off)", path.read_text()))
        for folder in ("disback_cli", "tests", "benchmarks", "scripts")
        for path in (PACKAGE.parent / folder).rglob("*.py")
    )
    assert skips <= MAX_FMT_SKIPS


def test_the_hand_written_mutants_still_apply():
    """`make mutation`'s second layer plants each bug by exact text: a refactor that moves or
    reformats the code must move the mutant too, or it would silently test nothing."""
    import importlib.util
    import sys

    path = PACKAGE.parent / "benchmarks" / "mutation.py"
    spec = importlib.util.spec_from_file_location("hand_written_mutants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    stale = [
        mutant.name
        for mutant in module.MUTANTS
        if (PACKAGE / f"{mutant.module}.py").read_text().count(mutant.before) != 1
    ]
    assert stale == []
