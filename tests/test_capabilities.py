"""Capabilities: the vocabulary, what each family lets a process do, and that a child can
never be granted more than its parent."""

from __future__ import annotations

import itertools
from fnmatch import fnmatchcase

import pytest

from llmos.errors import InvalidRequestError
from llmos.kernel.capabilities import ALL, Capabilities, PermissionDenied, glob_covers, parse, required_for


def caps(*c: str) -> Capabilities:
    return Capabilities(list(c))


def allowed(c: Capabilities, call: str, **args) -> bool:
    try:
        c.check(7, call, **args)
        return True
    except PermissionDenied:
        return False


# -- the vocabulary ---------------------------------------------------------------------------
def test_parse_accepts_the_vocabulary_canonicalises_paths_and_drops_duplicates():
    given = ["llm", "msg", "msg:send:worker-*", "msg:topic:news.*", "proc:spawn", "fs:read:./data//*",
             "fs:write:out/*", "tool:web.*", "mem", "llm"]
    assert parse(given) == ("llm", "msg", "msg:send:worker-*", "msg:topic:news.*", "proc:spawn", "fs:read:data/*",
                            "fs:write:out/*", "tool:web.*", "mem")
    assert parse(list(ALL)) == ALL


@pytest.mark.parametrize("bad, named", [
    ("llm", "list"),                          # a bare string, not a list
    (["llm", ""], "''"),
    (["llm", 3], "3"),
    (["network"], "'network'"),
    (["msg:recv"], "'msg:recv'"),             # granted only through other msg capabilities
    (["fs:read"], "'fs:read'"),
    (["fs:read:"], "'fs:read:'"),
    (["tool:"], "'tool:'"),
    (["msg:send"], "'msg:send'"),
    (["fs:read:."], "'fs:read:.'"),
    (["fs:read:/etc/*"], "'fs:read:/etc/*'"),
    (["fs:write:../*"], "'fs:write:../*'"),
    (["fs:write:data/../../x"], "'fs:write:data/../../x'"),
    (["proc:spawn:x"], "'proc:spawn:x'"),
])
def test_parse_refuses_malformed_capabilities_naming_the_bad_one(bad, named):
    with pytest.raises(InvalidRequestError, match="capabilities") as e:
        parse(bad)
    assert named in str(e.value)


def test_capabilities_are_an_immutable_value():
    a = caps("llm", "fs:read:./x/*", "llm")
    assert list(a) == ["fs:read:x/*", "llm"] and len(a) == 2
    assert a == caps("fs:read:x/*", "llm") and hash(a) == hash(caps("fs:read:x/*", "llm"))
    with pytest.raises(AttributeError):
        a.caps = ("mem",)


# -- each family, allowed and denied ----------------------------------------------------------
def test_llm():
    for call in ("llm.chat", "llm.generate", "llm.embed"):
        assert allowed(caps("llm"), call)
        assert not allowed(caps("mem", "msg", "fs:read:*"), call)


def test_msg_send_matches_the_target_name():
    c = caps("msg:send:worker-*")
    assert allowed(c, "msg.send", to="worker-3")
    assert not allowed(c, "msg.send", to="boss")
    assert not allowed(c, "msg.publish", topic="worker-3")
    assert allowed(caps("msg"), "msg.send", to="anyone")
    assert not allowed(caps("llm"), "msg.send", to="worker-3")


def test_msg_topic_covers_publish_subscribe_unsubscribe():
    c = caps("msg:topic:news.*")
    for call in ("msg.publish", "msg.subscribe", "msg.unsubscribe"):
        assert allowed(c, call, topic="news.sport")
        assert not allowed(c, call, topic="alerts")
        assert allowed(caps("msg"), call, topic="alerts")
    assert not allowed(c, "msg.send", to="news.sport")


def test_own_mailbox_needs_some_msg_capability():
    for granted in (("msg",), ("msg:send:boss",), ("msg:topic:news",)):
        assert allowed(caps(*granted), "msg.recv")
        assert allowed(caps(*granted), "msg.ack")
    assert not allowed(caps("llm", "fs:read:*", "proc:spawn"), "msg.recv")
    assert not allowed(caps(), "msg.ack")


def test_proc_spawn_and_the_calls_that_need_no_capability():
    assert allowed(caps("proc:spawn"), "proc.spawn")
    assert not allowed(caps("llm", "msg"), "proc.spawn")
    for call in ("proc.wait", "proc.kill", "proc.suspend", "proc.resume", "proc.renice", "proc.ps", "proc.self",
                 "proc.exit"):
        assert required_for(call) is None
        assert allowed(caps(), call)


def test_fs_read_and_write_are_separate():
    r, w = caps("fs:read:data/*"), caps("fs:write:data/*")
    for call in ("fs.read", "fs.stat"):
        assert allowed(r, call, path="data/a.txt") and not allowed(w, call, path="data/a.txt")
    for call in ("fs.write", "fs.append", "fs.delete"):
        assert allowed(w, call, path="data/a.txt") and not allowed(r, call, path="data/a.txt")


def test_fs_globs_match_across_slashes_but_stay_in_their_directory():
    c = caps("fs:read:data/*")
    assert allowed(c, "fs.read", path="data/x")
    assert allowed(c, "fs.read", path="data/sub/y")
    assert allowed(c, "fs.read", path="./data//sub/./y")       # normalised before the check
    for path in ("datax", "data", "other/data/x", "x/data/y"):
        assert not allowed(c, "fs.read", path=path), path
    with pytest.raises(InvalidRequestError):
        required_for("fs.read", path="data/../secret")


def test_fs_list_of_a_directory_is_granted_by_a_glob_over_its_contents():
    c = caps("fs:read:data/*")
    assert required_for("fs.list", path="./data/") == "fs:read:data/"
    assert allowed(c, "fs.list", path="data")
    assert allowed(c, "fs.list", path="data/sub")
    assert not allowed(c, "fs.list", path="")                  # the tenant's root
    assert not allowed(caps("fs:read:data"), "fs.list", path="data")
    assert allowed(caps("fs:read:*"), "fs.list", path="")


def test_tool_and_mem():
    assert caps("tool:web.*").allows("tool:web.search")
    assert not caps("tool:web.*").allows("tool:shell")
    assert caps("mem").allows("mem")
    assert not caps("llm", "msg").allows("mem")


def test_permission_denied_says_who_lacks_what():
    with pytest.raises(PermissionDenied) as e:
        caps("fs:write:tmp/*").check(7, "fs.write", path="out/x.txt")
    assert e.value.capability == "fs:write:out/x.txt"
    assert e.value.call == "fs.write"
    assert str(e.value) == "fs.write denied: process 7 lacks capability fs:write:out/x.txt"


def test_required_for_refuses_unknown_calls_and_missing_arguments():
    with pytest.raises(InvalidRequestError, match="fs.chmod"):
        required_for("fs.chmod", path="x")
    with pytest.raises(InvalidRequestError, match="'to'"):
        required_for("msg.send")
    with pytest.raises(InvalidRequestError, match="'topic'"):
        required_for("msg.publish", topic="")
    with pytest.raises(InvalidRequestError, match="path"):
        required_for("fs.read", path="/etc/passwd")


# -- a child gets at most its parent's capabilities -------------------------------------------
@pytest.mark.parametrize("parent, child", [
    (["fs:read:data/*"], ["fs:read:data/*"]),
    (["fs:read:*"], ["fs:read:data/*"]),
    (["fs:read:data/*"], ["fs:read:data/sub/*"]),
    (["fs:read:data/*"], ["fs:read:data/a.txt"]),
    (["fs:read:data*"], ["fs:read:data/x?.txt"]),
    (["msg"], ["msg", "msg:send:w*", "msg:topic:news"]),
    (["msg:send:w*"], ["msg:send:worker-[0-9]"]),
    (["tool:*"], ["tool:web.search"]),
    (list(ALL), list(ALL)),
    (["llm"], []),
])
def test_covers_a_narrower_child(parent, child):
    assert Capabilities(parent).covers(Capabilities(child))
    assert Capabilities(parent).missing(Capabilities(child)) == []


@pytest.mark.parametrize("parent, child", [
    (["fs:read:data/*"], ["fs:read:*"]),                 # the sneaky widening
    (["fs:read:data/*"], ["fs:read:data*"]),             # would reach datax
    (["fs:read:data/*"], ["fs:read:dat?/x"]),            # would reach datb/x
    (["fs:read:data/*"], ["fs:read:data"]),
    (["fs:read:*"], ["fs:write:x"]),
    (["fs:write:*"], ["fs:read:x"]),
    (["msg:send:w*"], ["msg"]),                          # msg reaches every peer and topic
    (["msg:send:w*"], ["msg:topic:w1"]),
    (["msg:send:w*"], ["msg:send:*"]),
    (["msg:send:w*"], ["msg:send:[wx]1"]),
    (["tool:web.*"], ["tool:*"]),
    (["llm"], ["mem"]),
    (["llm"], ["proc:spawn"]),
])
def test_refuses_a_wider_child(parent, child):
    assert not Capabilities(parent).covers(Capabilities(child))


def test_missing_lists_what_the_parent_lacks():
    parent = caps("llm", "fs:read:data/*", "msg:send:w*")
    child = caps("llm", "fs:read:*", "fs:read:data/a", "msg", "proc:spawn")
    assert parent.missing(child) == ["fs:read:*", "msg", "proc:spawn"]
    assert caps(*ALL).covers(child)


def test_glob_covers_never_claims_more_than_is_true():
    """Every yes of glob_covers is checked against every string up to length 4 over the
    characters its patterns use; a wrong yes would let a child widen its authority."""
    patterns = ["*", "a*", "a/*", "a/b*", "ab", "a/b", "a?", "a/?", "?b", "*b", "a*b", "[ab]*", "a[/]*", "[!a]*",
                "a/[b]", "**", "a/*/b", "a/b/*", "b*", "a/"]
    strings = ["".join(p) for n in range(5) for p in itertools.product("ab/", repeat=n)]
    yes = 0
    for wide, narrow in itertools.product(patterns, repeat=2):
        if glob_covers(wide, narrow):
            yes += 1
            assert all(fnmatchcase(s, wide) for s in strings if fnmatchcase(s, narrow)), (wide, narrow)
    assert yes > len(patterns)      # it is not refusing everything
