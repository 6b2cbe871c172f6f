"""ECG backbone with LoRA adapters, checkpoint loading, and batch augmentation."""
from .augment import cutmix, mask_leads
from .backbone import (CONFIGS, NN_default, adapter_state_dict, build_model, is_lora_trainable,
                       load_adapter_state, load_pretrained, mark_only_lora_as_trainable)
from .lora import LoRAConv2d, LoRALinear, LoRAQKV

__all__ = ["CONFIGS", "NN_default", "build_model", "load_pretrained", "mark_only_lora_as_trainable",
           "is_lora_trainable", "adapter_state_dict", "load_adapter_state", "cutmix", "mask_leads",
           "LoRAConv2d", "LoRALinear", "LoRAQKV"]
