"""Load a script of ``tools/`` as a module, once per test session.

The tools are loaded by file path under a name of their own: with ``tools/``
on ``sys.path``, ``import cassandra`` would find ``tools/cassandra.py`` instead
of cassandra-driver.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(script: str, module_name: str) -> ModuleType:
    """``tools/<script>`` as the module ``module_name`` (the same object on every call)."""
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, TOOLS / script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module
