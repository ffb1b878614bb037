from longserve.model.config import ModelArgs
from longserve.model.transformer import CausalLM

__all__ = ["CausalLM", "ModelArgs"]
