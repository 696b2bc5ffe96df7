"""sglang==0.5.23 is importable in the test environment (installed --no-deps on CPU machines),
and the extension points sgl_scd plugs into exist with the expected abstract methods."""

import inspect


def test_sglang_version_and_linker_contract():
    import sglang
    from sglang.srt.mem_cache.unified_cache.unified_cache_linker import UnifiedCacheLinker

    assert sglang.__version__ == "0.5.23"
    abstract = set(getattr(UnifiedCacheLinker, "__abstractmethods__", ()))
    for name in ("lookup", "load", "offload", "reset", "close"):
        assert name in abstract or callable(getattr(UnifiedCacheLinker, name, None)), name
    assert "transfers" in inspect.signature(UnifiedCacheLinker.lookup).parameters
