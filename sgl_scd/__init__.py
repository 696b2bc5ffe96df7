"""sgl_scd: Semantic Cache Distillation for SGLang."""
