"""The demo: ToMi / Hi-ToM data (data), the SmolLM2 base (base), the seeded fine-tunes that make
its consumers (finetune), and `python -m sgl_scd.demo build` (build)."""
