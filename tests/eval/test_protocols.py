"""The shipped evaluation protocols: which one runs in the embedded toy world is the protocol file's to say."""

from safeprune.eval.protocols import PROTOCOLS, in_toy_world


def test_only_the_toy_protocol_runs_in_the_toy_world():
    assert {p: in_toy_world(p) for p in PROTOCOLS} == {"coco": False, "nudity": False, "styles": False, "toy": True}
    assert in_toy_world(None) and not in_toy_world("no-such-protocol")  # None: a results.json without a protocol
