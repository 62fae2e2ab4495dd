"""Replacements parsed once: renaming gives exactly what `re.sub` gives, and a used recipe still pickles."""

from __future__ import annotations

import pickle
import re

import pytest

from ckptx.ops.keys import RenameRule
from ckptx.rules.templates import compile_template

CASES = [
    (r"^model\.layers\.(\d+)\.", r"blocks.\1.", "model.layers.12.attn.weight"),
    (r"^(?P<stage>\w+)\.(\d+)\.", r"\g<stage>_\2_\g<0>.", "stages.3.conv.bias"),
    (r"(a)|(b)", r"[\1\2]", "cab.ab"),
    (r"\.", r"\\", "a.b.c"),
    (r"^x", r"tab\there", "xyz"),
    (r"^norm", "ln", "norm.weight"),
]


@pytest.mark.parametrize(("pattern", "replacement", "key"), CASES)
def test_rename_row_gives_what_re_sub_gives(pattern: str, replacement: str, key: str) -> None:
    compiled = re.compile(pattern)
    row = RenameRule(compiled, replacement, "here", compile_template(replacement, compiled))
    assert row.apply(key) == compiled.sub(replacement, key)


def test_a_rename_row_pickles_after_it_was_used() -> None:
    compiled = re.compile(r"^layer(\d+)\.")
    row = RenameRule(compiled, r"stages.\1.", "here", compile_template(r"stages.\1.", compiled))
    assert row.apply("layer2.w") == "stages.2.w"
    copy = pickle.loads(pickle.dumps(row))
    assert copy.apply("layer7.b") == "stages.7.b"


def test_parsed_replacements_fill_and_fail_exactly_as_re_sub() -> None:
    """ckptx parses `re` replacement strings itself (no private `re` API); fuzzed against `re.sub`."""
    import random

    from ckptx.errors import TemplateError
    from ckptx.rules.templates import Replacement, parse_replacement

    pattern = re.compile(r"(?P<a>x)(y)?(z)")
    rng = random.Random(5)
    pieces = ["\\", "1", "2", "9", "g", "<", "a", ">", "0", "7", "n", "x", ".", "q"]
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 7)))
        try:
            want: tuple = ("ok", pattern.sub(text, "xzxyz"))
        except (re.error, IndexError):
            want = ("error",)
        try:
            got: tuple = ("ok", pattern.sub(Replacement(parse_replacement(text, pattern)), "xzxyz"))
        except TemplateError:
            got = ("error",)
        assert got == want, text
