"""The store's layers hold: engine -> repository -> backend, publish (EBS) beside the
repository, store/ the names embedders import.  No import cycle between them (checked on
the source, lazy imports inside functions included, and by importing each package alone
in a fresh interpreter), and no reaching into another object's private members."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "smsblock"

#: what each layer must never import (any smsblock module under these names)
FORBIDDEN = {
    "backend": ("smsblock.repository", "smsblock.store", "smsblock.engine", "smsblock.publish",
                "smsblock.pack", "smsblock.manifest", "smsblock.scanner"),
    "repository": ("smsblock.store", "smsblock.engine", "smsblock.publish", "smsblock.service",
                   "smsblock.cli"),
    "publish": ("smsblock.store", "smsblock.engine", "smsblock.service", "smsblock.cli"),
    "store": ("smsblock.engine", "smsblock.service", "smsblock.cli"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every smsblock module a file imports (relative imports resolved), lazy ones too."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        package = module.rsplit(".", 1)[0] if module.endswith("__init__") else module
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
            out.append((node.lineno, name))
    return [(n, m) for n, m in out if m.startswith("smsblock")]


def _files(layer: str) -> list[Path]:
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer):
    bad = []
    for path in _files(layer):
        for line, name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    assert not bad, "\n".join(bad)


def test_engine_reaches_the_store_only_through_its_public_modules():
    names = [m for _, m in _imports(PKG / "engine.py")]
    assert not any(m.startswith("smsblock.backend") for m in names), names
    private = [m for m in names if m.rsplit(".", 1)[-1].startswith("_")
               and not m.rsplit(".", 1)[-1].startswith("__")]
    assert not private, f"engine imports private names: {private}"


@pytest.mark.parametrize("module", ["smsblock.backend.local", "smsblock.backend.s3",
                                    "smsblock.repository", "smsblock.publish.ebs",
                                    "smsblock.store", "smsblock.store.ebs", "smsblock.engine"])
def test_each_package_imports_alone(module):
    """A cycle shows as an ImportError (partially initialised module) when a package is
    the first one imported."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def _private_accesses(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            if isinstance(v, ast.Name) and v.id in ("os", "sys"):    # os._exit and the like
                continue
            out.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    return out


# Underscore names read on something other than self that are not another class's
# private members: (file, attribute) -> why
NOT_ANOTHER_CLASS_PRIVATE = {
    ("smsblock/source/vsphere.py", "_moId"): "pyVmomi's public managed-object id",
    ("smsblock/source/vsphere.py", "_stub"): "pyVmomi's service instance has no public "
                                             "accessor for its SOAP stub (session cookie)",
    ("smsblock/manifest.py", "_digest_v1"): "the same class, on another instance",
    ("smsblock/disk/vmdk.py", "_own_runs"): "the same class, on another instance",
    ("smsblock/service/state.py", "_index"): "the same class, on another instance",
    ("smsblock/progress.py", "_takes_phase"): "this module's own private class",
    ("smsblock/blockindex.py", "_view"): "this module's own class, from its opener",
}


def test_no_reaching_into_another_objects_private_members():
    """Across the whole package: what another class keeps private is not called or read
    from outside it (the store's layers, the engine, the service, the sources alike)."""
    files = sorted(PKG.rglob("*.py"))
    bad = [hit for f in files for hit in _private_accesses(f)
           if (hit.split(":")[0], hit.rsplit(".", 1)[-1]) not in NOT_ANOTHER_CLASS_PRIVATE]
    assert not bad, "\n".join(bad)
