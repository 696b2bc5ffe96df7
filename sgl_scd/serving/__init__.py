"""Serving on the reference runtime: the engine (one producer, N consumers, one code set) and its
HTTP front end. `python -m sgl_scd.launch` starts them."""
