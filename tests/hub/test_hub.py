"""Hub export: loads with trust_remote_code where openmythos is absent; the card renders fully."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model
from huggingface_hub import ModelCard

from openmythos import MythosForCausalLM, mythos_tiny
from openmythos.configuration_mythos import MYTHOS_FORMAT_VERSION
from openmythos.hub import export, push, render_card
from openmythos.tokenization_mythos import MythosTokenizer

ROOT = Path(__file__).resolve().parents[2]  # tests/<area>/this file

# Runs in a fresh interpreter in which `import openmythos` fails, like a machine without the package.
NO_PACKAGE = """
import sys
sys.modules["openmythos"] = None  # any import of openmythos now raises ImportError
sys.path = [p for p in sys.path if p not in ("", {root!r})]
"""


def run_without_package(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    script = NO_PACKAGE.format(root=str(ROOT)) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


UNICODE_TEXT = "Grüße, 世界! 🙂 naïve café — ∑ x² ≠ ∞"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "mythos-test"
    tokenizer = MythosTokenizer()
    model = make_model("mla", use_act=True, vocab_size=len(tokenizer))
    files = export(model, folder, tokenizer, repo_id="someone/mythos-test", training="40 steps on a toy corpus.",
                   datasets=["HuggingFaceFW/fineweb-edu"])
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids, "logits": model(ids, n_loops=3).logits}, folder.parent / "expected.pt")
    return folder, files


def test_export_folder_holds_exactly_what_a_loader_needs(exported):
    folder, files = exported
    names = sorted(p.name for p in files)
    assert names == ["README.md", "config.json", "configuration_mythos.py", "generation_config.json",
                     "model.safetensors", "modeling_mythos.py", "tokenization_mythos.py", "tokenizer_config.json"]
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for n in names)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mythos.MythosConfig",
                                  "AutoModel": "modeling_mythos.MythosModel",
                                  "AutoModelForCausalLM": "modeling_mythos.MythosForCausalLM"}
    assert config["mythos_format_version"] == MYTHOS_FORMAT_VERSION
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_mythos.MythosTokenizer"
    for module in ("configuration_mythos.py", "modeling_mythos.py", "tokenization_mythos.py"):
        imports = [line for line in (folder / module).read_text().splitlines()
                   if line.startswith(("import ", "from "))]
        roots = {line.split()[1].split(".")[0] for line in imports if not line.startswith("from .")}
        assert roots <= {"torch", "transformers"} | set(sys.stdlib_module_names), roots


def test_exported_model_and_tokenizer_load_without_the_package(exported, tmp_path):
    folder, _ = exported
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
expected = torch.load({str(folder.parent / 'expected.pt')!r})
got = model(expected["ids"], n_loops=3).logits
torch.testing.assert_close(got, expected["logits"], atol=1e-6, rtol=0)
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(tokenizer).__module__.startswith("transformers_modules"), type(tokenizer).__module__
ids = tokenizer({UNICODE_TEXT!r}, return_tensors="pt").input_ids
assert ids.shape[1] == len({UNICODE_TEXT!r}.encode("utf-8"))
assert tokenizer.decode(ids[0]) == {UNICODE_TEXT!r}
out = model.generate(ids, max_new_tokens=4, do_sample=False, n_loops=2)
print("ok", tuple(out.shape), tokenizer.decode(out[0, :ids.shape[1]]) == {UNICODE_TEXT!r})
"""
    result = run_without_package(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ok (1, {len(UNICODE_TEXT.encode()) + 4}) True" in result.stdout


def test_loading_without_trust_remote_code_says_what_to_do(exported, tmp_path):
    folder, _ = exported
    code = f"""
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(folder)!r})
except Exception as error:
    print("ERROR:", error)
"""
    result = run_without_package(code, tmp_path)
    assert "trust_remote_code=True" in result.stdout, result.stdout + result.stderr[-2000:]


def test_newer_format_version_is_refused_by_the_remote_code_too(exported, tmp_path):
    folder, _ = exported
    newer = tmp_path / "newer"
    newer.mkdir()
    for f in folder.iterdir():
        (newer / f.name).write_bytes(f.read_bytes())
    config = json.loads((newer / "config.json").read_text())
    config["mythos_format_version"] = MYTHOS_FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(config))
    code = f"""
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(newer)!r}, trust_remote_code=True)
except Exception as error:
    print("ERROR:", error)
"""
    result = run_without_package(code, tmp_path)
    assert "format version" in result.stdout and "Upgrade" in result.stdout, result.stdout + result.stderr[-2000:]


def test_card_renders_fully_and_parses_as_a_model_card(exported):
    folder, _ = exported
    text = (folder / "README.md").read_text()
    assert "{{" not in text and "}}" not in text.replace("}}\n", "")
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.license == "mit"
    assert card.data.pipeline_tag == "text-generation" and card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert "trust_remote_code=True" in text and "not affiliated" in text and "@software" in text
    assert "| dim | 64 |" in text and "someone/mythos-test" in text and "40 steps on a toy corpus." in text
    assert "active per token" in text


def test_card_for_every_attention_type_and_unfilled_placeholders_are_refused():
    for attn_type in ("mla", "gqa"):
        text = render_card(mythos_tiny(attn_type=attn_type))
        assert "{{" not in text
    with pytest.raises(ValueError, match="no_such_field"):
        render_card(mythos_tiny(), template="{{no_such_field}}")


def test_push_dry_run_lists_the_files_and_contacts_nobody(exported):
    folder, files = exported
    assert push(folder, "someone/mythos-test", dry_run=True) == sorted(p.name for p in files)
    with pytest.raises(FileNotFoundError, match="export"):
        push(folder.parent / "nowhere", "someone/x", dry_run=True)


def test_export_refuses_a_non_empty_folder_and_overwrite_leaves_no_stale_file(tmp_path):
    folder = tmp_path / "out"
    (folder / "old_shards").mkdir(parents=True)
    (folder / "old_shards" / "model-00001-of-00002.safetensors").write_text("stale")
    (folder / "notes.txt").write_text("stale")
    (folder / ".git").mkdir()
    model = make_model("gqa")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(model, folder)
    assert (folder / "notes.txt").read_text() == "stale"  # refused before touching anything
    # hidden entries (a git clone of the Hub repo, a .env) are never deleted nor published: refused, even overwriting
    with pytest.raises(FileExistsError, match=r"hidden entries \['\.git'\]"):
        export(model, folder, overwrite=True)
    assert (folder / ".git").is_dir() and (folder / "notes.txt").read_text() == "stale"
    (folder / ".git").rename(tmp_path / "moved-git")  # what the message tells the user to do
    files = export(model, folder, overwrite=True)
    assert not (folder / "notes.txt").exists() and not (folder / "old_shards").exists()
    assert sorted(p.name for p in files) == ["README.md", "config.json", "configuration_mythos.py",
                                             "generation_config.json", "model.safetensors", "modeling_mythos.py"]
    assert [n for n in push(folder, "someone/x", dry_run=True) if not n.startswith(".")] == [p.name for p in files]


def test_export_leaves_later_plain_saves_without_remote_code(tmp_path):
    model, tokenizer = make_model("gqa"), MythosTokenizer()
    export(model, tmp_path / "export", tokenizer)
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "auto_map" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    assert not list((tmp_path / "plain").glob("*.py"))


def test_export_and_push_commands(tmp_path, capsys, monkeypatch):
    """In process, through the console script's ``openmythos.cli:main`` (tests/hub/test_cli.py runs it as a process)."""
    from types import SimpleNamespace

    from openmythos.cli import main

    checkpoint = tmp_path / "ckpt"
    make_model("gqa").save_pretrained(checkpoint)
    monkeypatch.chdir(tmp_path)

    def run(*argv):
        try:
            code = main(list(argv))
        except SystemExit as done:
            code = done.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    result = run("export", str(tmp_path / "out"), "--from", str(checkpoint), "--repo-id", "me/tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "README.md").exists() and "me/tiny" in (tmp_path / "out" / "README.md").read_text()
    result = run("export", str(tmp_path / "out"), "--from", str(checkpoint), "--repo-id", "me/other")
    assert result.returncode != 0 and "--overwrite" in result.stderr
    result = run("export", str(tmp_path / "out"), "--from", str(checkpoint), "--repo-id", "me/other", "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "me/other" in (tmp_path / "out" / "README.md").read_text()
    result = run("push", "me/tiny", "--folder", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "would upload" in result.stdout and "model.safetensors" in result.stdout


# ------------------------------------------------------------------------------------- export loses and leaks nothing

def tree_digest(root: Path) -> dict:
    """Every file and folder under ``root`` (hidden ones included) with the sha256 of each file's bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def make_run_folder(root: Path) -> Path:
    """A training run: two checkpoints, each with optimizer state, like Trainer's output_dir."""
    for step in (10, 20):
        checkpoint = root / f"checkpoint-{step}"
        make_model("gqa").save_pretrained(checkpoint)
        (checkpoint / "optimizer.pt").write_bytes(b"optimizer state %d" % step)
    return root


def test_export_refuses_a_folder_that_is_contains_or_lies_inside_the_source(tmp_path):
    run = make_run_folder(tmp_path / "run")
    (tmp_path / "link-to-run").symlink_to(run, target_is_directory=True)
    before = tree_digest(run)
    model = make_model("gqa")
    source = run / "checkpoint-20"
    for folder, relation in [(run, "contains"), (tmp_path / "link-to-run", "contains"), (source, "is"),
                             (source / "hub", "lies inside")]:
        with pytest.raises(ValueError, match=rf"{relation} the source checkpoint .*checkpoint-20.*source="):
            export(model, folder, source=source, overwrite=True)
    assert tree_digest(run) == before  # nothing deleted: not the checkpoint, its sibling nor the optimizer state


def test_export_refuses_the_folder_the_model_was_loaded_from_without_being_told(tmp_path):
    from transformers import AutoModelForCausalLM

    run = make_run_folder(tmp_path / "run")
    before = tree_digest(run)
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint-20")
    with pytest.raises(ValueError, match="contains the source checkpoint"):
        export(model, run, overwrite=True)
    assert tree_digest(run) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_refuses_hidden_entries_and_names_them(tmp_path, overwrite):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]")
    (folder / "old_shards").mkdir()
    (folder / "old_shards" / ".secret").write_text("nested")  # overwrite would delete old_shards with it
    before = tree_digest(folder)
    with pytest.raises(FileExistsError, match=r"hidden entries \['\.env', '\.git', 'old_shards/\.secret'\].*move "
                                               r"them out"):
        export(make_model("gqa"), folder, overwrite=overwrite)  # a folder of dot-files is not "empty"
    assert tree_digest(folder) == before


def test_failed_export_leaves_the_previous_folder_byte_identical(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    export(make_model("gqa"), folder, MythosTokenizer(), repo_id="me/first")
    (folder / "notes.txt").write_text("the user's notes")  # overwrite may replace them, but only on success
    before = tree_digest(folder)

    def disk_full(self, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half a weight file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MythosForCausalLM, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(make_model("gqa", seed=1), folder, MythosTokenizer(), repo_id="me/second", overwrite=True)
    assert tree_digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch folder left behind


def test_export_recovers_from_the_scratch_folders_of_a_crashed_export(tmp_path):
    folder = tmp_path / "out"
    export(make_model("gqa"), folder, repo_id="me/first")
    before = tree_digest(folder)
    # a crash between the two renames of a swap: the old export moved aside, the new one half-built
    folder.rename(tmp_path / ".out.mythos-export-old-0badc0de")
    (tmp_path / ".out.mythos-export-new-12345678").mkdir()
    (tmp_path / ".out.mythos-export-new-12345678" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".out.keep").write_text("not ours")
    with pytest.raises(FileExistsError, match="not empty"):  # the previous export is back, so it needs overwrite
        export(make_model("gqa"), folder, repo_id="me/second")
    assert tree_digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.keep", "out"]
    export(make_model("gqa"), folder, repo_id="me/second", overwrite=True)
    assert "me/second" in (folder / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.keep", "out"]


# ------------------------------------------------------------------------------------ push uploads the manifest only

@pytest.fixture
def export_with_extras(tmp_path):
    """An export folder that also holds files export did not write: a secret, a git clone, notes."""
    folder = tmp_path / "out"
    files = export(make_model("gqa"), folder, MythosTokenizer(), repo_id="me/tiny")
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]")
    (folder / "notes.txt").write_text("private notes")
    return folder, sorted(p.name for p in files)


def test_push_uploads_exactly_the_files_export_wrote(export_with_extras, monkeypatch):
    import huggingface_hub

    folder, written = export_with_extras
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda self, repo_id, operations, **kw: calls.append(("commit", repo_id, operations)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **kw: pytest.fail("uploads everything"))
    with pytest.warns(UserWarning, match=r"not uploaded .*\['\.env', '\.git/', 'notes\.txt'\]"):
        names = push(folder, "me/tiny", private=True)
    assert names == written and "export_manifest.json" not in names
    assert calls[0] == ("repo", "me/tiny", {"private": True, "exist_ok": True})
    (kind, repo_id, operations), = calls[1:]
    assert kind == "commit" and repo_id == "me/tiny"
    assert [op.path_in_repo for op in operations] == written
    assert [Path(op.path_or_fileobj) for op in operations] == [folder / name for name in written]
    with pytest.warns(UserWarning, match=r"\.env"):
        assert push(folder, "me/tiny", dry_run=True) == names  # the dry run lists exactly what goes up


def test_push_refuses_a_folder_without_manifest_or_with_a_changed_file(export_with_extras, tmp_path):
    folder, _ = export_with_extras
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "README.md", "model.safetensors"):
        (copy / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no export_manifest.json.*export"):
        push(copy, "me/tiny", dry_run=True)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nedited after export\n")
    with pytest.raises(ValueError, match="README.md changed since export"):
        push(folder, "me/tiny", dry_run=True)
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(folder / ".env")
    with pytest.raises(ValueError, match="README.md .*not a regular file"):
        push(folder, "me/tiny", dry_run=True)


# ----------------------------------------------------------------------------------------------------- Hub inputs

@pytest.mark.parametrize("repo_id", ["me/x\nlicense: evil", "me/x\n", "not a repo", "a/b/c", "me/x--y", ""])
def test_repo_id_is_validated_by_export_push_and_the_dry_run(exported, tmp_path, repo_id):
    folder, _ = exported
    with pytest.raises(ValueError, match=r"repo_id=.* is not a valid Hub repo id: use 'name' or 'namespace/name'"):
        push(folder, repo_id, dry_run=True)
    with pytest.raises(ValueError, match=r"repo_id=.* is not a valid Hub repo id"):
        export(make_model("gqa"), tmp_path / "out", repo_id=repo_id)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_card_front_matter_cannot_be_injected():
    import yaml

    datasets = ["HuggingFaceFW/fineweb-edu", "a\nlicense: apache-2.0", "x: y", "---", "- z", 'q"\\ \'', "naïve 🙂"]
    text = render_card(mythos_tiny(), repo_id="me/tiny", datasets=datasets)
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert set(meta) == {"library_name", "license", "pipeline_tag", "tags", "datasets"}
    assert meta["license"] == "mit" and meta["datasets"] == datasets
    assert body.startswith("\n# tiny\n")
    assert ModelCard(text).data.datasets == datasets
    with pytest.raises(ValueError, match="model_name=.*single line"):
        render_card(mythos_tiny(), model_name="tiny\n---\nlicense: evil")
    with pytest.raises(ValueError, match="repo_id="):
        render_card(mythos_tiny(), repo_id="me/tiny\nlicense: evil")
