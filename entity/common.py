"""Schema pieces shared by several domains.

Numbers in request bodies are StrictInt / StrictFloat: a JSON body's "5" or true is refused (422) where a number is
meant, and a number field still takes an integer such as 1. Query parameters arrive as text and keep plain int.
"""

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

# Sampling at a temperature this close to 0 divides logits by ~0 (inf/nan probabilities); it is greedy decoding.
GREEDY_BELOW = 1e-5
MAX_SQL_INT = 2**63 - 1  # SQLite's INTEGER is signed 64-bit: a larger id, offset or seed cannot be stored or compared
MAX_SEED = MAX_SQL_INT  # what torch, SQLite and OpenAI's API accept
MAX_TRAIN_SEED = 2**32 - 1  # numpy's seed range, which transformers' set_seed uses


def _greedy_below_floor(value: float) -> float:
    """Map a temperature below GREEDY_BELOW to 0 (greedy decoding)."""
    return 0.0 if value < GREEDY_BELOW else value


Temperature = Annotated[
    StrictFloat,
    Field(ge=0, le=2, description=f"0 means greedy decoding; any value below {GREEDY_BELOW:g} counts as 0."),
    AfterValidator(_greedy_below_floor),
]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED, description="Makes sampling reproducible (0 to 2**63 - 1).")]


class ModelRef(BaseModel):
    """A model named by `model` or, the older name, `model_path`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Base model name, a succeeded train task's id, or a model folder; default: the base model."
    )
    model_path: str | None = Field(None, description="Same as `model` (the older name).")

    @model_validator(mode="after")
    def _one_model(self) -> "ModelRef":
        """`model` and `model_path` are the same field; give at most one."""
        if self.model is not None and self.model_path is not None and self.model != self.model_path:
            raise ValueError("give model or model_path, not both")
        return self

    @property
    def model_ref(self) -> str | None:
        """The model identifier, whichever field carried it."""
        return self.model if self.model is not None else self.model_path
