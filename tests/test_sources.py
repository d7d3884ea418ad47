"""Tests of h5dask.sources: expanding sources into ids and opening them."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

from h5dask.errors import H5DaskError, SourceError
from h5dask.sources import expand_sources, open_source, source_protocol


def write(root: Path, names: list[str], content: bytes = b"x") -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


TREE = ["b.png", "a/2.png", "a/1.png", "a/deep/3.jpg", "z.txt"]
HIDDEN = [".hidden.png", "a/.x.png", ".git/config", "a/.cache/4.png"]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A local tree at tmp_path/data/imgs with hidden entries; cwd is tmp_path."""
    write(tmp_path / "data" / "imgs", TREE + HIDDEN)
    (tmp_path / "data" / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def expected(prefix: str, names=TREE) -> list[str]:
    return [prefix + n for n in sorted(names)]


# -- plain sources ----------------------------------------------------------------------


def test_plain_strings_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expand_sources(["0", "run-3", "missing/file.png"]) == ["0", "run-3", "missing/file.png"]
    assert expand_sources("run-3") == ["run-3"]
    assert expand_sources(Path("a") / "b.png") == [os.path.join("a", "b.png")]
    assert expand_sources(iter(["x", "y"])) == ["x", "y"]


def test_a_list_kept_as_it_is_is_not_copied(tree):
    ids = ["0", "run-3", "missing/file.png", str(tree / "data/imgs/b.png")]
    assert expand_sources(ids) is ids
    for changed in (ids + [str(tree / "data/imgs/a")], ids + ["0"], ids + [Path("x")]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the duplicate "0"
            assert expand_sources(changed) is not changed
    assert expand_sources(tuple(ids)) == ids


def test_plain_urls_pass_through_without_network(dead_url):
    # no trailing slash, no glob: http URLs are files, nothing is fetched
    urls = [f"{dead_url}/a.png", f"{dead_url}/file?token=a*b", "s3://bucket/key.png"]
    assert expand_sources(urls) == urls


def test_source_protocol():
    assert source_protocol("memory://b/x") == "memory"
    assert source_protocol("http://h/x") == "http"
    assert source_protocol("data/x.png") == "file"
    assert source_protocol(Path("/x")) == "file"
    assert source_protocol("0") == "file"
    assert source_protocol("simplecache::s3://b/x") == "simplecache"


def test_existing_local_file_is_kept(tree):
    assert expand_sources(["data/imgs/b.png"]) == ["data/imgs/b.png"]


def test_non_string_source_is_a_type_error():
    with pytest.raises(TypeError, match="int"):
        expand_sources([0, 1])
    with pytest.raises(TypeError, match="bytes"):
        expand_sources(b"data")


def test_chained_urls_pass_through(memory_fs):
    memory_fs.pipe("memory://bucket/a.bin", b"abc")
    source = "simplecache::memory://bucket/a.bin"
    assert expand_sources([source]) == [source]
    with open_source(source) as f:
        assert f.read() == b"abc"


def test_file_urls_keep_their_protocol(tree):
    url = (tree / "data" / "imgs").as_uri()
    assert url.startswith("file:///")
    assert expand_sources(url) == expected(url + "/")
    assert expand_sources(url + "/*.png") == [url + "/b.png"]
    with open_source(url + "/b.png") as f:
        assert f.read() == b"x"


@pytest.fixture
def stats(monkeypatch):
    """A list that records every ``os.stat`` call until the test undoes the patch."""
    calls = []
    real_stat = os.stat

    def counting_stat(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    return calls


def test_many_plain_strings_cost_one_listing_not_a_stat_each(tmp_path, monkeypatch, stats):
    monkeypatch.chdir(tmp_path)
    sources = [str(i) for i in range(100_000)]
    ids = expand_sources(sources)
    monkeypatch.undo()
    assert ids == sources
    assert stats == []  # speed is measured in benchmarks/, not here


def test_files_of_a_folder_are_told_from_directories_by_one_listing(tmp_path, monkeypatch, stats):
    names = [f"{i:03d}.npy" for i in range(200)]
    write(tmp_path / "data", names)
    monkeypatch.chdir(tmp_path)
    sources = [f"data/{n}" for n in reversed(names)]
    stats.clear()
    ids = expand_sources(sources)
    monkeypatch.undo()
    assert ids == sources
    assert stats == []  # no stat per file: a NFS or Lustre round trip each


def test_sources_the_listing_does_not_reach_get_their_stat(tree, monkeypatch, stats):
    monkeypatch.setattr("h5dask.sources.LISTED_PER_SOURCE", 0)
    ids = expand_sources(["data/imgs/b.png", "data/imgs/a", "missing.png"])
    in_a = expected("data/imgs/a/", ["1.png", "2.png", "deep/3.jpg"])
    assert ids == ["data/imgs/b.png", *in_a, "missing.png"]
    assert {"data/imgs/b.png", "data/imgs/a", "missing.png"} <= set(stats)


def test_directories_among_files_are_walked_whatever_their_spelling(tree):
    assert expand_sources(["data/imgs/b.png", "data/."])[1:] == expected("data/./imgs/")
    os.symlink(tree / "data" / "imgs" / "a", tree / "data" / "link")
    sources = ["data/imgs/z.txt", "data/link", "data/imgs/a/deep", "data/imgs/a/deep/..", "7"]
    assert expand_sources(sources) == [
        "data/imgs/z.txt",
        *expected("data/link/", ["1.png", "2.png", "deep/3.jpg"]),
        "data/imgs/a/deep/3.jpg",
        *expected("data/imgs/a/deep/../", ["1.png", "2.png", "deep/3.jpg"]),
        "7",
    ]


def test_many_plain_urls_touch_no_file_system(monkeypatch, stats):
    sources = [f"s3://bucket/{i}.png" for i in range(100_000)]
    ids = expand_sources(sources)
    monkeypatch.undo()
    assert ids == sources
    assert stats == []


# -- local directories and globs --------------------------------------------------------


def test_local_directory_is_walked_recursively_skipping_hidden(tree):
    assert expand_sources("data/imgs") == expected("data/imgs/")
    assert expand_sources("data/imgs/") == expected("data/imgs/")
    assert expand_sources(Path("data/imgs")) == expected("data/imgs/")
    assert expand_sources("./data/imgs") == expected("./data/imgs/")
    absolute = str(tree / "data" / "imgs")
    assert expand_sources(absolute) == expected(absolute + "/")


def test_local_current_directory(tree):
    os.chdir("data/imgs")
    assert expand_sources(".") == expected("./")


def test_order_follows_the_list_and_each_expansion_is_sorted(tree):
    ids = expand_sources(["run-3", "data/imgs/a", "0", "data/imgs/*.png"])
    assert ids == [
        "run-3",
        "data/imgs/a/1.png",
        "data/imgs/a/2.png",
        "data/imgs/a/deep/3.jpg",
        "0",
        "data/imgs/b.png",
    ]


def test_local_globs(tree):
    assert expand_sources("data/imgs/*.png") == ["data/imgs/b.png"]
    assert expand_sources("data/imgs/a/?.png") == ["data/imgs/a/1.png", "data/imgs/a/2.png"]
    assert expand_sources("data/imgs/[ab].*") == ["data/imgs/b.png"]
    assert expand_sources("data/imgs/**/*.png") == [
        "data/imgs/a/1.png",
        "data/imgs/a/2.png",
        "data/imgs/b.png",
    ]
    os.chdir("data/imgs")
    assert expand_sources("*.txt") == ["z.txt"]
    assert expand_sources("*/*.png") == ["a/1.png", "a/2.png"]


def test_glob_matching_directories_walks_them(tree):
    assert expand_sources("data/im*") == expected("data/imgs/")


def test_glob_asking_for_hidden_names_gets_them(tree):
    assert expand_sources("data/imgs/.h*") == ["data/imgs/.hidden.png"]
    assert expand_sources("data/imgs/a/.cache/*") == ["data/imgs/a/.cache/4.png"]


def test_explicit_hidden_directory_is_walked(tree):
    # hidden components are skipped below the given prefix, not in it
    assert expand_sources("data/imgs/a/.cache") == ["data/imgs/a/.cache/4.png"]


def test_pattern_filters_expanded_entries_only(tree):
    ids = expand_sources(["data/imgs", "notes.txt"], pattern=r"\.png$")
    assert ids == ["data/imgs/a/1.png", "data/imgs/a/2.png", "data/imgs/b.png", "notes.txt"]
    ids = expand_sources(["data/imgs"], pattern=re.compile(r"/a/"))
    assert ids == ["data/imgs/a/1.png", "data/imgs/a/2.png", "data/imgs/a/deep/3.jpg"]


def test_duplicates_are_dropped_with_a_warning(tree):
    with pytest.warns(UserWarning, match="dropped 3 duplicate"):
        ids = expand_sources(["0", "data/imgs/b.png", "data/imgs/*.png", "0", "data/imgs/b.png"])
    assert ids == ["0", "data/imgs/b.png"]


def test_empty_directory_among_others_warns(tree):
    with pytest.warns(UserWarning, match="data/empty"):
        assert expand_sources(["data/empty", "0"]) == ["0"]


# -- errors -----------------------------------------------------------------------------


def test_empty_input_is_an_error():
    with pytest.raises(SourceError, match="no sources given"):
        expand_sources([])
    with pytest.raises(SourceError, match="empty string"):
        expand_sources("")


def test_empty_directory_is_an_error(tree):
    with pytest.raises(SourceError, match="data/empty"):
        expand_sources("data/empty")


def test_only_hidden_files_is_an_error(tmp_path):
    write(tmp_path, [".a", ".b/c"])
    with pytest.raises(SourceError, match=re.escape(str(tmp_path))):
        expand_sources(tmp_path)


def test_glob_matching_nothing_is_an_error(tree):
    with pytest.raises(SourceError, match=re.escape("data/imgs/*.gif")):
        expand_sources("data/imgs/*.gif")


def test_pattern_leaving_nothing_is_an_error(tree):
    with pytest.raises(SourceError, match=re.escape(repr(r"\.gif")) + ".*data/imgs"):
        expand_sources("data/imgs", pattern=r"\.gif")


def test_trailing_slash_on_a_missing_local_directory_is_an_error(tree):
    with pytest.raises(SourceError, match="data/nope/"):
        expand_sources("data/nope/")


def test_unknown_protocol_is_an_error():
    with pytest.raises(SourceError, match=r"'nope://bucket/a\.png'.*protocol 'nope'"):
        expand_sources(["0", "nope://bucket/a.png"])


def test_source_error_is_an_oserror_and_an_h5dask_error():
    with pytest.raises(OSError) as info:
        expand_sources([])
    assert isinstance(info.value, H5DaskError)


# -- memory:// --------------------------------------------------------------------------


@pytest.fixture
def memory_tree(memory_fs):
    for name in TREE + HIDDEN:
        memory_fs.pipe(f"memory://bucket/imgs/{name}", b"x")
    memory_fs.pipe("memory://bucket/top.txt", b"x")
    memory_fs.mkdir("memory://bucket/empty")
    return memory_fs


def test_memory_directory(memory_tree):
    assert expand_sources("memory://bucket/imgs/") == expected("memory://bucket/imgs/")
    # without the trailing slash: memory's isdir is cheap and asked
    assert expand_sources("memory://bucket/imgs") == expected("memory://bucket/imgs/")
    assert expand_sources("memory://bucket/imgs/a/deep") == ["memory://bucket/imgs/a/deep/3.jpg"]


def test_memory_file_and_glob(memory_tree):
    assert expand_sources("memory://bucket/top.txt") == ["memory://bucket/top.txt"]
    assert expand_sources("memory://bucket/imgs/a/*.png") == [
        "memory://bucket/imgs/a/1.png",
        "memory://bucket/imgs/a/2.png",
    ]
    assert expand_sources("memory://bucket/*/b.png") == ["memory://bucket/imgs/b.png"]
    # a missing memory file is passed through, to fail when loaded
    assert expand_sources("memory://bucket/missing.png") == ["memory://bucket/missing.png"]


def test_memory_root_glob(memory_fs):
    memory_fs.pipe("memory://top.png", b"x")
    assert expand_sources("memory://*.png") == ["memory://top.png"]


def test_memory_errors(memory_tree):
    with pytest.raises(SourceError, match="memory://bucket/empty"):
        expand_sources("memory://bucket/empty/")
    with pytest.raises(SourceError, match="memory://bucket/nope/") as info:
        expand_sources("memory://bucket/nope/")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(SourceError, match=re.escape("memory://nope/*.png")):
        expand_sources("memory://nope/*.png")


# -- http:// ----------------------------------------------------------------------------


@pytest.fixture
def http_tree(http_server):
    write(http_server.root / "dir", TREE + HIDDEN + ["with space.png"])
    write(http_server.root / "empty", [".only-hidden"])
    (http_server.root / "top.txt").write_bytes(b"top")
    return http_server


def test_http_directory_is_listed_recursively(http_tree):
    url = f"{http_tree.url}/dir/"
    ids = expand_sources(url)
    assert ids == sorted(expected(url) + [url + "with%20space.png"])
    # hidden folders are pruned and hidden files skipped
    assert not [i for i in ids if "/." in i]


def test_http_subdirectory_and_glob(http_tree):
    url = http_tree.url
    assert expand_sources(f"{url}/dir/a/deep/") == [f"{url}/dir/a/deep/3.jpg"]
    assert expand_sources(f"{url}/dir/*.png") == [f"{url}/dir/b.png", f"{url}/dir/with%20space.png"]
    assert expand_sources(f"{url}/dir/a/*.png") == [f"{url}/dir/a/1.png", f"{url}/dir/a/2.png"]


def test_http_ids_open(http_tree):
    ids = expand_sources(f"{http_tree.url}/dir/")
    for id in ids:
        with open_source(id) as f:
            assert f.read() == b"x"


def test_http_url_without_slash_is_a_file(http_tree):
    url = f"{http_tree.url}/dir"
    assert expand_sources(url) == [url]


def test_http_errors(http_tree, dead_url):
    with pytest.raises(SourceError, match=re.escape(f"{http_tree.url}/nope/")) as info:
        expand_sources(f"{http_tree.url}/nope/")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(SourceError, match=re.escape(f"{http_tree.url}/empty/")):
        expand_sources(f"{http_tree.url}/empty/")
    with pytest.raises(SourceError, match=re.escape(f"{http_tree.url}/nope/*.png")) as info:
        expand_sources(f"{http_tree.url}/nope/*.png")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(SourceError, match=re.escape(f"{http_tree.url}/dir/*.gif")):
        expand_sources(f"{http_tree.url}/dir/*.gif")


def test_http_listing_is_the_links_of_the_index_page(http_server):
    # an Apache-like index page: sorting links (queries) and the parent are ignored, and
    # only linked files are found (index.html itself is not linked, so it is not listed)
    write(http_server.root / "apache", ["x.png", "unlinked.png", "sub/y.png"])
    (http_server.root / "apache" / "index.html").write_text(
        '<a href="?C=N;O=D">Name</a> <a href="/">Parent Directory</a>'
        '<a href="x.png">x.png</a> <a href="sub/">sub/</a> <a href="#top">top</a>'
    )
    url = f"{http_server.url}/apache/"
    assert expand_sources(url) == [url + "sub/y.png", url + "x.png"]


def test_http_storage_options(http_tree):
    url = f"{http_tree.url}/dir/a/deep/"
    ids = expand_sources(url, storage_options={"headers": {"X-Test": "1"}})
    assert ids == [url + "3.jpg"]
    with open_source(ids[0], headers={"X-Test": "1"}) as f:
        assert f.read() == b"x"


def test_unreachable_http_prefix_is_an_error(dead_url):
    for source in [f"{dead_url}/dir/", f"{dead_url}/dir/*.png"]:
        with pytest.raises(SourceError, match=re.escape(source)) as info:
            expand_sources(["0", source])
        assert info.value.__cause__ is not None
        assert "connect" in str(info.value).lower()


# -- open_source ------------------------------------------------------------------------


def test_open_local(tree):
    with open_source("data/imgs/b.png") as f:
        assert f.read() == b"x"
    with open_source(tree / "data" / "imgs" / "z.txt") as f:
        assert f.read() == b"x"
    assert f.closed


def test_open_memory_and_write(memory_fs):
    with open_source("memory://bucket/new.bin", mode="wb") as f:
        f.write(b"abc")
    with open_source("memory://bucket/new.bin") as f:
        assert f.read() == b"abc"


def test_open_http(http_tree):
    with open_source(f"{http_tree.url}/top.txt") as f:
        assert f.read() == b"top"


def test_open_missing_local_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(SourceError, match=re.escape(str(missing))) as info:
        with open_source(missing):
            pass
    assert "FileNotFoundError" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_open_missing_memory_file(memory_fs):
    with pytest.raises(SourceError, match="memory://bucket/missing.png.*FileNotFoundError"):
        with open_source("memory://bucket/missing.png"):
            pass


def test_open_missing_http_file(http_tree):
    source = f"{http_tree.url}/missing.png"
    with pytest.raises(SourceError, match=re.escape(source)) as info:
        with open_source(source):
            pass
    assert "FileNotFoundError" in str(info.value)


def test_open_unreachable_url(dead_url):
    source = f"{dead_url}/a.png"
    with pytest.raises(SourceError, match=re.escape(source)) as info:
        with open_source(source):
            pass
    assert "connect" in str(info.value).lower()
    assert info.value.__cause__ is not None


def test_open_unknown_protocol():
    with pytest.raises(SourceError, match=r"'nope://a\.png'.*nope"):
        with open_source("nope://a.png"):
            pass


def test_errors_in_the_with_block_are_not_wrapped(memory_fs):
    memory_fs.pipe("memory://bucket/a.bin", b"a")
    with pytest.raises(KeyError):
        with open_source("memory://bucket/a.bin"):
            raise KeyError("inner")


def test_no_warnings_for_plain_expansion(tree):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expand_sources(["data/imgs", "0"])
