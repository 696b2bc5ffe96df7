"""Serving on the reference runtime: the engine (one producer, N consumers, one code set), the
model-thread scheduler, the background publisher and the OpenAI-compatible API.
`python -m sgl_scd.launch` starts them."""
