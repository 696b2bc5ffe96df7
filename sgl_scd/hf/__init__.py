"""The reference runtime on transformers: model specs (models), prefill capture and continuation
from K/V built elsewhere (runtime), SCD artifacts used with those models (scd)."""
