"""The store's page hash is bit-identical to SGLang 0.5.23's L3 page hash.

Golden vectors were produced by sglang.srt.mem_cache.utils.get_hash_str /
storage_namespace_seed (sglang 0.5.23); the live tests call SGLang's own functions
(its native hash extension is JIT-built once into TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sgl_scd.store.page_hash import namespace_seed, page_hashes

GOLDEN_PAGES = [
    # (tokens, page_size, prior, expected hashes)
    (list(range(32)), 16, None, [
        "5d85718ec594b982c252d0279e5966ffca33a5eaf2a455038d3ab331fde70cea",
        "4681c0107c38f402cd1bc30b0b09a65202dba31f98269d9d7f63f5e0dea6901a",
    ]),
    ([151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644], 4,
     "9d303df3761a7561353e2ae7459eb4ab12a08abb37951b696aa4f0c059c7caaa", [
         "032245542b88e42bf3b2154aa159d63ef2add45dc3ca3e76bfae33781c6d26fd",
         "863665798526d3485bc316d4d5f9fc3cd3832539fa9b1dbc0ff8a0ee340e6440",
         "00d5b061381d78c90c6f0bf3650734d639fa9f6d206333e2c1145b638ad99749",
     ]),
    # a token > 2**32 - 1 switches that page to SGLang's wide (0xff-tagged uint64) encoding
    ([2**40, 1, 2, 3, 7, 8, 9, 10], 4, None, [
        "61b1a43306e5e539e390715671301fae10ad6c790bb326f556f34b68b71e8b36",
        "8d720fa9bd813463e75266974136ce3845c743bf7fbd569e2fe60095edb784f3",
    ]),
    ([2**32 - 1, 0, 5, 6], 2, None, [
        "72a4fa3544e43a836ffcb268ce06ccdbc55d44d5e6b1b1c19216a53ea98301fd",
        "2888823f6fe7cd5c3b014a2b8c809f2dcdc6ba9d5ffbd3764d67555d9361ed9f",
    ]),
]

GOLDEN_SEEDS = [
    (None, "tenant-a", "9d303df3761a7561353e2ae7459eb4ab12a08abb37951b696aa4f0c059c7caaa"),
    ("lora-1", None, "502757a4b3684cc558b10cfebee955436e393e760c90c2adf970429f6f25cd50"),
    ("", "", "bea08aaebe976c9c4f8ebade6674ba3fe15783c47020e10c4721ad211aae36e4"),
    ("a", "bc", "b8080ec8e713ddb4b5469eaf5874a021a72286a24e6c55d2046f0acfb48a938b"),
]


@pytest.mark.parametrize("tokens,page_size,prior,expected", GOLDEN_PAGES)
def test_golden_page_hashes(tokens, page_size, prior, expected):
    assert page_hashes(tokens, page_size, prior) == expected


@pytest.mark.parametrize("extra_key,cache_salt,expected", GOLDEN_SEEDS)
def test_golden_namespace_seeds(extra_key, cache_salt, expected):
    assert namespace_seed(extra_key, cache_salt) == expected


def test_unseeded_chain_is_the_base_namespace():
    assert namespace_seed(None, None) is None
    assert page_hashes(list(range(32)), 16, None) == page_hashes(list(range(32)), 16, "")


def test_chain_continues_from_prior():
    tokens = list(range(64))
    full = page_hashes(tokens, 16)
    assert page_hashes(tokens[32:], 16, full[1]) == full[2:]


def test_only_full_pages_are_hashed():
    tokens = list(range(40))
    assert page_hashes(tokens, 16) == page_hashes(tokens[:32], 16)
    assert page_hashes(tokens[:15], 16) == []


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match=r"token_ids\[17\]=-1"):
        page_hashes([1] * 17 + [-1] + [2] * 14, 16)
    with pytest.raises(ValueError, match=r"token_ids\[0\]=1.5"):
        page_hashes([1.5] * 16, 16)
    with pytest.raises(ValueError, match="page_size=0"):
        page_hashes([1, 2], 0)
    with pytest.raises(ValueError, match="prior_hex='abc'"):
        page_hashes([1, 2], 2, "abc")


@pytest.fixture(scope="module")
def sglang_utils():
    """SGLang's own hash functions (the native extension is built once per cache dir)."""
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "sgl_scd" / "torch_extensions")
    )
    utils = pytest.importorskip("sglang.srt.mem_cache.utils", reason="sglang not installed")
    radix = pytest.importorskip("sglang.srt.mem_cache.radix_cache")
    try:
        utils.get_hash_str([1, 2], None, page_size=2)
    except RuntimeError as exc:  # no compiler / openssl headers on this machine
        pytest.skip(f"SGLang's native page hash could not be built: {exc}")
    return utils, radix


def test_matches_sglang_live(sglang_utils):
    utils, _ = sglang_utils
    rng = random.Random(1234)
    for page_size in (1, 4, 16, 64):
        for n in (0, page_size, 5 * page_size, 7 * page_size + 3):
            tokens = [rng.randrange(0, 152_000) for _ in range(n)]
            n_full = n // page_size
            theirs = utils.get_hash_str(tokens, None, page_size=page_size)[:n_full]
            assert page_hashes(tokens, page_size) == theirs, (page_size, n)
            prior = theirs[0] if theirs else None
            if prior:
                assert page_hashes(tokens, page_size, prior) == utils.get_hash_str(
                    tokens, prior, page_size=page_size)[:n_full]
    wide = [rng.randrange(0, 2**40) for _ in range(32)]
    assert page_hashes(wide, 8) == utils.get_hash_str(wide, None, page_size=8)
    for tokens, page_size, prior, expected in GOLDEN_PAGES:
        assert utils.get_hash_str(tokens, prior, page_size=page_size) == expected


def test_matches_sglang_storage_keys_live(sglang_utils):
    """The L3 keys SGLang computes for a RadixKey: base chain and salted chain."""
    utils, radix = sglang_utils
    tokens = list(range(1000, 1064))
    base = utils.get_storage_hash_str(radix.RadixKey(tokens), None, page_size=16)
    assert page_hashes(tokens, 16) == base
    salted = utils.get_storage_hash_str(radix.RadixKey(tokens, cache_salt="t1"), None,
                                        page_size=16)
    assert page_hashes(tokens, 16, namespace_seed(None, "t1")) == salted
    for extra_key, cache_salt, expected in GOLDEN_SEEDS:
        assert utils.storage_namespace_seed(extra_key, cache_salt) == expected
