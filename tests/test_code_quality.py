"""The model files read like transformers' own: the mlinter's rules, short functions, and tests that really run."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ["configuration_mythos.py", "modeling_mythos.py", "tokenization_mythos.py"]
ALLOWLIST = Path(__file__).parent / "mlinter_allowlist.txt"


def allowed_findings() -> set[tuple[str, str]]:
    entries = set()
    for line in ALLOWLIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            path, rule, reason = line.split(maxsplit=2)
            assert reason.strip(), f"allowlist entry without a reason: {line!r}"
            entries.add((path, rule))
    return entries


def test_model_files_pass_mlinter_or_every_finding_is_justified(tmp_path):
    out = tmp_path / "findings.json"
    files = [str(ROOT / "openmythos" / name) for name in MODEL_FILES]
    # transformers-mlinter is pinned in the test extra
    subprocess.run([sys.executable, "-m", "mlinter", "--no-progress", "--no-cache", "--output-json", str(out), *files],
                   capture_output=True, text=True, cwd=tmp_path)
    findings = {(Path(f["path"]).name, f["rule"]) for f in json.loads(out.read_text())["findings"]}
    allowed = allowed_findings()
    assert findings - allowed == set(), "new mlinter findings; fix them or justify them in mlinter_allowlist.txt"
    assert allowed - findings == set(), "allowlist entries that no longer match a finding; remove them"


def test_no_function_in_the_modeling_file_is_longer_than_60_lines():
    tree = ast.parse((ROOT / "openmythos" / "modeling_mythos.py").read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {name: n for name, n in lengths.items() if n > 60} == {}


def uncollected_tests(path: Path) -> list[str]:
    """``test_*`` functions pytest never collects: nested in a function, or in a class not named ``Test*``."""
    found = []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name.startswith("test") and inside is not None:
                    found.append(f"{path.name}:{child.lineno} {child.name} inside {inside}")
                visit(child, f"function {child.name}")
            elif isinstance(child, ast.ClassDef):
                visit(child, None if child.name.startswith("Test") and inside is None else f"class {child.name}")
            else:
                visit(child, inside)

    visit(ast.parse(path.read_text()), None)
    return found


def test_every_test_function_is_collected_by_pytest():
    found = [entry for path in sorted(Path(__file__).parent.rglob("test_*.py")) for entry in uncollected_tests(path)]
    assert found == []


def test_the_uncollected_test_check_finds_nested_tests(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text("def test_a():\n    def test_nested():\n        pass\n\n\nclass Helper:\n    def test_b(self):\n"
                      "        pass\n\n\nclass TestGood:\n    def test_c(self):\n        pass\n")
    assert uncollected_tests(sample) == ["test_sample.py:2 test_nested inside function test_a",
                                         "test_sample.py:7 test_b inside class Helper"]
