"""The layout shows the architecture: the files a checkpoint ships with need only torch and transformers, and the
optional stacks (training data, the demo's plots) import their extras only where they are used."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ["configuration_mythos.py", "modeling_mythos.py", "tokenization_mythos.py"]
# huggingface_hub is a dependency of transformers itself, so it comes with it
SHIPPED_WITH_TRANSFORMERS = {"torch", "transformers", "huggingface_hub"}


def imported_modules(path: Path) -> tuple[set[str], set[str]]:
    """(top-level names of absolute imports, module names of relative imports) anywhere in the file."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            relative.add(node.module or "")
    return absolute, relative


def test_the_model_files_import_only_torch_transformers_and_each_other():
    for name in MODEL_FILES:
        absolute, relative = imported_modules(ROOT / "openmythos" / name)
        assert absolute - SHIPPED_WITH_TRANSFORMERS - set(sys.stdlib_module_names) == set(), name
        assert {f"{module}.py" for module in relative} <= set(MODEL_FILES), name


# Makes `datasets` and `matplotlib` look uninstalled, then imports what must work without them.
WITHOUT_EXTRAS = """
import sys
from importlib.abc import MetaPathFinder


class Uninstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Uninstalled())
import openmythos
import openmythos.cli
import openmythos.hub
from openmythos.demo import parse_args, run
from openmythos.training import (MuonAdamW, MythosTrainingCallback, apply_fsdp2, pack_documents, pretraining_dataset,
                                 sample_n_loops)

parse_args([])
print("imported:", sorted(m for m in ("datasets", "matplotlib") if m in sys.modules))
"""


def test_import_openmythos_needs_neither_datasets_nor_matplotlib():
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stdout
