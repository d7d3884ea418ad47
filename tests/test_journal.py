"""The undo journal cannot be fooled, commits survive power loss, killed builds clean up.

Issue 24: a journal is bound to its file (stale, planted, symlinked journals are
refused), repairs are single and verified (a late repair with its window widened
by the test), crash images cut from the writes of real commits as a power loss
would, and the spill folders of killed builds.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

import h5dask as h5m
from h5dask import engine
from h5dask import repair as repair_module
from h5dask.cli import main as cli
from h5dask.errors import FileFormatError, H5DaskError, ReadOnlyError
from h5dask.repair import JournalError, journal_path, needs_repair, repair


class Rows(h5m.Feature):
    def load(self, source):
        i = int(source[1:])
        return np.full((i % 7 + 1, 8), i, dtype=np.float32)


SCHEMA = {"x": Rows()}


def sources(start, stop):
    return [f"s{i:05d}" for i in range(start, stop)]


def build(path, start, stop, mode="a"):
    h5m.TypedFile.create(
        path, sources(start, stop), schema=SCHEMA, mode=mode, scheduler="sync", progress=False
    )


def ids(path) -> list[str]:
    with h5py.File(path, "r") as f:
        return f["__src__/id"].asstr()[()].tolist()


def check(path, n) -> None:
    """The file holds the first ``n`` sources or more, each reading back as loaded."""
    assert len(h5m.TypedFile(path)) >= n
    with h5py.File(path, "r") as f:
        got = f["__src__/id"].asstr()[()].tolist()
        assert got[:n] == sources(0, n)
        refs, values = f["x/refs"][: len(got)], f["x/values"][()]
    for id, (start, stop) in zip(got, refs.tolist(), strict=True):
        assert np.array_equal(values[start:stop], Rows().load(id)), id


DIE_MID_COMMIT = """
import os, signal, sys
import numpy as np
from h5dask.repair import journaled
with journaled(sys.argv[1]) as (f, raw):
    ids = f["__src__/id"]
    ids.resize((ids.shape[0] + 1000,))
    ids[-1000:] = ["junk"] * 1000
    f.flush()
    if sys.argv[2] == "written":
        raw._write_held()  # HDF5's new pages reached the file
    os.kill(os.getpid(), signal.SIGKILL)
"""


def die_mid_commit(path, how="held"):
    """A writer that dies in the middle of a commit that HDF5 has flushed."""
    out = subprocess.run([sys.executable, "-c", DIE_MID_COMMIT, str(path), how])
    assert out.returncode == -signal.SIGKILL
    assert needs_repair(path)


def test_a_stale_journal_is_not_replayed_onto_a_backup_restored_over_the_file(tmp_path):
    path = tmp_path / "f.h5"
    build(path, 0, 50, mode="w")
    backup = path.read_bytes()
    build(path, 0, 90)
    die_mid_commit(path)
    fd = os.open(journal_path(path), os.O_RDONLY)
    assert any(offset == 0 for offset, _ in repair_module._read_journal(fd, "j").records)
    os.close(fd)  # the superblock's page was saved: the check compares it
    path.write_bytes(backup)  # a restore in place: the same inode, older content
    for open_it in (lambda: h5m.TypedFile(path), lambda: h5m.TypedFile(path, mode="a")):
        with pytest.raises(JournalError, match="restored from a backup") as info:
            open_it()
        assert journal_path(path) in str(info.value) and str(path) in str(info.value)
    assert cli(["repair", str(path)]) == 1
    assert path.read_bytes() == backup  # nothing was replayed
    os.unlink(journal_path(path))  # as the error says
    check(path, 50)


def test_a_repair_restores_a_commit_that_died_while_writing_its_pages(tmp_path):
    """Pages HDF5 wrote in place are recognised by the crcs the journal listed first."""
    path = tmp_path / "f.h5"
    build(path, 0, 90, mode="w")
    before = path.read_bytes()
    die_mid_commit(path, "written")
    assert path.read_bytes()[: len(before)] != before
    assert repair(path) and path.read_bytes() == before


def test_a_journal_left_after_the_file_was_deleted(tmp_path, caplog):
    path = tmp_path / "f.h5"
    build(path, 0, 30, mode="w")
    die_mid_commit(path)
    path.unlink()
    build(path, 0, 20, mode="w")  # was FileNotFoundError: the journal is deleted, and says so
    assert "deleted the journal of a writer that died" in caplog.text
    assert not needs_repair(path) and ids(path) == sources(0, 20)
    die_mid_commit(path)
    path.rename(tmp_path / "moved.h5")
    with h5py.File(path, "w"):  # another file at the same path, by another program
        pass
    with pytest.raises(JournalError, match="written for another file"):
        h5m.TypedFile(path, mode="a")
    with pytest.raises(JournalError, match="written for another file"):
        h5m.TypedFile(path)


def plant(path, header_inode=None, records=((0, b"\0" * 4096),)) -> Path:
    st = os.stat(path)
    head = repair_module.HEADER.pack(
        repair_module.MAGIC, st.st_size, st.st_dev, header_inode or st.st_ino, 0
    )[:-4]
    data = head + repair_module.zlib.crc32(head).to_bytes(4, "little")
    for offset, page in records:
        data += repair_module.RECORD.pack(offset, len(page), repair_module._crc(page, offset))
        data += page
    journal = Path(journal_path(path))
    journal.write_bytes(data)
    return journal


def test_a_planted_journal_is_never_replayed(tmp_path):
    path = tmp_path / "f.h5"
    build(path, 0, 40, mode="w")
    original = path.read_bytes()
    plant(path)  # the right inode, but pages the file never held
    with pytest.raises(JournalError, match="neither its content before the commit"):
        h5m.TypedFile(path, mode="a")
    plant(path, header_inode=1)
    with pytest.raises(JournalError, match="written for another file"):
        h5m.TypedFile(path)
    journal = plant(path, records=[(0, original[:4096])])  # harmless content ...
    os.chown(journal, 4321, 4321)  # ... but another user's
    with pytest.raises(JournalError, match="belongs to user 4321"):
        repair(path)
    assert path.read_bytes() == original
    journal.unlink()
    check(path, 40)


def test_a_symlink_at_the_journal_path_is_never_followed(tmp_path):
    path = tmp_path / "f.h5"
    build(path, 0, 10, mode="w")
    target = tmp_path / "elsewhere"
    os.symlink(target, journal_path(path))  # dangling
    for commit in (lambda: build(path, 0, 20), lambda: repair(path), lambda: h5m.TypedFile(path)):
        with pytest.raises(JournalError, match="symbolic link"):
            commit()
    assert not target.exists()
    os.unlink(journal_path(path))
    assert ids(path) == sources(0, 10)


LATE_REPAIR = """
import os, sys, time
from h5dask import repair

path, go = sys.argv[1], sys.argv[2]
lock = repair._lock


def slow_lock(fd, filename):  # the window between opening the journal and locking it
    print("opened", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    lock(fd, filename)


repair._lock = slow_lock
print(repair.repair(path), flush=True)
"""


def test_a_late_repair_never_replays_an_old_journal_over_newer_commits(tmp_path):
    path = tmp_path / "f.h5"
    build(path, 0, 20, mode="w")
    die_mid_commit(path)
    go = tmp_path / "go"
    late = subprocess.Popen(
        [sys.executable, "-c", LATE_REPAIR, str(path), str(go)], stdout=subprocess.PIPE, text=True
    )
    assert late.stdout.readline().strip() == "opened"  # it holds the old journal open
    assert repair(path)  # a repair that was not late
    file = h5m.TypedFile(path, mode="a", schema=SCHEMA)
    for k in range(20, 60):  # 40 newer commits
        file.add(f"s{k:05d}", {"x": Rows().load(f"s{k:05d}")}).flush()
    go.touch()
    assert late.stdout.readline().strip() == "False"  # the journal it opened was gone
    assert late.wait() == 0
    check(path, 60)


SLOW_WRITER = """
import sys, time
import numpy as np
import h5dask as h5m
from h5dask import repair


class Rows(h5m.Feature):
    def load(self, source):
        i = int(source[1:])
        return np.full((i % 7 + 1, 8), i, dtype=np.float32)


flock = repair.flock


def slow_flock(fd, operation):  # widens any window between creating the journal and locking it
    time.sleep(0.005)
    return flock(fd, operation)


repair.flock = slow_flock
file = h5m.TypedFile(sys.argv[1], mode="w", schema={"x": Rows()})
for k in range(60):
    file.add(f"s{k:05d}", {"x": Rows().load(f"s{k:05d}")})
    file.flush()
"""


def test_a_reader_never_meets_an_unlocked_journal_of_a_live_writer(tmp_path):
    from h5dask.handle import journal_state

    path = tmp_path / "f.h5"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path)])
    states = []
    while writer.poll() is None:
        states.append(journal_state(str(path)))
    assert writer.wait() == 0
    assert "live" in states and "dead" not in states, sorted(set(states))
    check(path, 60)


@pytest.fixture
def read_only_folder(tmp_path):
    """A small tmpfs, remounted read-only by ``freeze()``."""
    folder = tmp_path / "media"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], check=True)
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_file_on_read_only_media_with_a_leftover_journal(tmp_path, read_only_folder, capsys):
    folder, freeze = read_only_folder
    path = folder / "f.h5"
    build(path, 0, 40, mode="w")
    before = path.read_bytes()
    die_mid_commit(path)
    freeze()
    with pytest.raises(FileFormatError, match="--to COPY.h5"):
        h5m.TypedFile(path)
    copy = tmp_path / "copy.h5"
    assert cli(["repair", str(path), "--to", str(copy)]) == 0
    assert "undid an unfinished commit (written to" in capsys.readouterr().out
    assert copy.read_bytes() == before
    check(copy, 40)
    assert needs_repair(path)  # the media are left as they are


def test_a_user_who_cannot_write_the_folder_gets_a_clear_error(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "f.h5"
    build(path, 0, 10, mode="w")
    subprocess.run(["chattr", "+i", str(folder)], check=True)  # even root cannot add a file
    try:
        with pytest.raises(ReadOnlyError, match="needs write access to the folder") as info:
            file = h5m.TypedFile(path, mode="a", schema=SCHEMA)  # the file itself is writable
            file.add("new", {"x": Rows().load("s1")}).flush()  # the writer lock says so first
        with pytest.raises(ReadOnlyError, match="needs write access to the folder") as journal:
            repair_module.JournaledFile(str(path))  # as does the journal of each commit
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert str(path) in str(info.value) and journal_path(path) in str(journal.value)
    assert ids(path) == sources(0, 10) and not needs_repair(path)


def test_an_unfinished_commit_is_repaired_on_the_next_open_and_the_cli_says_so(tmp_path):
    path = tmp_path / "f.h5"
    build(path, 0, 25, mode="w")
    die_mid_commit(path)
    out = subprocess.run(
        [sys.executable, "-m", "h5dask", "info", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "undid the unfinished commit" in out.stderr and str(path) in out.stderr
    assert not needs_repair(path)
    check(path, 25)


# -- power loss -----------------------------------------------------------------------------


class Recorder:
    """``os`` for h5dask.repair, recording each change a commit makes to files and folders.

    ``ops`` lists ``(kind, name, *args)``: ``write`` (offset, bytes), ``truncate``
    (length), ``sync``, ``link`` (the path, the file linked), ``unlink``. A file is
    named by its path, a journal by its path and a count (each commit makes a new
    one, with ``O_TMPFILE``, named once it is linked).
    """

    def __init__(self):
        self.ops: list[tuple] = []
        self.names: dict[int, str] = {}
        self.positions: dict[int, int] = {}
        self.journals = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, **kwargs):
        fd = os.open(path, flags, mode, **kwargs)
        self.names[fd] = f"tmp{fd}" if flags & os.O_TMPFILE == os.O_TMPFILE else os.fspath(path)
        self.positions[fd] = 0
        return fd

    def write(self, fd, data):
        n = os.write(fd, data)
        self.ops.append(("write", self.names[fd], self.positions[fd], bytes(data[:n])))
        self.positions[fd] += n
        return n

    def pwrite(self, fd, data, offset):
        n = os.pwrite(fd, data, offset)
        self.ops.append(("write", self.names[fd], offset, bytes(data[:n])))
        return n

    def ftruncate(self, fd, length):
        os.ftruncate(fd, length)
        self.ops.append(("truncate", self.names[fd], length))

    def fsync(self, fd):
        os.fsync(fd)
        self.ops.append(("sync", self.names[fd]))

    def link(self, src, dst, **kwargs):
        os.link(src, dst, **kwargs)
        old = f"tmp{src}" if str(src).isdigit() else os.fspath(src)
        new = f"{os.fspath(dst)}@{self.journals}"
        self.journals += 1
        self.ops = [(op[0], new if op[1] == old else op[1], *op[2:]) for op in self.ops]
        self.names = {fd: new if name == old else name for fd, name in self.names.items()}
        self.ops.append(("link", os.fspath(dst), new))

    def unlink(self, path, **kwargs):
        os.unlink(path, **kwargs)
        self.ops.append(("unlink", os.fspath(path)))


def crash_image(ops, cut, rng, data_file, start):
    """The file and its journal (None if there is none) after a power loss at ``cut``:
    what was synced is there; each later change is there or not, at random."""
    folder = os.path.dirname(data_file)
    last_sync = {op[1]: k for k, op in enumerate(ops[:cut]) if op[0] == "sync"}
    files = {data_file: bytearray(start)}
    linked = None
    for k, (kind, name, *args) in enumerate(ops[:cut]):
        synced = k < last_sync.get(folder if kind in ("link", "unlink") else name, -1)
        if kind == "sync" or (not synced and rng.random() < 0.5):
            continue  # lost in the power loss
        image = files.setdefault(name, bytearray())
        if kind == "write":
            offset, data = args
            image.extend(bytes(max(0, offset + len(data) - len(image))))
            image[offset : offset + len(data)] = data
        elif kind == "truncate":
            del image[args[0] :]
            image.extend(bytes(args[0] - len(image)))
        else:
            linked = args[0] if kind == "link" else None
    return bytes(files[data_file]), None if linked is None else bytes(files.get(linked, b""))


def test_power_loss_at_any_write_keeps_every_committed_id(tmp_path, monkeypatch):
    path = tmp_path / "f.h5"
    build(path, 0, 200, mode="w")
    file = h5m.TypedFile(path, mode="a", schema=SCHEMA)
    start = path.read_bytes()  # synced by the first commit
    recorder = Recorder()
    monkeypatch.setattr(repair_module, "os", recorder)
    ends = []  # per commit: the index of its last op, and the ids it committed
    for k in range(200, 260):
        file.add(f"s{k:05d}", {"x": Rows().load(f"s{k:05d}")})
        if k % 6 == 5:
            file.flush()
            ends.append((len(recorder.ops), k + 1))
    monkeypatch.undo()
    assert len(ends) == 10
    rng = random.Random(24)
    restored = set()
    for trial in range(80):
        cut = rng.randrange(len(recorder.ops) + 1)
        committed = max([n for end, n in ends if end <= cut], default=200)
        data, journal = crash_image(recorder.ops, cut, rng, str(path), start)
        with open(path, "r+b") as f:  # in place: the file keeps its inode, as after a reboot
            f.write(data)
            f.truncate()
        if os.path.lexists(journal_path(path)):
            os.unlink(journal_path(path))
        if journal is not None:
            Path(journal_path(path)).write_bytes(journal)
        restored.add(repair(path))
        got = ids(path)
        assert got[:committed] == sources(0, committed), f"image {trial} cut at {cut}"
        check(path, committed)
    assert restored == {True, False}  # images with and without a journal


# -- cleanup and exposure -------------------------------------------------------------------


SPILLING_BUILD = """
import sys, time
import numpy as np
import h5dask as h5m


class Big(h5m.Feature):
    def load(self, source):
        time.sleep(0.05)
        return np.ones((64, 1024), dtype=np.float32)  # 256 KiB: spilled to /dev/shm


if __name__ == "__main__":
    print("start", flush=True)
    h5m.TypedFile.create(sys.argv[1], [f"s{i}" for i in range(400)], schema={"x": Big()},
                         scheduler="processes", n_workers=2, progress=False)
"""


def spill_folders(pid) -> list[str]:
    return [p for p in os.listdir("/dev/shm") if p.startswith(f"h5dask-{pid}-")]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_later_build_removes_the_spill_folders_of_killed_builds(tmp_path, sig):
    script = tmp_path / "spilling.py"
    script.write_text(SPILLING_BUILD)
    build_process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "s.h5")], stdout=subprocess.PIPE, text=True
    )
    assert build_process.stdout.readline().strip() == "start"
    deadline = time.monotonic() + 60
    while not spill_folders(build_process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert spill_folders(build_process.pid), "the build made no spill folder to leave"
    children = psutil.Process(build_process.pid).children(recursive=True)
    build_process.send_signal(sig)
    build_process.wait()
    for child in children:  # the pool's workers, orphaned: stopped as a user would
        with contextlib.suppress(psutil.NoSuchProcess):  # or gone with their parent
            child.kill()
    psutil.wait_procs(children, timeout=10)
    # (any build of h5dask on this machine, such as a colleague's test run, may remove it now)
    build(tmp_path / "later.h5", 0, 5, mode="w")  # any later build
    assert not spill_folders(build_process.pid)


def test_a_spill_folder_that_vanishes_mid_build_is_a_clear_error(tmp_path):
    folder = tmp_path / "spill"
    folder.mkdir()
    spilled = engine.Spilled.write(str(folder), [np.ones((4, 4))])
    shutil.rmtree(folder)
    with pytest.raises(H5DaskError, match="spilled to .* are gone: its folder was deleted"):
        spilled.take()
    assert engine.Spilled.write(str(folder), [np.ones((4, 4))]) is None  # sent instead


def test_the_embedded_clusters_dashboard_listens_on_the_loopback_only():
    with engine._embedded_cluster(1) as client:
        listening = [
            c.laddr.ip
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert "127.0.0.1" in client.dashboard_link
    assert listening and set(listening) <= {"127.0.0.1", "::1"}, listening
