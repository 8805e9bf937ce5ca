"""``mythos loops``: the loops every token used, as a table and a heatmap; bad flags refused before torch loads."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model

from openmythos import MythosTokenizer
from openmythos.cli import main

ROOT = Path(__file__).resolve().parents[2]  # tests/<area>/this file
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# index, source, token (repr), loops used, then the state change per loop
ROW = re.compile(r"^\s*(\d+)\s+(prompt|new)\s+(.+?)\s+(\d+|-)\s+((?:\s*\S+)+)$")

CONSOLE_SCRIPT = """
import sys
sys.argv = ["mythos", *{argv!r}]
from openmythos.cli import main
code = main()
print("heavy modules:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
sys.exit(code)
"""


def mythos(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT.format(argv=list(argv))], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_model("gqa").save_pretrained(folder)
    MythosTokenizer().save_pretrained(folder)
    return folder


def table_rows(stdout: str) -> list[tuple[int, str, str, int | None, list[str]]]:
    rows = []
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match:
            index, source, token, loops, cells = match.groups()
            rows.append((int(index), source, token, None if loops == "-" else int(loops), cells.split()))
    return rows


def test_the_prompt_table_has_one_line_per_token_with_the_whole_budget(model_dir, capsys):
    assert main(["loops", "--model", str(model_dir), "--prompt", "héllo", "--n-loops", "3"]) == 0
    rows = table_rows(capsys.readouterr().out)
    tokens = MythosTokenizer()("héllo")["input_ids"]  # six bytes: é is two
    assert [row[0] for row in rows] == list(range(len(tokens))) == list(range(6))
    assert [row[2] for row in rows] == ["'h'", "'<0xC3>'", "'<0xA9>'", "'l'", "'l'", "'o'"]
    for _, source, _, loops, cells in rows:
        # no exit criterion: every position runs all three loops, each with a positive state change
        assert source == "prompt" and loops == 3 and len(cells) == 3 and all(float(c) > 0 for c in cells)


def test_generation_with_an_exit_criterion_and_a_heatmap(model_dir, tmp_path, capsys):
    png = tmp_path / "loops.png"
    argv = ["loops", "--model", str(model_dir), "--prompt", "abc", "--n-loops", "6", "--exit-criterion", "delta",
            "--exit-threshold", "0.3", "--max-new-tokens", "4", "--heatmap", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [row[1] for row in rows] == ["prompt"] * 3 + ["new"] * 4
    for _, _, _, loops, cells in rows[:-1]:
        assert 1 <= loops <= 6 and len(cells) == 6
        assert all(c != "." for c in cells[:loops]) and all(c == "." for c in cells[loops:])
    assert rows[-1][3] is None and set(rows[-1][4]) == {"."}  # no forward read the last generated token
    assert any(loops < 6 for _, _, _, loops, _ in rows[:-1]), "the threshold is loose enough to exit early"
    assert f"heatmap written to {png}" in out
    assert png.read_bytes()[:8] == PNG_SIGNATURE and list(tmp_path.iterdir()) == [png]
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert height > 100 and width > 100


def test_exit_scope_row_stops_the_prompt_together_and_leaves_the_folder_as_it_was(model_dir, capsys):
    config = (model_dir / "config.json").read_text()
    argv = ["loops", "--model", str(model_dir), "--prompt", "abcdef", "--n-loops", "6", "--exit-criterion", "delta",
            "--exit-threshold", "0.3"]
    assert main(argv) == 0
    alone = [row[3] for row in table_rows(capsys.readouterr().out)]
    assert main(argv + ["--exit-scope", "row"]) == 0
    together = [row[3] for row in table_rows(capsys.readouterr().out)]
    assert len(set(alone)) > 1, "on their own the positions stop at different loops"
    assert len(set(together)) == 1 and together != alone
    assert (model_dir / "config.json").read_text() == config


def test_the_console_script_runs_the_command(model_dir):
    result = mythos("loops", "--model", str(model_dir), "--prompt", "hi there", "--n-loops", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = table_rows(result.stdout)
    assert len(rows) == len("hi there") and all(row[3] == 2 for row in rows)


def assert_one_line_error(result, *fragments, heavy=False):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mythos loops: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if not heavy:
        assert "heavy modules: []" in result.stdout  # refused before torch was imported


@pytest.mark.parametrize("flags, fragments", [
    (["--exit-threshold", "0.1"], ["--exit-threshold 0.1 needs --exit-criterion"]),
    (["--exit-criterion", "delta"], ["--exit-criterion delta needs --exit-threshold"]),
    (["--exit-criterion", "kl", "--exit-threshold", "-1"], ["--exit-threshold", "-1.0", "> 0"]),
    (["--exit-criterion", "delta", "--exit-threshold", "0"], ["--exit-threshold", "got 0.0"]),
    (["--exit-criterion", "act", "--exit-threshold", "1.5"], ["at most 1", "act", "1.5"]),
    (["--exit-criterion", "kl", "--exit-threshold", "nan"], ["--exit-threshold", "nan"]),
    (["--n-loops", "0"], ["--n-loops", "positive", "got 0"]),
    (["--max-new-tokens", "-2"], ["--max-new-tokens", "got -2"]),
    (["--heatmap", "out.jpg"], ["--heatmap", "out.jpg", ".png"]),
    (["--heatmap", "/nowhere/out.png"], ["--heatmap", "'/nowhere' is not an existing folder"]),
    (["--exit-scope", "row"], ["--exit-scope row needs --exit-criterion delta or kl"]),
    (["--exit-scope", "row", "--exit-criterion", "act", "--exit-threshold", "0.5"], ["--exit-scope", "act"]),
])
def test_bad_flags_are_refused_in_one_line_before_loading_anything(model_dir, flags, fragments):
    assert_one_line_error(mythos("loops", "--model", str(model_dir), "--prompt", "x", *flags), *fragments)


def test_a_folder_without_a_model_or_tokenizer_is_refused(model_dir, tmp_path):
    assert_one_line_error(mythos("loops", "--model", str(tmp_path / "nowhere"), "--prompt", "x"), "--model",
                          "nowhere", "config.json")
    make_model("gqa").save_pretrained(tmp_path / "no_tokenizer")
    assert_one_line_error(mythos("loops", "--model", str(tmp_path / "no_tokenizer"), "--prompt", "x"), "--model",
                          "no tokenizer", "save_pretrained")


def test_heatmap_without_matplotlib_names_the_install(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what find_spec sees when it is not installed
    code = main(["loops", "--model", str(model_dir), "--prompt", "x", "--heatmap", str(tmp_path / "a.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "pip install matplotlib" in err and "--heatmap" in err
    assert not (tmp_path / "a.png").exists()


def test_the_models_own_refusals_are_one_line_too(model_dir, capsys):
    assert main(["loops", "--model", str(model_dir), "--prompt", "x", "--n-loops", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mythos loops: error: ") and err.count("\n") == 0 and "n_loops" in err and "1000" in err


def test_an_existing_heatmap_file_is_kept_unless_overwrite(model_dir, tmp_path, capsys):
    png = tmp_path / "mine.png"
    png.write_bytes(b"my picture")
    argv = ["loops", "--model", str(model_dir), "--prompt", "ab", "--n-loops", "2", "--heatmap", str(png)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mythos loops: error: --heatmap {str(png)!r} already exists; name a new file, or pass --overwrite " \
                  f"to replace it"
    assert png.read_bytes() == b"my picture"
    assert main([*argv, "--overwrite"]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("config_text, fragment", [
    ('{"model_type": "llama"}', "holds a llama checkpoint, not a Mythos one"),
    ("{not json", "config.json is not readable JSON"),
    ("{}", "holds a model without a model_type checkpoint"),
])
def test_a_folder_of_another_model_or_a_broken_config_is_refused(tmp_path, config_text, fragment):
    (tmp_path / "config.json").write_text(config_text)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert_one_line_error(mythos("loops", "--model", str(tmp_path), "--prompt", "x"), "--model", fragment)


def test_a_folder_without_weights_is_refused(model_dir, tmp_path):
    for name in ("config.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    assert_one_line_error(mythos("loops", "--model", str(tmp_path), "--prompt", "x"), "--model", "has no weights")
