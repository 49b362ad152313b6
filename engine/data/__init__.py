"""The data side of the engine: the binary dataset format, tokenizer, image preprocessing,
packing, the packed-sample dataset and the loader."""
