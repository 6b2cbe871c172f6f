"""ECG backbones (NN_default, L-BiTMix) with LoRA adapters, checkpoint loading, and batch augmentation."""
from .augment import KEPT_LEADS, cutmix, mask_leads
from .backbone import (CONFIGS, MODEL_CONFIGS, NN_default, adapter_state_dict, build_model, is_lora_trainable,
                       load_adapter_state, load_pretrained, mark_only_lora_as_trainable, mark_trainable)
from .heads import HEAD_NAMES, TwoHeadNet, belongs_to_heads, draw_heads, heads_state
from .lbitmix import LBITMIX_CONFIGS, LBiTMix, LBiTMixConfig, receptive_field
from .lora import LoRAConv2d, LoRALinear, LoRAQKV

__all__ = ["CONFIGS", "MODEL_CONFIGS", "LBITMIX_CONFIGS", "NN_default", "LBiTMix", "LBiTMixConfig", "TwoHeadNet",
           "HEAD_NAMES", "draw_heads", "heads_state", "build_model", "load_pretrained", "mark_only_lora_as_trainable", "mark_trainable", "is_lora_trainable",
           "belongs_to_heads", "adapter_state_dict", "load_adapter_state", "receptive_field", "cutmix", "mask_leads",
           "KEPT_LEADS", "LoRAConv2d", "LoRALinear", "LoRAQKV"]
