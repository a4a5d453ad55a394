"""Low-rank adapters: LoRA and its variants on any ``nn.Module``, with merge/unmerge and PEFT-format files.

Each method is one file that registers its adapter module and config in :data:`ADAPTERS`; a method with
training-time state (a chain of links, a sampled rank, a gate's proximal step) gives callbacks through
:func:`adapter_callbacks`, which edgetune's loop, :class:`edgetune.integrations.MethodStepper` and the Hugging
Face ``Trainer`` callback all drive.
"""

from __future__ import annotations

from edgetune.adapters import (  # noqa: F401  (registration: each method file registers itself)
    asymmetric,
    chain,
    dora,
    dylora,
    lora,
    lora_fa,
    rac_lora,
    sora,
)
from edgetune.adapters.asymmetric import AsymmetricConfig
from edgetune.adapters.callbacks import adapter_callbacks
from edgetune.adapters.chain import ChainConfig
from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.dora import DoraConfig
from edgetune.adapters.dylora import DyLoraConfig, set_adapter_rank_, truncate_adapter_
from edgetune.adapters.io import load_adapter_, save_adapter
from edgetune.adapters.layer import AdapterLayer, LayerInfo
from edgetune.adapters.lora import LoraAdapter, LoraConfig
from edgetune.adapters.lora_fa import LoraFaConfig
from edgetune.adapters.model import (
    adapter_configs,
    adapter_layers,
    adapter_names,
    adapter_report,
    adapter_state_dict,
    add_adapter_,
    disable_adapters,
    load_adapter_state_,
    merge_,
    remove_adapters_,
    set_active_adapters_,
    unmerge_,
)
from edgetune.adapters.rac_lora import RacLoraConfig
from edgetune.adapters.sora import SoraConfig, prune_sora_

__all__ = ["ADAPTERS", "AdapterConfig", "AdapterLayer", "AsymmetricConfig", "ChainConfig", "DoraConfig", "DyLoraConfig",
           "LayerInfo", "LoraAdapter", "LoraConfig", "LoraFaConfig", "RacLoraConfig", "SoraConfig", "adapter_callbacks",
           "adapter_configs", "adapter_layers", "adapter_names", "adapter_report", "adapter_state_dict",
           "add_adapter_", "disable_adapters", "load_adapter_", "load_adapter_state_", "merge_", "prune_sora_",
           "remove_adapters_", "save_adapter", "set_active_adapters_", "set_adapter_rank_", "truncate_adapter_",
           "unmerge_"]
