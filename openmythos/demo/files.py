"""The demo's writes: result files and the model folder are replaced whole, so a crash never leaves half of one.

Standard library only: ``openmythos.demo`` re-exports these without importing torch.
"""

import os
import shutil
from pathlib import Path

# written into --output-dir by every run: a folder holding it is the demo's own, which a later run may write into
MARKER = ".mythos-demo"


def output_dir_problem(folder: str, overwrite: bool) -> str | None:
    """Why the demo may not write into ``folder``, or None. A folder that holds files and no demo marker is the
    user's: the demo would replace its same-named files, so it needs ``--overwrite``."""
    path = Path(folder) if folder else Path(".")
    if path.exists() and not path.is_dir():
        return f"--output-dir {folder!r} is a file, not a folder"
    if path.is_dir():
        # a subfolder another demo run marked (demo_output/text inside demo_output) is the demo's too
        entries = sorted(entry.name for entry in path.iterdir() if not (entry / MARKER).is_file())
        if entries and not (path / MARKER).is_file() and not overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            return (f"--output-dir {folder!r} holds files ({shown}) and no {MARKER} marker, which every demo run "
                    f"leaves in its folder (since 2026-12-07); pick a new or empty folder, or pass --overwrite to let "
                    f"the demo replace the files of its own names there")
    parent = path if path.is_dir() else next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"--output-dir {folder!r} cannot be written: {str(parent)!r} is not a writable folder"
    return None


def claim_output_dir(folder: Path) -> None:
    """Create ``folder`` if needed and mark it as the demo's (see ``output_dir_problem``). Folders it creates above
    ``folder`` hold nothing but it, so they need no marker."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("Written by `mythos demo`; a later run may replace the demo's files here.\n")


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename: a crash
    leaves the old file whole (and at most a stale temporary, overwritten next time), never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def _swap_names(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")


def _files_under(folder: Path) -> set[str]:
    return {str(f.relative_to(folder)) for f in folder.rglob("*") if not f.is_dir()}


def _retire(old: Path, folder: Path) -> Path | None:
    """Delete the replaced folder if every file in it is one the new save wrote again; otherwise keep it, renamed
    to a free ``<name>.previous[-i]``, since the extra files are not the demo's to delete. Returns that name."""
    if _files_under(old) <= _files_under(folder):
        shutil.rmtree(old)
        return None
    kept, i = folder.with_name(f"{folder.name}.previous"), 1
    while kept.exists():
        kept, i = folder.with_name(f"{folder.name}.previous-{i}"), i + 1
    os.replace(old, kept)
    return kept


def recover_folder(folder: Path) -> Path | None:
    """Finish a swap that a crash interrupted (see ``save_folder_atomically``): put the old folder back if the new
    one never arrived, otherwise retire it. Returns where a folder with foreign files was kept, if anywhere."""
    tmp, old = _swap_names(folder)
    if tmp.exists():  # a save that never finished: the demo's own partial output
        shutil.rmtree(tmp)
    if not old.exists():
        return None
    if not folder.exists():
        os.replace(old, folder)
        return None
    return _retire(old, folder)


def save_folder_atomically(folder: Path, save) -> Path | None:
    """``save(tmp)`` fills a fresh folder beside ``folder``, which then replaces it: rename the current one aside,
    rename the new one in, retire the old one. A crash at any point leaves a whole folder (old or new) that
    ``recover_folder`` (run first here, and by the next run) puts back in place. Returns where an old folder holding
    files the demo did not write was kept, if anywhere."""
    kept = recover_folder(folder)
    tmp, old = _swap_names(folder)
    try:
        save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only our half-written copy; the current folder is untouched
        raise
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    return _retire(old, folder) if old.exists() else kept
