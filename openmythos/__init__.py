"""OpenMythos: a Recurrent-Depth (looped) Transformer for Hugging Face Transformers.

Importing this package registers ``model_type="mythos"`` with AutoConfig, AutoModel and AutoModelForCausalLM.

Why the imports below sit in ``_load()``: the ``mythos`` console script runs ``from openmythos.cli import main``,
and Python imports this package before ``openmythos.cli``. Registration needs the classes, the classes need torch
and transformers, and those take seconds to import, which ``mythos --help`` and every refused command must not pay.
Lazy attributes alone cannot fix that, because a plain ``import openmythos`` must register at once. So this package
loads eagerly (as always) unless the process is the ``mythos`` command itself (``_is_mythos_command``); there it waits
until ``openmythos.cli`` has parsed and checked the arguments and calls ``_load()`` for a command that does real
work. Any attribute read before that (``openmythos.MythosConfig``) loads everything first (PEP 562 ``__getattr__``).
"""

import sys
from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "PRESETS": "configuration_mythos",
    "MythosConfig": "configuration_mythos",
    "mythos_tiny": "configuration_mythos",
    "mythos_1b": "configuration_mythos",
    "mythos_3b": "configuration_mythos",
    "mythos_10b": "configuration_mythos",
    "mythos_50b": "configuration_mythos",
    "mythos_100b": "configuration_mythos",
    "mythos_500b": "configuration_mythos",
    "mythos_1t": "configuration_mythos",
    "MythosPreTrainedModel": "modeling_mythos",
    "MythosModel": "modeling_mythos",
    "MythosForCausalLM": "modeling_mythos",
    "MythosLoopRecorder": "modeling_mythos",
    "MythosLoopStats": "modeling_mythos",
    "count_parameters": "parameters",
    "expert_lora_config": "peft_support",
    "register_peft_defaults": "peft_support",
    "MythosTokenizer": "tokenization_mythos",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time _load() binds these names
    from .configuration_mythos import (PRESETS, MythosConfig, mythos_1b, mythos_1t, mythos_3b, mythos_10b,
                                       mythos_50b, mythos_100b, mythos_500b, mythos_tiny)
    from .modeling_mythos import (MythosForCausalLM, MythosLoopRecorder, MythosLoopStats, MythosModel,
                                  MythosPreTrainedModel)
    from .parameters import count_parameters
    from .peft_support import expert_lora_config, register_peft_defaults
    from .tokenization_mythos import MythosTokenizer


def _register():
    # Registering twice raises in transformers; a re-import (e.g. importlib.reload) must stay harmless.
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .configuration_mythos import MythosConfig
    from .modeling_mythos import MythosForCausalLM, MythosModel
    from .tokenization_mythos import MythosTokenizer

    if MythosConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(MythosConfig.model_type, MythosConfig)
        AutoModel.register(MythosConfig, MythosModel)
        AutoModelForCausalLM.register(MythosConfig, MythosForCausalLM)
        AutoTokenizer.register(MythosConfig, tokenizer_class=MythosTokenizer)


def _load():
    """Import the model stack, bind the public names and register the Auto classes; safe to call again."""
    import importlib

    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    _register()
    globals()["register_peft_defaults"]()  # default LoRA targets for model_type "mythos"; a no-op without peft


def _is_mythos_command() -> bool:
    """Whether this process is the ``mythos`` console script (``mythos``, ``mythos.exe``, ``mythos-script.py``)."""
    argv = getattr(sys, "argv", None) or [""]
    return Path(argv[0]).name in ("mythos", "mythos.exe", "mythos-script.py", "mythos-script.pyw")


def __getattr__(name):
    # reached only for names not bound yet, i.e. in the `mythos` command before _load() ran
    if name in _EXPORTS:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _is_mythos_command():
    _load()

__all__ = list(_EXPORTS)
