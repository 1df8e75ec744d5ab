"""Training strategies: full SFT and LoRA on TRL's SFTTrainer, and DPO on TRL's DPOTrainer."""

from pathlib import Path
from typing import Any, ClassVar

from entity.train import TrainConfig
from service import models
from util.settings import Settings


class TrlSftStrategy:
    """Full fine-tuning with TRL's SFTTrainer."""

    name: ClassVar[str] = "trl"
    description: ClassVar[str] = "full fine-tune with TRL SFTTrainer"
    keeps_adapter: ClassVar[bool] = False
    data_kind: ClassVar[str] = "chat"  # what /api/data/validate calls the records it trains on
    supports_packing: ClassVar[bool] = True

    def load_model(self, path: Path, dtype: str, device: str, attn_implementation: str | None = None) -> Any:
        """Load the model whose weights will be trained (an adapter given as the model is merged first)."""
        return models.load_for_training(path, dtype, device, self.keeps_adapter, attn_implementation)

    def peft_config(self, config: TrainConfig) -> Any:
        """No adapter: every weight is trained."""
        return None

    def build_dataset(self, paths: list[Path], tokenizer: Any, config: TrainConfig, max_length: int) -> tuple[Any, Any]:
        """Chat records of the merged files tokenised with an assistant mask, and what happened to each record."""
        from service.train.dataset import build_dataset

        return build_dataset(paths, tokenizer, config.assistant_only_loss, max_length, config.truncate)

    def training_args(
        self,
        settings: Settings,
        config: TrainConfig,
        output_dir: Path,
        has_eval: bool,
        dtype: str,
        packing: bool,
        distributed: dict[str, Any] | None,
        report_to: list[str] | None = None,
        run_name: str | None = None,
    ) -> Any:
        """TRL's SFTConfig for the request."""
        from service.train.runner import build_sft_config

        return build_sft_config(
            settings, config, output_dir, has_eval, dtype, packing, distributed, report_to, run_name
        )

    def trainer_class(self) -> Any:
        """The TRL trainer this strategy drives."""
        from trl import SFTTrainer

        return SFTTrainer


def lora_config(config: TrainConfig) -> Any:
    """PEFT's LoraConfig from the request (defaults: r=16, alpha=32, all-linear)."""
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


class LoraStrategy(TrlSftStrategy):
    """Parameter-efficient fine-tuning: SFT plus a PEFT LoRA config."""

    name: ClassVar[str] = "lora"
    description: ClassVar[str] = "LoRA adapter with PEFT on the same SFTTrainer"
    keeps_adapter: ClassVar[bool] = True  # an adapter given as the model keeps training

    def peft_config(self, config: TrainConfig) -> Any:
        """Build the LoraConfig from the request."""
        return lora_config(config)


class DpoStrategy(TrlSftStrategy):
    """Direct preference optimisation with TRL's DPOTrainer: LoRA when lora_config is given, else full weights.

    With LoRA the reference model is the base with the adapter switched off; with full weights TRL keeps a frozen
    copy of the starting model as the reference.
    """

    name: ClassVar[str] = "dpo"
    description: ClassVar[str] = "DPO on preference data with TRL DPOTrainer (LoRA with lora_config, else full)"
    data_kind: ClassVar[str] = "preference"
    supports_packing: ClassVar[bool] = False

    def peft_config(self, config: TrainConfig) -> Any:
        """A LoRA adapter when the request asks for one; full weights otherwise."""
        return lora_config(config) if config.lora_config is not None else None

    def load_model(self, path: Path, dtype: str, device: str, attn_implementation: str | None = None) -> Any:
        """Load the policy: an adapter given as the model is merged, so the reference is the model as given."""
        return models.load_for_training(path, dtype, device, False, attn_implementation)

    def build_dataset(self, paths: list[Path], tokenizer: Any, config: TrainConfig, max_length: int) -> tuple[Any, Any]:
        """Preference records (OpenAI DPO or TRL format) as TRL's conversational prompt/chosen/rejected.

        TRL's DPO collator truncates to max_length itself; the statistics count records and the longer side's length.
        """
        from datasets import Dataset

        from service.data import load_preferences
        from service.train.dataset import DataStats

        stats = DataStats(files=[str(p) for p in paths], max_length=max_length, truncate=True)
        records = [r for path in paths for r in load_preferences(path)]
        if not records:
            raise ValueError(f"{', '.join(stats.files)}: no valid preference records.")
        for r in records:
            longest = max(
                len(models.chat_token_ids(tokenizer, r["prompt"] + r[side])) for side in ("chosen", "rejected")
            )
            stats.lengths_before.append(longest)
            stats.lengths_after.append(min(longest, max_length))
            stats.truncated += longest > max_length
        stats.records = stats.processed = len(records)
        return Dataset.from_list(records), stats

    def training_args(
        self,
        settings: Settings,
        config: TrainConfig,
        output_dir: Path,
        has_eval: bool,
        dtype: str,
        packing: bool,
        distributed: dict[str, Any] | None,
        report_to: list[str] | None = None,
        run_name: str | None = None,
    ) -> Any:
        """TRL's DPOConfig: the shared arguments plus beta and the loss type."""
        from trl import DPOConfig

        from service.train.runner import common_args

        args = common_args(settings, config, output_dir, has_eval, dtype, distributed, report_to, run_name)
        # TRL's Liger DPO path is a different loss implementation: only when the request asks for it.
        args["use_liger_kernel"] = bool(config.use_liger_kernel)
        beta = 0.1 if config.beta is None else config.beta
        return DPOConfig(**args, beta=beta, loss_type=[config.loss_type or "sigmoid"])

    def trainer_class(self) -> Any:
        """TRL's DPOTrainer."""
        from trl import DPOTrainer

        return DPOTrainer


STRATEGIES: dict[str, type[TrlSftStrategy]] = {cls.name: cls for cls in (TrlSftStrategy, LoraStrategy, DpoStrategy)}
