"""The SCD codec: producer-side encoders, consumer-side decoders, wire format, manifest.

  states.py    what engines hand the codec: producer states, consumer projections (tensors)
  rope.py      rotary embeddings and their inverse
  factor.py    PCA / joint factorization / ridge (closed-form pieces)
  quant.py     bit allocation, Gaussian-optimal uniform quantizers, bit packing (numpy)
  codec.py     ProducerEncoder (states -> codes) and ConsumerDecoder (codes -> consumer K/V)
  fold.py      FoldedDecoder: the serving form, one layer at a time, any device and dtype
  device.py    the same packing and encoding in torch ops, resident on a GPU
  wire.py      page-granular payloads with a versioned header and checksum
  manifest.py  the encoder and adapter artifacts written by calibration and checked at load
"""
