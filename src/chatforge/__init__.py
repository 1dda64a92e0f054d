"""chatforge: forge your own ChatGPT, from tokenizer to RLHF to a chat page, in plain PyTorch."""

from chatforge.errors import ChatforgeError

__all__ = ["ChatforgeError"]
__version__ = "0.1.0"
