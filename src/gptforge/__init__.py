"""gptforge: train, fine-tune, evaluate, serve and publish your own GPT-2-class language model."""

from gptforge.errors import GptforgeError

__version__ = "0.1.0"
__all__ = ["GptforgeError", "__version__"]
