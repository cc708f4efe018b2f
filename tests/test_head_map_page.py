"""The Head map page through AppTest, on the tiny app of the page tests (``tiny``, ``lm``: conftest.py)."""

from __future__ import annotations

from analysis.head_map import DEFAULT_CLUSTERS, DEFAULT_METRICS, cached_head_map
from analysis.mask_files import parse_mask
from tests.helpers import ok, open_page, windows
from ui import session


def test_head_map_page_prunes_and_keeps_a_whole_cluster(tiny, lm):
    at = ok(open_page("app_pages/5_Head_map.py", tiny).run())
    calib = windows(lm, tiny[session.CALIB_TEXT])
    expected = cached_head_map(lm, calib, DEFAULT_METRICS, DEFAULT_CLUSTERS, 0)
    table = at.dataframe[0].value  # one column per cluster, one row per feature (so that it fits the page)
    sizes = table.set_index("feature").loc["heads"]
    assert sizes.tolist() == [expected.clusters.count(k) for k in sorted(set(expected.clusters))]
    assert list(sizes.index) == [f"cluster {k}" for k in sorted(set(expected.clusters))]
    members = [h for h, c in zip(expected.heads, expected.clusters, strict=True) if c == 0]

    ok(at.multiselect(key="map_clusters").set_value([0]).run())
    ok(at.button[0].click().run())  # "Prune these heads"
    mask = parse_mask(at.session_state[session.MASK], lm.shape, lm.name)
    pruned = [
        (layer, head)
        for layer in range(lm.shape.num_layers)
        for head in range(lm.shape.num_heads)
        if not mask.heads[layer][head]
    ]
    assert pruned == members
    ok(at.button[1].click().run())  # "Keep these heads"
    assert parse_mask(at.session_state[session.MASK], lm.shape, lm.name).is_unpruned
