"""docs/layering.md, enforced: no module of sgl_scd imports a package of a higher layer, and the
codec imports no model library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "sgl_scd"
LAYERS = {  # top-level name under sgl_scd -> layer (docs/layering.md)
    "settings": 0, "runinfo": 1, "codec": 1, "store": 1, "reuse": 2, "demo": 3, "hf": 4,
    "calibration": 5, "evaluation": 5, "calibrate": 6, "serving": 6, "sglang_ext": 6, "launch": 7,
}
# third-party libraries a layer may not use (the codec and the store must stay engine-free)
FORBIDDEN = {"codec": {"transformers", "peft", "sglang", "redis"}, "store": {"transformers", "peft", "torch"},
             "reuse": {"transformers", "peft", "sglang"}, "demo": {"sglang"}}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield path, rel.parts[0] if rel.parts[0] != "__init__" else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "sgl_scd" else [])
    return out


def test_every_top_level_name_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert names == set(LAYERS), f"add {sorted(names - set(LAYERS))} to docs/layering.md and LAYERS"


@pytest.mark.parametrize("path,top", [pytest.param(p, t, id=str(p.relative_to(PKG))) for p, t in _modules() if t])
def test_no_module_imports_a_higher_layer(path, top):
    bad = []
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "sgl_scd" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != top:
            if LAYERS[parts[1]] > LAYERS[top] or (LAYERS[parts[1]] == LAYERS[top]):
                bad.append(name)
        elif parts[0] in FORBIDDEN.get(top, ()):
            bad.append(name)
    assert not bad, f"{path.relative_to(PKG)} (layer {LAYERS[top]}) imports {bad}"
