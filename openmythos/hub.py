"""Hub-ready export: a folder that loads with ``trust_remote_code=True`` where ``openmythos`` is not installed.

``export(model, folder)`` writes safetensors weights, config.json with ``auto_map``, the self-contained
configuration/modeling (and tokenizer) modules, the tokenizer files and the filled model card as README.md, plus
``export_manifest.json``, the list of those files with their sizes and sha256. ``push(folder, repo_id)`` uploads
exactly the files in that manifest, never the rest of the folder; ``dry_run=True`` only lists them.

Export loses nothing: it refuses a folder that is, contains or lies inside the checkpoint it reads, refuses hidden
entries (``.git``, ``.env``: it did not write them and will neither delete nor publish them), builds the new folder
beside the target and swaps it in only when complete, so a failed export leaves the previous folder as it was.

This module imports torch and transformers only inside the functions that need them, so that ``mythos`` can check
its arguments (``check_export_target``, ``plan_upload``) without paying for those imports.
"""

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

CARD_TEMPLATE = Path(__file__).parent / "templates" / "hub_card.md"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# The only files an export may contain: weights as safetensors (never pickle), JSON configs, code, text.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".py", ".md", ".txt", ".model", ".jinja")
# What export wrote (names, sizes, sha256); push uploads exactly these files. It stays local: it is not uploaded.
MANIFEST = "export_manifest.json"
MANIFEST_FORMAT = 1
# Our scratch folders beside the target: ".<target>.mythos-export-new-<hex>" (being built) and
# ".<target>.mythos-export-old-<hex>" (the previous export, moved aside during the swap).
_SCRATCH = ".{name}.mythos-export-{kind}-"


def validate_repo_id(repo_id: str, argument: str = "repo_id") -> str:
    """``repo_id`` if it is a valid Hub repo id (``name`` or ``namespace/name``), else a ValueError naming it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    if not isinstance(repo_id, str):
        raise TypeError(f"{argument} must be a str like 'your-name/your-model', got {type(repo_id).__name__}")
    try:
        hub_validate(repo_id)
    except HFValidationError:
        raise ValueError(f"{argument}={repo_id!r} is not a valid Hub repo id: use 'name' or 'namespace/name' with "
                         f"letters, digits, '-', '_' and '.' (at most 96 characters each, no '--' or '..', not "
                         f"starting or ending with '-' or '.')") from None
    return repo_id


def _yaml_list(key: str, values: list[str]) -> str:
    """``key:`` and one double-quoted YAML string per value: newlines and YAML syntax stay inside the strings."""
    import yaml

    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{key} must be a list of str, got {values!r}")
    if not all(v.strip() for v in values):
        raise ValueError(f"{key} must be a list of non-empty names (Hub dataset ids), got {list(values)!r}")
    return yaml.safe_dump({key: list(values)}, allow_unicode=True, default_style='"', width=float("inf"))


def _one_line(argument: str, value: str) -> str:
    if any(ch in value for ch in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
        raise ValueError(f"{argument}={value!r} must be a single line (it is a heading in the model card)")
    return value


def render_card(config, *, repo_id: str = "your-name/your-mythos-model", model_name: str | None = None,
                training: str | None = None, datasets: list[str] | None = None, spectral_radius: float | None = None,
                template: str | None = None) -> str:
    """The model card filled from ``config``; raises if any placeholder stays unfilled.

    Everything in the YAML front matter is escaped (``datasets``), ``repo_id`` must be a valid Hub repo id and
    ``model_name`` a single line, so no argument can add metadata keys or end the front matter.
    """
    from .parameters import count_parameters, format_count

    validate_repo_id(repo_id)
    model_name = _one_line("model_name", model_name or repo_id.split("/")[-1])
    counts = count_parameters(config)
    fields = ["vocab_size", "dim", "n_heads", "n_kv_heads", "max_seq_len", "max_loop_iters", "prelude_layers",
              "coda_layers", "attn_type"]
    fields += (["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"]
               if config.attn_type == "mla" else [])
    fields += ["n_experts", "n_shared_experts", "n_experts_per_tok", "expert_dim", "lora_rank", "use_act",
               "rope_theta", "tie_word_embeddings"]
    attention = (f"multi-head latent attention (MLA, {config.n_heads} heads, a {config.kv_lora_rank}-wide cached "
                 f"latent plus one shared {config.qk_rope_head_dim}-wide rope key per token)"
                 if config.attn_type == "mla" else
                 f"grouped-query attention (GQA, {config.n_heads} query heads, {config.n_kv_heads} key/value heads)")
    if config.loop_sampling != "fixed":
        mean = config.mean_train_loops or config.max_loop_iters
        loops_advice = (f"This model was trained with a random loop count per step (mean {mean}), so counts around "
                        f"and somewhat above that mean are in its training range; far beyond it, measure first.")
    else:
        loops_advice = ("This model was trained with a fixed loop count; other values, especially larger ones, "
                        "may degrade quality: measure before relying on them.")
    values = {
        "model_name": model_name,
        "repo_id": repo_id,
        "datasets_yaml": _yaml_list("datasets", datasets) if datasets else "",
        "prelude_layers": config.prelude_layers,
        "coda_layers": config.coda_layers,
        "attention": attention,
        "n_experts": config.n_experts,
        "n_experts_per_tok": config.n_experts_per_tok,
        "n_shared_experts": config.n_shared_experts,
        "lora_rank": config.lora_rank,
        "spectral_radius": f"{spectral_radius:.4f}" if spectral_radius is not None else "below 1 by construction",
        "config_table": "\n".join(f"| {name} | {getattr(config, name)} |" for name in fields),
        "total_params": f"{counts.total:,} ({format_count(counts.total)})",
        "active_params": f"{counts.active:,} ({format_count(counts.active)})",
        "training": training or "No training details were recorded for this checkpoint.",
        "default_loops": config.default_n_loops,
        "loops_advice": loops_advice,
        "format_version": config.mythos_format_version,
    }
    text = template if template is not None else CARD_TEMPLATE.read_text()
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in values})
    if missing:
        raise ValueError(f"the card template has placeholders with no value: {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


# ---------------------------------------------------------------------------------------------------------- export

def _relation(target: Path, source: Path) -> str | None:
    """How the resolved ``target`` overlaps the resolved ``source`` ("is", "contains", "lies inside"), or None."""
    if target == source:
        return "is"
    if target in source.parents:
        return "contains"
    if source in target.parents:
        return "lies inside"
    return None


def check_export_target(folder, *, sources=(), overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Refuse, before any work, an export into ``folder`` that could lose or leak something; returns ``folder``.

    Refused: an invalid ``repo_id``; a ``folder`` that is, contains or lies inside one of ``sources`` (the
    checkpoint being exported; symlinks resolved); a ``folder`` that is a file; hidden entries in ``folder`` (even
    with ``overwrite``, since export did not write them); any other entry unless ``overwrite``. Writes nothing.
    """
    folder = Path(folder)
    if repo_id is not None:
        validate_repo_id(repo_id)
    target = folder.resolve()
    for source in sources:
        relation = _relation(target, Path(source).resolve())
        if relation:
            raise ValueError(f"export folder {str(folder)!r} {relation} the source checkpoint {str(source)!r} "
                             f"(--from / source=): exporting there could delete the checkpoint, its siblings or "
                             f"their optimizer state; choose an export folder outside {str(source)!r}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"export folder {str(folder)!r} is a file; pass a new or empty folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hidden = _hidden_entries(folder) if entries else []
    if hidden:
        raise FileExistsError(f"export folder {str(folder)!r} holds hidden entries {hidden} that export did not "
                              f"write; export never deletes or publishes them, even with overwrite=True (CLI: "
                              f"--overwrite): move them out of that folder, or export to a new folder")
    if entries and not overwrite:
        raise FileExistsError(f"export folder {str(folder)!r} is not empty ({len(entries)} entries, e.g. "
                              f"{entries[0]}); pass overwrite=True (CLI: --overwrite) to replace its contents, "
                              f"or use a new folder")
    return folder


def _hidden_entries(folder: Path) -> list[str]:
    """The outermost hidden files and folders at any depth under ``folder`` (overwrite would delete nested ones)."""
    hidden = []
    for root, dirs, files in os.walk(folder):
        relative = Path(root).relative_to(folder)
        hidden += [(relative / name).as_posix() for name in sorted(dirs + files) if name.startswith(".")]
        dirs[:] = [name for name in dirs if not name.startswith(".")]
    return sorted(hidden)


def _scratch(folder: Path, kind: str) -> list[Path]:
    prefix = _SCRATCH.format(name=folder.name, kind=kind)
    return sorted(folder.parent.glob(glob.escape(prefix) + "*")) if folder.parent.is_dir() else []


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _recover(folder: Path):
    """Finish or undo an earlier export of ``folder`` that crashed, from the scratch folders it left behind.

    A half-built new folder is discarded. A previous export moved aside is restored if ``folder`` is missing (the
    crash came between the two renames of the swap) and discarded otherwise (the swap had completed).
    """
    for staging in _scratch(folder, "new"):
        _remove(staging)
    for aside in sorted(_scratch(folder, "old"), key=lambda p: p.lstat().st_mtime, reverse=True):  # newest first
        if not folder.exists() and not folder.is_symlink():
            os.replace(aside, folder)
        else:
            _remove(aside)


def _swap_in(staging: Path, folder: Path):
    """Put the complete ``staging`` folder at ``folder``: rename the old one aside, rename, then delete the old."""
    if not folder.exists() and not folder.is_symlink():
        os.replace(staging, folder)
        return
    aside = folder.parent / (_SCRATCH.format(name=folder.name, kind="old") + secrets.token_hex(4))
    os.replace(folder, aside)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(aside, folder)
        raise
    _remove(aside)


def _add_auto_map(path: Path, entries: dict):
    data = json.loads(path.read_text())
    data["auto_map"] = {**data.get("auto_map", {}), **entries}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_export(model, folder: Path, tokenizer, card: dict) -> list[str]:
    """Write the export into the (new, empty) ``folder``; returns the relative names of the files written."""
    from .tokenization_mythos import MythosTokenizer

    model.save_pretrained(folder, safe_serialization=True)
    _add_auto_map(folder / "config.json", {"AutoConfig": "configuration_mythos.MythosConfig",
                                           "AutoModel": "modeling_mythos.MythosModel",
                                           "AutoModelForCausalLM": "modeling_mythos.MythosForCausalLM"})
    modules = ["configuration_mythos.py", "modeling_mythos.py"]
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        if isinstance(tokenizer, MythosTokenizer):
            _add_auto_map(folder / "tokenizer_config.json",
                          {"AutoTokenizer": ["tokenization_mythos.MythosTokenizer", None]})
            modules.append("tokenization_mythos.py")
    for module in modules:
        shutil.copy(Path(__file__).parent / module, folder / module)
    (folder / "README.md").write_text(render_card(model.config, spectral_radius=model.spectral_radius(), **card))
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    unexpected = [n for n in names if not n.endswith(ALLOWED_SUFFIXES) or n.startswith(".") or "/." in n]
    if unexpected:
        raise RuntimeError(f"export wrote files that are not safetensors/json/code/text: {unexpected}")
    return names


def _write_manifest(folder: Path, names: list[str]):
    files = [{"name": n, "size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names]
    (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2) + "\n")


def export(model, folder, tokenizer=None, *, source=None, repo_id: str | None = None, training: str | None = None,
           datasets: list[str] | None = None, overwrite: bool = False) -> list[Path]:
    """Write everything a loader needs without ``openmythos`` installed; returns the files written.

    The configuration and modeling (and tokenizer) modules are copied next to the weights (they import only torch,
    transformers and each other), and ``auto_map`` in config.json (and tokenizer_config.json) points the Auto classes
    at them. Only the written files change: no class is registered process-wide (``register_for_auto_class``), so
    later ``save_pretrained`` calls stay plain.

    ``source`` is the checkpoint folder the model came from (the folder ``from_pretrained`` read is checked too):
    ``folder`` may not be, contain or lie inside it. ``folder`` must be new or empty, or ``overwrite=True`` replaces
    its contents; hidden entries are always refused (see ``check_export_target``). The export is built in a scratch
    folder beside ``folder`` and swapped in when complete: if anything fails, the previous folder is untouched.
    """
    folder = Path(folder)
    sources = [source] if source is not None else []
    loaded_from = getattr(model, "name_or_path", "") or ""
    if loaded_from and Path(loaded_from).is_dir():
        sources.append(loaded_from)
    check_export_target(folder, sources=sources, overwrite=overwrite, repo_id=repo_id)
    card = {"repo_id": repo_id or _placeholder_repo_id(folder), "training": training, "datasets": datasets}
    _check_card_inputs(card)  # bad card inputs must fail before the weights are written
    folder.parent.mkdir(parents=True, exist_ok=True)
    _recover(folder)
    check_export_target(folder, sources=sources, overwrite=overwrite)  # the recovery may have restored a folder
    staging = folder.parent / (_SCRATCH.format(name=folder.name, kind="new") + secrets.token_hex(4))
    staging.mkdir()
    try:
        if folder.is_dir():
            shutil.copymode(folder, staging)
        names = _write_export(model, staging, tokenizer, card)
        _write_manifest(staging, names)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [folder / name for name in names]


def _placeholder_repo_id(folder: Path) -> str:
    """``your-name/<folder name>`` with the characters a repo id may not hold replaced, for the card's examples."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.resolve().name).strip("-.")
    name = re.sub(r"[-.]{2,}", "-", name)[:96].strip("-.") or "your-mythos-model"
    return f"your-name/{name}"


def _check_card_inputs(card: dict):
    if card["datasets"]:
        _yaml_list("datasets", card["datasets"])
    if card["training"] is not None and not isinstance(card["training"], str):
        raise TypeError(f"training must be a str (the card's training notes), got {type(card['training']).__name__}")


# ------------------------------------------------------------------------------------------------------------ push

def _manifest_names(folder: Path) -> list[dict]:
    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not an export folder (no {MANIFEST}); run export() "
                                f"(CLI: mythos export) first: push uploads only the files export wrote")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); export again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} has format {found!r}, this version reads {MANIFEST_FORMAT}; export again")
    files = manifest.get("files")
    if not isinstance(files, list) or not files or not all(
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str) for entry in files):
        raise ValueError(f"{path} must list the exported files, each with a name, size and sha256; export again")
    for entry in manifest["files"]:
        name = entry["name"]
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or any(p.startswith(".") for p in parts) \
                or not name.endswith(ALLOWED_SUFFIXES):
            raise ValueError(f"{path} lists {name!r}, which export never writes; export again")
    return manifest["files"]


def _left_out(folder: Path, uploaded: set[str], prefix: str = "") -> list[str]:
    """Entries under ``folder`` that are not uploaded; a folder with nothing uploaded in it counts once, as ``dir/``."""
    out = []
    for entry in sorted(folder.iterdir()):
        name = prefix + entry.name
        if entry.is_dir() and not entry.is_symlink():
            if any(u.startswith(name + "/") for u in uploaded):
                out += _left_out(entry, uploaded, name + "/")
            else:
                out.append(name + "/")
        elif name not in uploaded and name != MANIFEST:
            out.append(name)
    return out


def plan_upload(folder) -> tuple[list[str], list[str]]:
    """``(uploaded, left_out)``: the files ``push`` uploads (exactly those in the export manifest) and the rest.

    Refuses a folder with no manifest, and a listed file that is missing, a symlink, or changed since export.
    """
    folder = Path(folder)
    names = []
    for entry in _manifest_names(folder):
        path = folder / entry["name"]
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path} is listed in {MANIFEST} but is missing or not a regular file; export again")
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} changed since export (size or sha256 differ from {MANIFEST}); export again")
        names.append(entry["name"])
    return sorted(names), _left_out(folder, set(names))


def push(folder, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None,
         commit_message: str = "Upload OpenMythos model") -> list[str]:
    """Upload the files export wrote in ``folder`` to the Hub (creating the repo if needed); returns their names.

    Only the files in the export manifest go up, one ``CommitOperationAdd`` each; every other entry in the folder
    (``.env``, ``.git``, notes) stays local and is named in a UserWarning. With ``dry_run=True`` nothing is
    contacted and the same list is returned.
    """
    validate_repo_id(repo_id)
    names, left_out = plan_upload(folder)
    if left_out:
        warnings.warn(f"not uploaded (export did not write them): {left_out}", UserWarning, stacklevel=2)
    if dry_run:
        return names
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name)) for name in names]
    api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    return names


def __getattr__(name):
    # kept importable from here without importing transformers with this module
    if name == "MYTHOS_FORMAT_VERSION":
        from .configuration_mythos import MYTHOS_FORMAT_VERSION

        return MYTHOS_FORMAT_VERSION
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["render_card", "export", "push", "plan_upload", "check_export_target", "validate_repo_id", "MANIFEST"]
