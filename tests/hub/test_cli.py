"""The ``mythos`` command: help and refusals without importing torch, user errors as one line with exit status 2."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model

ROOT = Path(__file__).resolve().parents[2]  # tests/<area>/this file

# What the `mythos` console script does (setup.py: mythos=openmythos.cli:main), then which heavy modules got imported.
CONSOLE_SCRIPT = """
import sys
sys.argv = ["mythos", *{argv!r}]
from openmythos.cli import main
try:
    code = main()
except SystemExit as exit:
    code = exit.code
print("heavy modules:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
sys.exit(code)
"""


def mythos(*argv, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT.format(argv=list(argv))], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd or ROOT)


@pytest.fixture
def run_folder(tmp_path):
    """A training run with one checkpoint inside it."""
    make_model("gqa").save_pretrained(tmp_path / "run" / "checkpoint-20")
    return tmp_path / "run"


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["push", "--help"], ["presets", "--help"],
                                  ["demo", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv):
    result = mythos(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: mythos" in result.stdout
    assert "heavy modules: []" in result.stdout


def test_refused_demo_flags_import_neither_torch_nor_transformers():
    # the demo parses its flags (openmythos.demo.parse_args) before the training pipeline is imported
    result = mythos("demo", "--num-nodes", "6", "--eval-hops", "6")
    assert result.returncode == 2 and "mythos demo: error: --eval-hops (6) must be below --num-nodes (6)" in (
        result.stderr), result.stderr[-2000:]
    assert "heavy modules: []" in result.stdout


def test_the_installed_console_script_imports_no_torch_for_help():
    script = Path(sys.executable).parent / "mythos"
    assert script.is_file(), "the package is installed (pip install -e .), so the console script exists"
    result = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "usage: mythos" in result.stdout, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "openmythos.cli" in imported and not {"torch", "transformers"} & imported


def test_a_plain_import_still_registers_the_auto_classes():
    code = ("import openmythos\n"
            "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
            "from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING\n"
            "config = type(AutoConfig.for_model('mythos'))\n"
            "print(*(c.__name__ for c in (config, AutoModel._model_mapping[config],\n"
            "                             AutoModelForCausalLM._model_mapping[config], TOKENIZER_MAPPING[config])))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["MythosConfig", "MythosModel", "MythosForCausalLM", "MythosTokenizer"]


def assert_one_line_error(result, command, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mythos {command}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "heavy modules: []" in result.stdout  # refused before the model stack was imported


def test_refused_exports_print_one_line_before_loading_anything(run_folder, tmp_path):
    checkpoint = str(run_folder / "checkpoint-20")
    assert_one_line_error(mythos("export", str(run_folder), "--from", checkpoint, "--overwrite"), "export",
                          "contains the source checkpoint", "checkpoint-20")
    assert_one_line_error(mythos("export", checkpoint + "/hub", "--from", checkpoint), "export", "lies inside")
    assert_one_line_error(mythos("export", str(tmp_path / "out"), "--from", str(tmp_path / "nowhere")), "export",
                          "--from", "nowhere", "config.json")
    assert_one_line_error(mythos("export", str(tmp_path / "out"), "--from", checkpoint, "--repo-id", "me/a b"),
                          "export", "repo_id='me/a b'", "not a valid Hub repo id")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert_one_line_error(mythos("export", str(tmp_path / "busy"), "--from", checkpoint), "export",
                          "not empty", "--overwrite")
    (tmp_path / "busy" / ".env").write_text("HF_TOKEN=hf_secret")
    assert_one_line_error(mythos("export", str(tmp_path / "busy"), "--from", checkpoint, "--overwrite"), "export",
                          "hidden entries ['.env']")
    # a mistyped notes file was written into the card as its own name; an empty dataset id became an entry
    assert_one_line_error(mythos("export", str(tmp_path / "out"), "--from", checkpoint, "--training", "notse.txt"),
                          "export", "--training 'notse.txt' looks like a file name and no such file exists")
    assert_one_line_error(mythos("export", str(tmp_path / "out"), "--from", checkpoint, "--datasets", "wiki", ""),
                          "export", "datasets must be a list of non-empty names", "['wiki', '']")
    assert not (tmp_path / "out").exists()
    assert (run_folder / "checkpoint-20" / "model.safetensors").is_file()
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_export_reads_training_notes_from_a_file_or_takes_them_as_text(run_folder, tmp_path):
    from openmythos.cli import _check_export

    notes = tmp_path / "notes.md"
    notes.write_text("Trained for 20 steps on the toy corpus.")
    checkpoint = str(run_folder / "checkpoint-20")
    result = mythos("export", str(tmp_path / "a"), "--from", checkpoint, "--training", str(notes))
    assert result.returncode == 0, result.stderr[-2000:]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Trained for 20 steps on the toy corpus." in card and str(notes) not in card

    def check(training):
        _check_export(argparse.Namespace(checkpoint=checkpoint, folder=str(tmp_path / "b"), overwrite=False,
                                         repo_id=None, datasets=None, training=training))

    check("Ten steps of notes.txt-free text")  # text: words with spaces, whatever they mention
    check(str(notes))
    with pytest.raises(ValueError, match="looks like a file name"):
        check(str(tmp_path / "missing" / "notes"))
    assert not (tmp_path / "b").exists()


def test_refused_pushes_print_one_line(tmp_path):
    assert_one_line_error(mythos("push", "me/x\nlicense: evil", "--folder", str(tmp_path), "--dry-run"), "push",
                          "repo_id='me/x\\nlicense: evil'", "not a valid Hub repo id")
    assert_one_line_error(mythos("push", "me/x", "--folder", str(tmp_path / "nowhere"), "--dry-run"), "push",
                          "nowhere", "not an export folder", "export_manifest.json")


def test_export_then_dry_run_lists_what_goes_up_and_warns_about_the_rest(run_folder, tmp_path):
    out = tmp_path / "hub"
    result = mythos("export", str(out), "--from", str(run_folder / "checkpoint-20"), "--repo-id", "me/tiny",
                    "--datasets", "a\nlicense: evil")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.safetensors" in result.stdout and (out / "export_manifest.json").is_file()
    (out / ".env").write_text("HF_TOKEN=hf_secret")
    result = mythos("push", "me/tiny", "--folder", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    listed = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["README.md", "config.json", "configuration_mythos.py", "generation_config.json",
                      "model.safetensors", "modeling_mythos.py"]
    assert "would upload 6 files to me/tiny:" in result.stdout
    assert "mythos push: warning: not uploaded (export did not write them): ['.env']" in result.stderr


def test_unexpected_errors_keep_their_traceback(tmp_path):
    code = ("import sys\nsys.argv = ['mythos']\nimport openmythos.hub\n"
            "def bug(*args, **kwargs):\n    raise KeyError('a bug')\n"
            "openmythos.hub.push = bug\n"
            "from openmythos.cli import main\nmain(['push', 'me/x', '--folder', '.', '--dry-run'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "KeyError: 'a bug'" in result.stderr


def test_a_non_mythos_or_weightless_checkpoint_is_refused_before_loading(run_folder, tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    (other / "model.safetensors").write_bytes(b"")
    assert_one_line_error(mythos("export", str(tmp_path / "out"), "--from", str(other)), "export",
                          "holds a llama checkpoint, not a Mythos one")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_bytes((run_folder / "checkpoint-20" / "config.json").read_bytes())
    assert_one_line_error(mythos("export", str(tmp_path / "out"), "--from", str(tmp_path / "bare")), "export",
                          "has no weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("manifest, fragment", [
    ("[]", "has format 'list'"), ('{"format": 1}', "must list the exported files"),
    ('{"format": 1, "files": [{"name": "config.json"}]}', "must list the exported files"),
    ("{broken", "is not valid JSON"),
])
def test_a_malformed_manifest_is_one_line(tmp_path, manifest, fragment):
    (tmp_path / "export_manifest.json").write_text(manifest)
    assert_one_line_error(mythos("push", "me/x", "--folder", str(tmp_path), "--dry-run"), "push", fragment)


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "--preset", "bogus", "--gpus", "1"], "argument --preset: invalid choice: 'bogus'"),
    (["quickstart", "--n-loops", "0"], "--n-loops must be positive integers, got 0"),
])
def test_argument_errors_are_one_line_without_the_usage_block(argv, fragment):
    assert_one_line_error(mythos(*argv), argv[0], fragment)


def test_demo_argument_errors_are_one_line_too():
    for argv, prog, fragment in ((["demo", "--task"], "demo", "argument --task: expected one argument"),
                                 (["demo", "--steps", "x"], "demo", "invalid int value: 'x'"),
                                 (["demo", "--task", "text", "--steps", "x"], "demo --task text", "--steps")):
        assert_one_line_error(mythos(*argv), prog, fragment)
