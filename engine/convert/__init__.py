"""Weight conversion between the engine's state dicts and Hugging Face / original LLaVA layouts."""
