"""PEFT (LoRA) defaults for Mythos models.

PEFT picks LoRA targets from a table keyed by ``config.model_type``; "mythos" is not in it, so a bare
``LoraConfig(task_type="CAUSAL_LM")`` would fail with "Please specify `target_modules`". ``register_peft_defaults``
adds the entry. The defaults are the attention projections (GQA or MLA) and the dense SwiGLU projections (prelude,
coda and the recurrent block's shared experts). The router and the embeddings / ``lm_head`` are never targeted.

The routed experts are 3-D ``nn.Parameter`` stacks (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) on
``MythosExperts``, not ``nn.Linear`` modules, so ``target_modules`` cannot reach them. PEFT reaches them through
``target_parameters``; ``expert_lora_config`` builds such a config.

The recurrent block is one set of weights applied ``n_loops`` times, so an adapter on it is shared by every loop
iteration, just like the weights it adapts.

peft is an optional dependency: this module imports it only inside the functions.
"""

import dataclasses

# Attention: GQA uses q/k/v/o_proj; MLA uses q_a/q_b_proj (or q_proj when q_lora_rank == 0), kv_a_proj_with_mqa,
# kv_b_proj and o_proj. FFN: the dense SwiGLU of the prelude, the coda and the MoE's shared experts. PEFT matches a
# list entry against the last component(s) of a module name, so "down_proj" hits the dense ``nn.Linear`` modules only:
# the experts' ``down_proj`` is a parameter, not a module.
DEFAULT_LORA_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# PEFT matches a target parameter by full name or by a ".<entry>" suffix of "<module path>.<parameter name>". The
# "experts." prefix ties both entries to the routed experts: the dense "mlp.down_proj.weight" can never match.
EXPERT_LORA_TARGET_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")

MODEL_TYPE = "mythos"


def register_peft_defaults() -> bool:
    """Teach PEFT the default LoRA targets for ``model_type="mythos"``.

    Returns True when PEFT knows the entry afterwards, False when peft is not installed (nothing is done then).
    Calling it again is harmless, and an entry that is already there (for example one you set yourself) is kept.
    """
    try:
        from peft.tuners.lora import LoraModel
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return False
    # LoraModel (and the mixed-adapter model) read this very dict; the class attribute is checked too in case a peft
    # release ever stops sharing it.
    for mapping in (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, LoraModel.target_module_mapping):
        mapping.setdefault(MODEL_TYPE, list(DEFAULT_LORA_TARGET_MODULES))
    return True


def expert_lora_config(**lora_kwargs):
    """A ``peft.LoraConfig`` that adapts the routed experts as well as the default attention and FFN projections.

    Every keyword goes to ``LoraConfig``. Defaults: ``task_type="CAUSAL_LM"``,
    ``target_modules=DEFAULT_LORA_TARGET_MODULES`` and ``target_parameters=EXPERT_LORA_TARGET_PARAMETERS``. Pass
    ``target_modules=[]`` to adapt the experts only.

    Each expert gets its own rank-``r`` update (PEFT's ``ParamWrapper``), so the expert adapter holds
    ``r * n_experts`` rows per parameter. PEFT cannot apply dropout to a parameter-targeted adapter, and one config
    covers both kinds of target here, so ``lora_dropout`` must stay 0.
    """
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("expert_lora_config needs peft: pip install 'openmythos[train]'") from error
    if "target_parameters" not in {field.name for field in dataclasses.fields(LoraConfig)}:
        import peft

        raise ImportError(f"expert_lora_config needs a peft with LoraConfig(target_parameters=...); installed peft "
                          f"{peft.__version__} has none. Upgrade peft.")
    dropout = lora_kwargs.get("lora_dropout", 0.0)
    if dropout:
        raise ValueError(f"expert_lora_config got lora_dropout={dropout!r}, but PEFT cannot apply dropout to the "
                         f"expert parameters (target_parameters). Use lora_dropout=0.0, or a plain LoraConfig without "
                         f"experts if you need dropout.")
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    lora_kwargs.setdefault("target_modules", list(DEFAULT_LORA_TARGET_MODULES))
    lora_kwargs.setdefault("target_parameters", list(EXPERT_LORA_TARGET_PARAMETERS))
    return LoraConfig(**lora_kwargs)


__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "EXPERT_LORA_TARGET_PARAMETERS",
    "register_peft_defaults",
    "expert_lora_config",
]
