"""The SCD codec: producer-side encoders, consumer-side decoders, wire format, manifest.

  factor.py    PCA / joint factorization / ridge (closed-form pieces)
  quant.py     bit allocation, Gaussian-optimal uniform quantizers, bit packing
  codec.py     ProducerEncoder (capture -> codes) and ConsumerDecoder (codes -> consumer K/V)
  wire.py      page-granular payloads with a versioned header and checksum
  manifest.py  the per-adapter contract written by calibration and checked at load
  distill.py   end-to-end distillation of decoders on KL to the oracle
  baselines.py KIVI-style 4-bit KV and DroidSpeak-style selective recompute
"""
