"""StoreIdentity: frozen, validated, and a digest that is stable and covers every field."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import pytest
from store_fixtures import REPO, make_identity

from sgl_scd.store import StoreIdentity
from sgl_scd.store.keys import KeySpace, check_adapter, parse_counter_key
from sgl_scd.store.page_hash import namespace_seed

# Pinned: changing the encoding changes every key in every deployed store.
GOLDEN_DIGEST = "bc2c29b14075f050dd64eb27918edcfa895afbe38cc63b78407f47bed1c17c8d"


def test_digest_is_pinned_and_matches_the_documented_encoding():
    ident = make_identity()
    assert ident.digest_hex == GOLDEN_DIGEST
    h = hashlib.sha256(b"sgl-scd-store-identity-v1")
    for f in dataclasses.fields(ident):
        value = str(getattr(ident, f.name)).encode()
        h.update(len(f.name).to_bytes(2, "little") + f.name.encode())
        h.update(len(value).to_bytes(4, "little") + value)
    assert h.hexdigest() == GOLDEN_DIGEST
    assert ident.namespace == GOLDEN_DIGEST[:32]


def test_digest_is_the_same_in_another_process():
    code = ("import sys; sys.path.insert(0, 'tests'); from store_fixtures import REPO, make_identity;"
            "print(make_identity().digest_hex)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == GOLDEN_DIGEST


@pytest.mark.parametrize("field,value", [
    ("producer_model", "demo/other"), ("producer_revision", "rev-2"),
    ("tokenizer", "tok-2"), ("page_size", 32), ("codec_revision", "codec-r2"),
    ("dtype", "float16"), ("sharding", "tp2"), ("cache_salt", "tenant-a"),
])
def test_every_field_changes_the_digest(field, value):
    assert make_identity(**{field: value}).digest != make_identity().digest


def test_no_field_boundary_ambiguity():
    a = make_identity(producer_model="ab", producer_revision="c")
    b = make_identity(producer_model="a", producer_revision="bc")
    assert a.digest != b.digest


def test_frozen():
    ident = make_identity()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.page_size = 32  # type: ignore[misc]


@pytest.mark.parametrize("field,value,message", [
    ("page_size", 0, "page_size=0"),
    ("page_size", "16", "page_size='16'"),
    ("page_size", True, "page_size=True"),
    ("producer_model", "", "producer_model='': expected a non-empty str"),
    ("tokenizer", "bad\nname", "tokenizer='bad\\\\nname'"),
    ("dtype", "BF16", "dtype='BF16'"),
    ("sharding", "tp 2", "sharding='tp 2'"),
    ("codec_revision", None, "codec_revision=None"),
])
def test_validation_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        make_identity(**{field: value})


def test_mapping_round_trip_and_unknown_keys():
    ident = make_identity(cache_salt="t")
    assert StoreIdentity.from_mapping(ident.to_mapping()) == ident
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['adapter'\]"):
        StoreIdentity.from_mapping({**ident.to_mapping(), "adapter": "x"})
    with pytest.raises(ValueError, match=r"missing field\(s\) \['dtype'\]"):
        StoreIdentity.from_mapping({k: v for k, v in ident.to_mapping().items() if k != "dtype"})


def test_salt_seeds_the_chain_like_sglang():
    assert make_identity().chain_seed is None
    assert make_identity(cache_salt="tenant-a").chain_seed == namespace_seed(None, "tenant-a")


def test_keyspace_layout_and_parsing():
    ident = make_identity()
    ks = KeySpace(ident, "scd")
    h = "ab" * 32
    assert ks.page_key(h) == f"scd:{ident.namespace}:p:{h}"
    parsed = parse_counter_key(ks.stats_key("demo-ft"))
    assert parsed is not None
    assert (parsed.namespace, parsed.kind, parsed.adapter) == (ident.namespace, "stats", "demo-ft")
    assert parse_counter_key(ks.page_key(h)) is None
    with pytest.raises(ValueError, match="page_hash='AB"):
        ks.page_key("AB" * 32)
    with pytest.raises(ValueError, match="adapter='a b'"):
        check_adapter("a b")
    with pytest.raises(ValueError, match="key_prefix='x:y'"):
        KeySpace(ident, "x:y")
