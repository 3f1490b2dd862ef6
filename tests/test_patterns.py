from __future__ import annotations

import numpy as np
import pytest

from ksmbench.scenario.patterns import (PAGE_SIZE, FillId, content_keys, fill_pages, key_bytes,
                                        parse_pattern)

FILL = FillId("s", 3)


def test_parse_patterns():
    assert parse_pattern("zero").kind == "zero"
    assert parse_pattern("unique").kind == "unique"
    t = parse_pattern("tag:abc")
    assert (t.kind, t.name) == ("tag", "abc")
    c = parse_pattern("cycle:abc:5")
    assert (c.kind, c.name, c.k) == ("cycle", "abc", 5)
    for bad in ("Zero", "tag:", "cycle:a", "cycle:a:x", "random", "", None):
        with pytest.raises(ValueError):
            parse_pattern(bad)


@pytest.mark.parametrize("text", ["zero", "unique", "tag:t", "cycle:c:3"])
def test_bytes_agree_with_content_keys(text):
    pat = parse_pattern(text)
    pages = fill_pages(pat, 7, FILL)
    keys = content_keys(pat, 7, FILL)
    for i in range(7):
        assert pages[i].tobytes() == key_bytes(keys[i]), i


def test_chunks_equal_the_whole():
    for text in ("unique", "cycle:c:5"):
        pat = parse_pattern(text)
        whole = fill_pages(pat, 23, FILL)
        parts = np.concatenate([fill_pages(pat, 10, FILL, offset=0),
                                fill_pages(pat, 13, FILL, offset=10)])
        assert np.array_equal(whole, parts)


def test_contract_properties():
    tag_a = fill_pages(parse_pattern("tag:a"), 3, FILL)
    assert all(tag_a[i].tobytes() == tag_a[0].tobytes() for i in range(3))
    assert tag_a[0].any()  # never all-zero
    # same tag, different fill: same bytes; different tags differ
    assert fill_pages(parse_pattern("tag:a"), 1, FillId("other", 9))[0].tobytes() == tag_a[0].tobytes()
    assert fill_pages(parse_pattern("tag:b"), 1, FILL)[0].tobytes() != tag_a[0].tobytes()
    uniq = fill_pages(parse_pattern("unique"), 50, FILL)
    other = fill_pages(parse_pattern("unique"), 50, FillId("s", 4))
    rows = {r.tobytes() for r in np.concatenate([uniq, other])}
    assert len(rows) == 100 and all(any(r) for r in rows)
    assert not fill_pages(parse_pattern("zero"), 2, FILL).any()
    cyc = fill_pages(parse_pattern("cycle:n:3"), 7, FILL)
    assert cyc[0].tobytes() == cyc[3].tobytes() == cyc[6].tobytes() != cyc[1].tobytes()
    assert cyc[1].tobytes() == fill_pages(parse_pattern("tag:n#1"), 1, FILL)[0].tobytes()
    assert cyc.shape == (7, PAGE_SIZE)
