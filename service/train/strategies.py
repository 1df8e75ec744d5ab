"""Training strategies: full SFT and LoRA, both driving TRL's SFTTrainer."""

from pathlib import Path
from typing import Any, ClassVar

from entity.train import TrainConfig
from service import models


class TrlSftStrategy:
    """Full fine-tuning with TRL's SFTTrainer."""

    name: ClassVar[str] = "trl"
    description: ClassVar[str] = "full fine-tune with TRL SFTTrainer"
    keeps_adapter: ClassVar[bool] = False

    def load_model(self, path: Path, dtype: str, device: str, attn_implementation: str | None = None) -> Any:
        """Load the model whose weights will be trained (an adapter given as the model is merged first)."""
        return models.load_for_training(path, dtype, device, self.keeps_adapter, attn_implementation)

    def peft_config(self, config: TrainConfig) -> Any:
        """No adapter: every weight is trained."""
        return None


class LoraStrategy(TrlSftStrategy):
    """Parameter-efficient fine-tuning: SFT plus a PEFT LoRA config."""

    name: ClassVar[str] = "lora"
    description: ClassVar[str] = "LoRA adapter with PEFT on the same SFTTrainer"
    keeps_adapter: ClassVar[bool] = True  # an adapter given as the model keeps training

    def peft_config(self, config: TrainConfig) -> Any:
        """Build the LoraConfig from the request (defaults: r=16, alpha=32, all-linear)."""
        from peft import LoraConfig

        from entity.train import LoraConfigIn

        lora = config.lora_config or LoraConfigIn()
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )


STRATEGIES: dict[str, type[TrlSftStrategy]] = {cls.name: cls for cls in (TrlSftStrategy, LoraStrategy)}
