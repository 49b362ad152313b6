"""Few-shot evaluation on the Multimodal Textbook paper's benchmarks (ScienceQA-IMG, OK-VQA,
TextVQA with and without OCR tokens, MathVista, MathVision, MathVerse), standalone
(engine/cli/evaluate.py) and during training (during_training.py). Readers take each
benchmark's official release layout; templates.py holds every prompt string; the metrics are
the VQA accuracy, ScienceQA letter accuracy and a rule-based math answer check. The model is
reached only through the generation API (engine.inference). See docs/evaluation.md."""
