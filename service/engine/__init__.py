"""Continuous-batching generation: one engine per loaded model (see engine.py)."""

from service.engine.engine import Completion, Delta, Engine, EngineConfig, SamplingParams
from service.engine.text import TextAssembler

__all__ = ["Completion", "Delta", "Engine", "EngineConfig", "SamplingParams", "TextAssembler"]
