"""The layers: a lower layer never imports a higher one (STYLE: the layout shows the
architecture). Every import in the package, at any depth (lazy ones too), is checked."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ensemble_kernel"

# Lowest first. A module may import its own layer and those below it.
LAYERS = [
    {"errors", "results", "_atomic"},
    {"core"},
    {"storage"},
    {"analysis", "testing"},
    {"report"},
    {"demo"},
    {"cli", "__main__"},
]
ALIASES = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "errors",
                                                     "results", "_atomic", "testing"}


def _layer(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{top} is in no layer: add it to LAYERS")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target + "." + a.name for a in node.names] if not node.module else [target]
            for t in names:
                yield node.lineno, t
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name


def test_no_layer_imports_a_higher_one():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "__init__.py" or rel.stem in ALIASES and len(rel.parts) == 1:
            continue  # the top level gathers every layer; the old paths are aliases
        own = _layer(rel.parts[0] if len(rel.parts) > 1 else rel.stem)
        for line, target in _imports(path):
            parts = target.split(".")
            if parts[0] != "ensemble_kernel" or len(parts) < 2 or parts[1] == "__version__":
                continue
            if parts[1] in ALIASES:
                bad.append(f"{rel}:{line} imports the old path {target}")
            elif _layer(parts[1]) > own:
                bad.append(f"{rel}:{line} imports {target}, a higher layer")
    assert not bad, "\n".join(bad)


def test_the_old_module_paths_are_aliases_of_the_new_ones():
    """In a fresh process: the old path is the new module itself, and warns."""
    import subprocess
    import sys

    code = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ensemble_kernel.engine as old
from ensemble_kernel.core import _engine
assert old is _engine
assert any(issubclass(w.category, DeprecationWarning) and "core._engine" in str(w.message)
           for w in caught), caught
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_names_moved_off_the_top_level_still_work_and_warn():
    import warnings

    import ensemble_kernel as ek
    from ensemble_kernel import core, testing

    for name, home in [("dense_kernel", testing), ("plan_memory", core), ("Plan", core),
                       ("choose_precision", core), ("PrecisionChoice", core)]:
        assert name not in ek.__all__
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert getattr(ek, name) is getattr(home, name)
        assert [w.category for w in caught] == [DeprecationWarning], name
    try:
        ek.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_the_testing_module_examples_run():
    import doctest

    import ensemble_kernel.testing

    result = doctest.testmod(ensemble_kernel.testing)
    assert result.attempted >= 4 and result.failed == 0
