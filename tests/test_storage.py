"""Tenant storage on a real directory: round trips, every way out of the sandbox refused,
tenants kept apart, limits enforced, concurrent appends intact."""

from __future__ import annotations

import os
import threading

import pytest

from llmos.errors import InvalidRequestError
from llmos.kernel.storage import NotFound, PathEscape, QuotaExceeded, TenantStorage


@pytest.fixture
def fs(tmp_path):
    return TenantStorage(tmp_path / "store")


def test_write_read_round_trip_creates_parents_and_replaces(fs):
    fs.write("alice", "notes/2024/a.txt", b"one")
    assert fs.read("alice", "notes/2024/a.txt") == b"one"
    fs.write("alice", "./notes//2024/./a.txt", b"two")
    assert fs.read("alice", "notes/2024/a.txt") == b"two"
    assert (fs.root / "alice" / "notes" / "2024" / "a.txt").read_bytes() == b"two"
    fs.write("alice", "empty", b"")
    assert fs.read("alice", "empty") == b""


def test_append_creates_then_extends(fs):
    fs.append("alice", "log/run.txt", b"a\n")
    fs.append("alice", "log/run.txt", bytearray(b"b\n"))
    assert fs.read("alice", "log/run.txt") == b"a\nb\n"


def test_list_and_stat(fs):
    assert fs.list("alice") == []
    fs.write("alice", "b.txt", b"12345")
    fs.write("alice", "a/x.txt", b"1")
    listing = fs.list("alice")
    assert [(e["name"], e["type"], e["size"]) for e in listing] == [("a", "dir", 0), ("b.txt", "file", 5)]
    assert all(isinstance(e["mtime"], float) for e in listing)
    assert [e["name"] for e in fs.list("alice", "a")] == ["x.txt"]
    st = fs.stat("alice", "./a//x.txt")
    assert (st["path"], st["type"], st["size"]) == ("a/x.txt", "file", 1)
    assert fs.stat("alice", "a")["type"] == "dir"
    assert fs.stat("alice", "")["type"] == "dir"
    with pytest.raises(NotFound, match="'nope'"):
        fs.list("alice", "nope")
    with pytest.raises(InvalidRequestError, match="not a directory"):
        fs.list("alice", "b.txt")
    with pytest.raises(NotFound):
        fs.stat("alice", "a/nope.txt")


def test_writes_leave_no_temporary_files_in_the_tenant(fs):
    for i in range(5):
        fs.write("alice", "f", b"x" * i)
    assert [e["name"] for e in fs.list("alice")] == ["f"]
    assert fs.usage("alice") == 4


def test_delete(fs):
    fs.write("alice", "d/f.txt", b"x")
    with pytest.raises(InvalidRequestError, match="not empty"):
        fs.delete("alice", "d")
    fs.delete("alice", "d/f.txt")
    with pytest.raises(NotFound, match=r"path: no such file 'd/f.txt'"):
        fs.read("alice", "d/f.txt")
    fs.delete("alice", "d")
    assert fs.list("alice") == []
    with pytest.raises(NotFound):
        fs.delete("alice", "d")
    with pytest.raises(PathEscape):
        fs.delete("alice", "")


def test_directories_are_not_files(fs):
    fs.write("alice", "d/f", b"x")
    with pytest.raises(InvalidRequestError, match="is a directory"):
        fs.read("alice", "d")
    with pytest.raises(InvalidRequestError, match="is a directory"):
        fs.write("alice", "d", b"x")
    with pytest.raises(InvalidRequestError, match="is a directory"):
        fs.append("alice", "d", b"x")
    with pytest.raises(InvalidRequestError, match="parent of it is a file"):
        fs.write("alice", "d/f/g", b"x")
    with pytest.raises(NotFound):
        fs.read("alice", "d/f/g")
    assert fs.read("alice", "d/f") == b"x"


def test_normalize():
    n = TenantStorage.normalize
    assert n("a/./b") == "a/b"
    assert n("./x") == "x"
    assert n("a//b/") == "a/b"
    assert n("") == n(".") == n("./") == ""
    for bad in ("..", "../x", "a/../b", "a/..", "/etc/passwd", "/", "a\0b", "x" * 1025, None, b"x"):
        with pytest.raises(PathEscape):
            n(bad)
    assert n("x" * 1024) == "x" * 1024


@pytest.mark.parametrize("path", ["/etc/passwd", "../bob/secret", "a/../../bob/secret", "..", "a\0", "", ".",
                                  "x" * 1025])
def test_escapes_are_refused_by_every_call(fs, path):
    fs.write("bob", "secret", b"s")
    for op in (lambda: fs.read("alice", path), lambda: fs.write("alice", path, b"x"),
               lambda: fs.append("alice", path, b"x"), lambda: fs.delete("alice", path)):
        with pytest.raises(PathEscape, match="path: "):
            op()
    assert fs.read("bob", "secret") == b"s"
    assert fs.usage("alice") == 0


def test_a_symlink_to_etc_is_refused(fs):
    fs.write("alice", "ok", b"x")
    os.symlink("/etc", fs.root / "alice" / "etc")
    os.symlink("/etc/hostname", fs.root / "alice" / "host")
    for path in ("etc/hostname", "etc", "host"):
        with pytest.raises(PathEscape, match="escapes the tenant's storage"):
            fs.read("alice", path)
        with pytest.raises(PathEscape):
            fs.stat("alice", path)
    with pytest.raises(PathEscape):
        fs.list("alice", "etc")
    with pytest.raises(PathEscape):
        fs.write("alice", "etc/llmos-test", b"x")
    assert not os.path.exists("/etc/llmos-test")
    assert [e["name"] for e in fs.list("alice")] == ["ok"]     # the links are not even listed


def test_a_symlink_into_another_tenant_is_refused(fs):
    fs.write("bob", "private/key", b"bob's")
    fs.write("alice", "mine", b"")
    os.symlink(fs.root / "bob" / "private", fs.root / "alice" / "peek")
    os.symlink("../bob/private/key", fs.root / "alice" / "relative")
    assert (fs.root / "alice" / "relative").read_bytes() == b"bob's"     # the link really leads there
    for path in ("peek/key", "relative"):
        with pytest.raises(PathEscape):
            fs.read("alice", path)
        with pytest.raises(PathEscape):
            fs.write("alice", path, b"overwritten")
        with pytest.raises(PathEscape):
            fs.delete("alice", path)
    assert fs.read("bob", "private/key") == b"bob's"


def test_a_symlink_that_stays_inside_the_tenant_works(fs):
    fs.write("alice", "real/data.txt", b"d")
    os.symlink("real", fs.root / "alice" / "alias")
    assert fs.read("alice", "alias/data.txt") == b"d"
    fs.delete("alice", "alias")                                # removes the link, not what it points to
    assert fs.read("alice", "real/data.txt") == b"d"


def test_tenants_are_isolated(fs):
    fs.write("alice", "x", b"alice")
    fs.write("bob", "x", b"bob")
    assert fs.read("alice", "x") == b"alice" and fs.read("bob", "x") == b"bob"
    fs.delete("bob", "x")
    assert fs.read("alice", "x") == b"alice"
    with pytest.raises(NotFound):
        fs.read("carol", "x")
    assert fs.usage("alice") == 5 and fs.usage("carol") == 0


@pytest.mark.parametrize("tenant", ["", ".hidden", "..", "a/b", "a b", "x" * 129, None, ".tmp"])
def test_tenant_names_are_validated(fs, tenant):
    with pytest.raises(InvalidRequestError, match="tenant"):
        fs.write(tenant, "x", b"x")


def test_data_must_be_bytes(fs):
    with pytest.raises(InvalidRequestError, match="data"):
        fs.write("alice", "x", "text")


def test_per_file_limit_and_tenant_quota(tmp_path):
    fs = TenantStorage(tmp_path, max_file_bytes=10, quota_bytes=25)
    with pytest.raises(QuotaExceeded, match="per-file"):
        fs.write("alice", "big", b"x" * 11)
    fs.write("alice", "a", b"x" * 10)
    with pytest.raises(QuotaExceeded, match="per-file"):
        fs.append("alice", "a", b"x")
    fs.write("alice", "b", b"x" * 10)
    with pytest.raises(QuotaExceeded, match="quota"):
        fs.write("alice", "c", b"x" * 6)
    with pytest.raises(QuotaExceeded, match="quota"):
        fs.append("alice", "c", b"x" * 6)
    fs.write("alice", "a", b"y" * 10)                          # replacing counts the old size out
    fs.write("alice", "c", b"x" * 5)
    assert fs.usage("alice") == 25
    assert fs.read("alice", "a") == b"y" * 10
    fs.write("bob", "a", b"x" * 10)                            # the quota is per tenant
    fs.delete("alice", "c")
    fs.append("alice", "c", b"x" * 5)
    assert fs.usage("alice") == 25


def test_concurrent_appends_never_interleave(fs):
    threads, lines = 8, 200

    def writer(t):
        for i in range(lines):
            fs.append("alice", "log.txt", f"thread {t} line {i} {'x' * 100}\n".encode())

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    got = fs.read("alice", "log.txt").decode().splitlines()
    assert len(got) == threads * lines
    assert sorted(got) == sorted(f"thread {t} line {i} {'x' * 100}" for t in range(threads) for i in range(lines))


def test_leftover_temporary_files_are_cleared_on_start(tmp_path):
    TenantStorage(tmp_path)
    (tmp_path / ".tmp" / "torn-write").write_bytes(b"half")
    fs = TenantStorage(tmp_path)
    assert list((tmp_path / ".tmp").iterdir()) == []
    fs.write("alice", "x", b"x")
    assert fs.read("alice", "x") == b"x"
