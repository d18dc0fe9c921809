"""Image contract: every module a component imports on its code path is installed by the image that
runs it. A pod whose image lacks a package dies with ImportError on the cluster; here the same gap
fails a test.

The code path is followed statically: the component function's imports, then every faceops module
they reach, function-level imports included (the stages import lazily). Imports guarded by
``except ImportError`` are optional and skipped. Third-party modules map to distributions through
importlib.metadata; the image's distributions are the closure of ``faceops[<extras>]`` as its
Dockerfile installs it, plus what its base image provides.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import runpy
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "components" / "stages.py"
LOCK = runpy.run_path(str(REPO / "scripts" / "check_lock.py"))
BASE_PROVIDES = {"trainer": {"torch", "torchvision"}, "slim": set()}  # the base image's own packages
# Imported only on a GPU node asked for TensorRT (export --trt), where its absence is a clear error
# (faceops.export.tensorrt); no image installs it: Triton builds engines in the cluster.
OPTIONAL = {"tensorrt"}


def image_extras(role: str) -> tuple[str, ...]:
    text = (REPO / "images" / role / "Dockerfile").read_text()
    m = re.search(r"/opt/faceops\[([\w,-]+)\]", text)
    assert m, f"images/{role}/Dockerfile installs no faceops[...]"
    return tuple(m.group(1).split(","))


def distributions(extras: tuple[str, ...]) -> set[str]:
    """The distributions ``pip install faceops[extras]`` brings, from the installed metadata."""
    return {"faceops"} | {canonicalize_name(req.name) for req, _ in LOCK["walk_requirements"](extras)}


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``try: ... except ImportError`` (or ModuleNotFoundError)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def imports_of(tree: ast.AST, module: str) -> set[str]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and not _optional(node, parents):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
                continue
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level] if not module_is_package(module) else module.split(".")[
                    : len(module.split(".")) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if _find_spec_safe(f"{base}.{a.name}")}
    return found


def module_is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return bool(spec and spec.submodule_search_locations)


def _find_spec_safe(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def third_party_closure(roots: set[str]) -> set[str]:
    """Top-level third-party modules reached from ``roots`` through faceops modules."""
    out, seen, todo = set(), set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
            continue
        if top != "faceops":
            out.add(top)
            continue
        spec = _find_spec_safe(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        for parent in range(1, name.count(".") + 1):  # importing a.b.c runs a/__init__, a/b/__init__
            todo.append(".".join(name.split(".")[:parent]))
        todo += imports_of(ast.parse(Path(spec.origin).read_text()), name)
    return out


def components() -> dict[str, tuple[str, ast.FunctionDef]]:
    """component name -> (image role, function)"""
    tree = ast.parse(COMPONENTS.read_text())
    out = {}
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef):
            for d in fn.decorator_list:
                kw = {k.arg: k.value for k in getattr(d, "keywords", [])}
                if isinstance(kw.get("base_image"), ast.Name):
                    out[fn.name] = (kw["base_image"].id.lower(), fn)
    return out


def _dist_of() -> dict[str, set[str]]:
    return {top: {canonicalize_name(d) for d in ds} for top, ds in metadata.packages_distributions().items()}


COMPONENTS_BY_NAME = components()


@pytest.mark.parametrize("name", sorted(COMPONENTS_BY_NAME))
def test_every_import_of_a_component_is_installed_by_its_image(name):
    role, fn = COMPONENTS_BY_NAME[name]
    installed = distributions(image_extras(role)) | BASE_PROVIDES[role]
    dist_of = _dist_of()
    missing = {}
    for top in sorted(third_party_closure(imports_of(fn, "faceops.components.stages")) - OPTIONAL):
        dists = dist_of.get(top)
        assert dists, f"{top}: imported on the {name} path but no installed distribution provides it"
        if not dists & installed:
            missing[top] = sorted(dists)
    extras = ",".join(image_extras(role))
    assert not missing, f"component {name} runs in the {role} image (faceops[{extras}]) but imports {missing}"


def test_the_contract_catches_an_image_without_tritonclient():
    """What the test above would say if the trainer image installed only faceops[kfp]."""
    _, fn = COMPONENTS_BY_NAME["export"]
    reached = third_party_closure(imports_of(fn, "faceops.components.stages"))
    assert "tritonclient" in reached
    assert "tritonclient" not in distributions(("kfp",))
    assert "tritonclient" in distributions(image_extras("trainer"))
