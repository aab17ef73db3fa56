"""Import direction: tools -> dgseg / data_prep -> dgseg core, never back (docs/ARCHITECTURE.md)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    """Absolute module names a source file imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(_imported_modules(path)):
            if name.split(".")[0] in forbidden:
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


def test_dgseg_imports_neither_data_prep_nor_tools():
    assert _offenders("dgseg", ("data_prep", "tools")) == []


def test_data_prep_does_not_import_tools():
    assert _offenders("data_prep", ("tools",)) == []


def test_the_scan_sees_function_level_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n    from data_prep.loading import load_raw_case\n    import tools.x\n"
    )
    assert _imported_modules(src) == {"data_prep.loading", "tools.x"}


@pytest.mark.parametrize(
    "module", ["data_prep.pipeline", "data_prep.synthetic", "dgseg.data.manifest", "dgseg.viz"]
)
def test_preparation_imports_no_torch(module):
    """Preparation runs in spawned worker processes: importing torch would cost each seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == "False"
