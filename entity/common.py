"""Schema pieces shared by several domains."""

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
