"""The id index: UTF-8 keys of ids, lookups, and extending it commit by commit."""

from __future__ import annotations

import numpy as np
import pytest

from h5dask.index import IdIndex, utf8_keys

IDS = ["a", "é/ü", "日本", "", "x" * 300, "b", "3"]


@pytest.mark.parametrize(
    "ids",
    [IDS, np.array(IDS), np.array(IDS, dtype=np.dtypes.StringDType()), tuple(IDS)],
    ids=["list", "unicode-array", "stringdtype-array", "tuple"],
)
def test_utf8_keys_are_each_ids_own_encoding(ids):
    assert utf8_keys(ids).tolist() == [id.encode("utf-8") for id in IDS]


def test_utf8_keys_of_bytes_numbers_and_ids_holding_a_nul():
    assert utf8_keys([b"raw", "é", 3]).tolist() == [b"raw", "é".encode(), b"3"]
    # one id holding a NUL must not be split in two, nor shift the others
    assert utf8_keys(["a\0b", "c"]).tolist() == [b"a\0b", b"c"]
    assert utf8_keys([]).tolist() == []
    keys = np.array([b"k1", b"k2"])
    assert utf8_keys(keys) is keys


def test_lookups_by_one_and_by_many():
    index = IdIndex(IDS)
    assert [index[id] for id in IDS] == list(range(len(IDS)))
    assert index.positions(IDS + ["absent", "é", "é/ü"]).tolist() == [*range(len(IDS)), -1, -1, 1]
    assert "absent" not in index and 3 not in index
    with pytest.raises(KeyError, match="absent"):
        index["absent"]
    assert list(index) == IDS


@pytest.mark.parametrize("given_as", ["ids", "keys", "index"])
def test_extended_is_the_index_of_all_the_ids(given_as):
    rng = np.random.default_rng(1)
    ids = [f"id-{k}-é" * int(rng.integers(1, 4)) for k in rng.permutation(500)]
    index = IdIndex(ids[:100])
    for start, stop in [(100, 101), (101, 300), (300, 300), (300, 500)]:
        new = ids[start:stop]
        given = {"ids": new, "keys": utf8_keys(new), "index": IdIndex(new)}[given_as]
        index = index.extended(given)
    assert list(index) == ids
    assert index.positions(ids[::-1]).tolist() == list(range(499, -1, -1))
    assert index.positions(["id-1"]).tolist() == [-1]


def test_distinct_tells_whether_an_id_comes_twice():
    assert IdIndex(["b", "a", "c"]).distinct and IdIndex([]).distinct
    assert not IdIndex(["b", "a", "b"]).distinct
