"""OpenMythos: a Recurrent-Depth (looped) Transformer for Hugging Face Transformers.

Importing this package registers ``model_type="mythos"`` with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_mythos import (
    PRESETS,
    MythosConfig,
    mythos_1b,
    mythos_1t,
    mythos_3b,
    mythos_10b,
    mythos_50b,
    mythos_100b,
    mythos_500b,
    mythos_tiny,
)
from .modeling_mythos import MythosForCausalLM, MythosModel, MythosPreTrainedModel
from .parameters import count_parameters
from .peft_support import expert_lora_config, register_peft_defaults
from .tokenization_mythos import MythosTokenizer

__version__ = "0.1.0"


def _register():
    # Registering twice raises in transformers; a re-import (e.g. importlib.reload) must stay harmless.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MythosConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(MythosConfig.model_type, MythosConfig)
        AutoModel.register(MythosConfig, MythosModel)
        AutoModelForCausalLM.register(MythosConfig, MythosForCausalLM)
        AutoTokenizer.register(MythosConfig, tokenizer_class=MythosTokenizer)


_register()
register_peft_defaults()  # default LoRA targets for model_type "mythos"; a no-op without peft

__all__ = [
    "MythosConfig",
    "MythosPreTrainedModel",
    "MythosModel",
    "MythosForCausalLM",
    "MythosTokenizer",
    "count_parameters",
    "register_peft_defaults",
    "expert_lora_config",
    "PRESETS",
    "mythos_tiny",
    "mythos_1b",
    "mythos_3b",
    "mythos_10b",
    "mythos_50b",
    "mythos_100b",
    "mythos_500b",
    "mythos_1t",
]
