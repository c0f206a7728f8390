"""peftchat: LoRA/QLoRA fine-tuning of chat LLMs on multi-turn conversations, on one GPU."""

__version__ = "0.1.0"
