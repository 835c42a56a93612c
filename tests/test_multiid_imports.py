"""pipeline/multiid's modules import one another without a circle (scripts/check_multiid_imports.py)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_multiid_imports.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_multiid_imports", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_has_no_import_circle():
    check = _checker()
    graph = {p.stem: check.imports_of(p) for p in check.PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert "selection" in graph["parallel"] and "parallel" in graph["plan"]  # the checker sees the split modules
    assert check.find_cycle(graph) is None


def test_the_checker_finds_a_circle():
    check = _checker()
    assert check.find_cycle({"plan": {"parallel"}, "parallel": {"selection"}, "selection": {"plan"}}) == [
        "parallel", "selection", "plan", "parallel"]
    assert check.find_cycle({"a": {"b"}, "b": set()}) is None
