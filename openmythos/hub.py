"""Hub-ready export: a folder that loads with ``trust_remote_code=True`` where ``openmythos`` is not installed.

``export(model, folder)`` writes safetensors weights, config.json with ``auto_map``, the self-contained
configuration/modeling (and tokenizer) modules, the tokenizer files and the filled model card as README.md.
``push(folder, repo_id)`` uploads that folder; ``dry_run=True`` only lists what would go up.
"""

import json
import re
import shutil
from pathlib import Path

from .configuration_mythos import MYTHOS_FORMAT_VERSION, MythosConfig
from .modeling_mythos import MythosForCausalLM
from .parameters import count_parameters, format_count

CARD_TEMPLATE = Path(__file__).parent / "templates" / "hub_card.md"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# The only files an export may contain: weights as safetensors (never pickle), JSON configs, code, text.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".py", ".md", ".txt", ".model", ".jinja")


def render_card(config: MythosConfig, *, repo_id: str = "your-name/your-mythos-model", model_name: str | None = None,
                training: str | None = None, datasets: list[str] | None = None, spectral_radius: float | None = None,
                template: str | None = None) -> str:
    """The model card filled from ``config``; raises if any placeholder stays unfilled."""
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
        "model_name": model_name or repo_id.split("/")[-1],
        "repo_id": repo_id,
        "datasets_yaml": "datasets:\n" + "".join(f"- {d}\n" for d in datasets) if datasets else "",
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
        "default_loops": config.max_loop_iters,
        "loops_advice": loops_advice,
        "format_version": config.mythos_format_version,
    }
    text = template if template is not None else CARD_TEMPLATE.read_text()
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in values})
    if missing:
        raise ValueError(f"the card template has placeholders with no value: {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def _add_auto_map(path: Path, entries: dict):
    data = json.loads(path.read_text())
    data["auto_map"] = {**data.get("auto_map", {}), **entries}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export(model: MythosForCausalLM, folder, tokenizer=None, *, repo_id: str | None = None, training: str | None = None,
           datasets: list[str] | None = None, overwrite: bool = False) -> list[Path]:
    """Write everything a loader needs without ``openmythos`` installed; returns the files written.

    The configuration and modeling (and tokenizer) modules are copied next to the weights (they import only torch,
    transformers and each other), and ``auto_map`` in config.json (and tokenizer_config.json) points the Auto classes
    at them. Only the written files change: no class is registered process-wide (``register_for_auto_class``), so
    later ``save_pretrained`` calls stay plain.
    ``folder`` must be empty or new: ``push`` uploads everything in it. With ``overwrite=True`` its previous contents
    are deleted first (hidden entries such as ``.git`` are kept), so that no stale file from an earlier export remains.
    """
    from .tokenization_mythos import MythosTokenizer

    folder = Path(folder)
    previous = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if previous and not overwrite:
        raise FileExistsError(f"export folder {folder} is not empty ({len(previous)} entries, e.g. "
                              f"{previous[0].name}); pass overwrite=True (CLI: --overwrite) to replace its contents, "
                              f"or use a new folder")
    for path in previous:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
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
    card = render_card(model.config, repo_id=repo_id or f"your-name/{folder.name}", training=training,
                       datasets=datasets, spectral_radius=model.spectral_radius())
    (folder / "README.md").write_text(card)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.relative_to(folder).parts[0].startswith("."))
    unexpected = [p.name for p in files if not p.name.endswith(ALLOWED_SUFFIXES)]
    if unexpected:
        raise RuntimeError(f"export wrote files that are not safetensors/json/code/text: {unexpected}")
    return files


def push(folder, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None,
         commit_message: str = "Upload OpenMythos model") -> list[str]:
    """Upload an exported folder to the Hub (creating the repo if needed); returns the uploaded file names.

    With ``dry_run=True`` nothing is contacted: the file names that would be uploaded are returned.
    """
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "README.md").exists():
        raise FileNotFoundError(f"{folder} is not an export folder (no config.json/README.md); run export() first")
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if dry_run:
        return names
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return names


__all__ = ["render_card", "export", "push", "MYTHOS_FORMAT_VERSION"]
