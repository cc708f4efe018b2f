"""The v1 mask JSON contract (shared/docs/protocol.md) and the budget a mask saves (method.md, Accounting).

Every expected budget number is derived by hand below from the model shape, never read back from the
code under test.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from dataclasses import replace
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from analysis.architecture import ModelShape
from analysis.budget import budget
from analysis.errors import HeadroomError
from analysis.mask_files import load_mask, parse_mask
from analysis.mask_links import mask_from_query, mask_to_query
from analysis.masks import Mask

NAME = "SmolLM2-135M-Instruct"
SMOL = ModelShape(
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    hidden_size=576,
    qkv_bias=False,
    o_bias=False,
    qk_norm_params_per_layer=0,
    total_params=134_515_008,
    bytes_per_element=4,
)
# Weights of one head's q (or k, or v) rows, and equally of one head's o_proj columns: head_dim * hidden.
W = 64 * 576  # = 36,864
# Unpruned attention of one SmolLM2 layer, by hand:
LAYER_PARAMS = (9 + 3 + 3 + 9) * W  # q: 9 heads, k: 3 KV heads, v: 3 KV heads, o: 9 heads = 884,736
LAYER_KV = 2 * 3 * 64 * 4  # K and V, 3 KV heads, head_dim 64, 4 bytes = 1,536 bytes per token
GROUP_KV = 2 * 64 * 4  # K and V of one KV group = 512 bytes per token


def layer_flops(seqlen: int) -> int:
    """FLOPs per token of one unpruned SmolLM2 attention layer (a multiply-add counts 2)."""
    projections = 2 * (9 + 3 + 3 + 9) * W  # q, k, v, o
    scores_and_values = 2 * 2 * 9 * 64 * seqlen  # q.k and p.v for 9 heads over seqlen positions
    return projections + scores_and_values


def example() -> dict:
    """The protocol's example mask, with its elided rows written out."""
    return {
        "format": "headroom.mask",
        "version": 1,
        "model": {"name": NAME, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3},
        "heads": [[1] * 9 for _ in range(30)],
        "drop_qk": [26, 27, 28, 29],
        "alpha": {"26": 0.2, "27": 0.8, "28": 0.4, "29": 0.5},
        "note": "free text",
    }


def unpruned() -> Mask:
    return Mask.unpruned(SMOL, NAME)


def parse(obj) -> Mask:
    return parse_mask(obj, SMOL, NAME)


# --- JSON round trip ------------------------------------------------------------------------------


def test_to_json_uses_the_protocol_field_names():
    mask = unpruned().with_head(2, 4, False).with_layer(29, drop_qk=True, alpha=0.5)
    mask = replace(mask, note="hello")
    out = mask.to_json()
    assert set(out) == {"format", "version", "model", "heads", "drop_qk", "alpha", "note"}
    assert out["format"] == "headroom.mask"
    assert out["version"] == 1
    assert out["model"] == {"name": NAME, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3}
    assert len(out["heads"]) == 30 and all(len(row) == 9 for row in out["heads"])
    assert out["heads"][2] == [1, 1, 1, 1, 0, 1, 1, 1, 1]
    assert all(v in (0, 1) and type(v) is int for row in out["heads"] for v in row)
    assert out["drop_qk"] == [29]
    assert out["alpha"] == {"29": 0.5}  # layers at 1.0 are left out, keys are strings
    assert out["note"] == "hello"
    json.dumps(out, allow_nan=False)  # plain JSON


def test_save_then_load_round_trips(tmp_path):
    mask = (
        unpruned()
        .with_head(0, 0, False)
        .with_head(0, 1, False)
        .with_head(17, 8, False)
        .with_layer(26, drop_qk=True, alpha=0.2)
        .with_layer(29, drop_qk=True, alpha=0.0)
        .with_layer(5, alpha=1.5)
    )
    mask = replace(mask, note="round trip", fingerprint="abc123")
    path = tmp_path / "sub" / "mask.json"
    mask.save(path)
    loaded = load_mask(path, SMOL, "some other name")
    assert loaded == mask
    assert loaded.model_name == NAME  # the file's name wins over the caller's default
    assert loaded.fingerprint == "abc123"
    assert loaded.note == "round trip"
    assert loaded.to_json() == mask.to_json()
    assert json.loads(path.read_text(encoding="utf-8")) == mask.to_json()
    assert [p.name for p in path.parent.iterdir()] == ["mask.json"]  # no temporary file left


def test_unpruned_mask_round_trips(tmp_path):
    path = tmp_path / "mask.json"
    unpruned().save(path)
    loaded = load_mask(path, SMOL, NAME)
    assert loaded.is_unpruned
    assert loaded == unpruned()


# --- parsing valid files --------------------------------------------------------------------------


def test_protocol_example_parses():
    mask = parse(example())
    assert mask.model_name == NAME
    assert mask.num_layers == 30
    assert mask.drop_qk == frozenset({26, 27, 28, 29})
    assert mask.alpha[26:] == (0.2, 0.8, 0.4, 0.5)
    assert mask.alpha[:26] == (1.0,) * 26  # missing layers are 1.0
    assert mask.pruned_heads == 0
    assert mask.note == "free text"
    assert mask.layer(27).drop_qk and not mask.layer(25).drop_qk


def test_heads_may_be_omitted():
    obj = example()
    del obj["heads"]
    mask = parse(obj)
    assert mask.heads == ((True,) * 9,) * 30


def test_minimal_file_is_unpruned():
    mask = parse({"format": "headroom.mask", "version": 1})
    assert mask.is_unpruned
    assert mask.alpha == (1.0,) * 30


def test_alpha_bounds_are_inclusive_and_ints_are_numbers():
    obj = example()
    obj["alpha"] = {"0": 0, "1": 4, "2": 4.0, "3": 0.0}
    mask = parse(obj)
    assert mask.alpha[:5] == (0.0, 4.0, 4.0, 0.0, 1.0)
    assert all(type(a) is float for a in mask.alpha)


def test_parse_reads_pruned_heads():
    obj = example()
    obj["heads"][3] = [1, 0, 1, 1, 1, 1, 1, 1, 0]
    mask = parse(obj)
    assert mask.heads[3] == (True, False, True, True, True, True, True, True, False)
    assert mask.pruned_heads == 2


# --- rejected files -------------------------------------------------------------------------------


def _set(path: tuple, value):
    def edit(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete_heads_row(obj):
    obj["heads"].pop()


INVALID = {
    "format": (_set(("format",), "headroom.mask2"), "'format' must be \"headroom.mask\", got 'headroom.mask2'"),
    "format-missing": (lambda obj: obj.pop("format"), "'format' must be \"headroom.mask\", got None"),
    "version": (_set(("version",), 3), "'version' must be 1 or 2, got 3"),
    "version-string": (_set(("version",), "1"), "'version' must be 1 or 2, got '1'"),
    "unknown-key": (_set(("layers",), []), "unknown keys ['layers']; allowed keys are"),
    "heads-rows": (_delete_heads_row, "'heads' must have 30 rows (one per layer), got 29"),
    "heads-not-list": (_set(("heads",), {"0": [1] * 9}), "'heads' must have 30 rows (one per layer), got dict"),
    "row-short": (_set(("heads", 3), [1] * 8), "heads[3] must have 9 entries (one per query head), got 8"),
    "row-long": (_set(("heads", 4), [1] * 10), "heads[4] must have 9 entries (one per query head), got 10"),
    "row-not-list": (_set(("heads", 5), 1), "heads[5] must have 9 entries (one per query head), got int"),
    "entry-2": (_set(("heads", 6), [1, 1, 2, 1, 1, 1, 1, 1, 1]), "heads[6] entries must be 0 (prune) or 1 (keep)"),
    "entry-float": (_set(("heads", 7), [1.0] * 9), "heads[7] entries must be 0 (prune) or 1 (keep)"),
    "entry-string": (_set(("heads", 8), ["1"] * 9), "heads[8] entries must be 0 (prune) or 1 (keep)"),
    "entry-bool": (_set(("heads", 9), [True] * 9), "heads[9] entries must be 0 (prune) or 1 (keep)"),
    "entry-negative": (_set(("heads", 0), [-1] + [1] * 8), "heads[0] entries must be 0 (prune) or 1 (keep)"),
    "drop-too-high": (_set(("drop_qk",), [26, 30]), "drop_qk entry 30 is not a layer index in 0..29"),
    "drop-negative": (_set(("drop_qk",), [-1]), "drop_qk entry -1 is not a layer index in 0..29"),
    "drop-duplicate": (_set(("drop_qk",), [27, 28, 27]), "drop_qk lists layer 27 twice"),
    "drop-string": (_set(("drop_qk",), ["27"]), "drop_qk entry '27' is not a layer index in 0..29"),
    "drop-float": (_set(("drop_qk",), [27.0]), "drop_qk entry 27.0 is not a layer index in 0..29"),
    "drop-bool": (_set(("drop_qk",), [True]), "drop_qk entry True is not a layer index in 0..29"),
    "drop-not-list": (_set(("drop_qk",), 27), "'drop_qk' must be a list of layer indices, got int"),
    "alpha-key-high": (_set(("alpha", "30"), 0.5), "alpha key '30' is not a layer index in 0..29"),
    "alpha-key-negative": (_set(("alpha", "-1"), 0.5), "alpha key '-1' is not a layer index in 0..29"),
    "alpha-key-word": (_set(("alpha", "last"), 0.5), "alpha key 'last' is not a layer index in 0..29"),
    "alpha-key-padded": (_set(("alpha", "07"), 0.5), "alpha key '07' is not a layer index in 0..29"),
    "alpha-key-superscript": (_set(("alpha", "²"), 0.5), "alpha key '²' is not a layer index in 0..29"),
    "alpha-nan": (_set(("alpha", "26"), math.nan), 'alpha["26"] must be a finite number in [0, 4], got nan'),
    "alpha-inf": (_set(("alpha", "26"), math.inf), 'alpha["26"] must be a finite number in [0, 4], got inf'),
    "alpha-negative": (_set(("alpha", "27"), -0.1), 'alpha["27"] must be in [0, 4], got -0.1'),
    "alpha-above-4": (_set(("alpha", "28"), 4.01), 'alpha["28"] must be in [0, 4], got 4.01'),
    "alpha-huge-int": (_set(("alpha", "28"), 10**400), 'alpha["28"] must be in [0, 4], got 1000'),
    "alpha-string": (_set(("alpha", "29"), "0.5"), "alpha[\"29\"] must be a finite number in [0, 4], got '0.5'"),
    "alpha-null": (_set(("alpha", "29"), None), 'alpha["29"] must be a finite number in [0, 4], got None'),
    "alpha-bool": (_set(("alpha", "29"), True), 'alpha["29"] must be a finite number in [0, 4], got True'),
    "alpha-not-object": (_set(("alpha",), [0.5]), "'alpha' must be an object mapping layer index to a number"),
    "model-not-object": (_set(("model",), NAME), "'model' must be an object with name, num_layers"),
    "other-model-heads": (
        _set(("model", "num_heads"), 12),
        "model.num_heads is 12 but the loaded model has 9: this mask was made for another model",
    ),
    "other-model-layers": (
        _set(("model", "num_layers"), 32),
        "model.num_layers is 32 but the loaded model has 30: this mask was made for another model",
    ),
    "other-model-kv": (
        _set(("model", "num_kv_heads"), 9),
        "model.num_kv_heads is 9 but the loaded model has 3: this mask was made for another model",
    ),
    "note-not-string": (_set(("note",), 5), "'note' must be a string, got int"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_mask_is_rejected_with_exact_message(case):
    edit, message = INVALID[case]
    obj = example()
    edit(obj)
    with pytest.raises(HeadroomError, match=re.escape(message)):
        parse(obj)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_mask_file_is_rejected_too(case, tmp_path):
    edit, message = INVALID[case]
    obj = example()
    edit(obj)
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(obj), encoding="utf-8")  # NaN/Infinity are written as JSON's extension literals
    with pytest.raises(HeadroomError, match=re.escape(message)):
        load_mask(path, SMOL, NAME)


@pytest.mark.parametrize("obj", [[], "mask", 3, None])
def test_non_object_is_rejected(obj):
    with pytest.raises(HeadroomError, match=f"mask must be a JSON object, got {type(obj).__name__}"):
        parse(obj)


def test_all_problems_are_listed_in_one_error():
    obj = example()
    obj["version"] = 3
    obj["heads"][2] = [1] * 8
    obj["drop_qk"] = [29, 31]
    obj["alpha"]["26"] = -1
    obj["extra"] = True
    with pytest.raises(HeadroomError) as info:
        parse(obj)
    message = str(info.value)
    assert message.startswith("invalid mask: ")
    for part in (
        "'version' must be 1 or 2, got 3",
        "unknown keys ['extra']",
        "heads[2] must have 9 entries (one per query head), got 8",
        "drop_qk entry 31 is not a layer index in 0..29",
        'alpha["26"] must be in [0, 4], got -1',
    ):
        assert part in message
    assert message.count("; ") >= 4


def test_valid_parts_do_not_leak_from_a_rejected_file():
    """All or nothing: the error carries no half-built mask and the input is not modified."""
    obj = example()
    obj["alpha"]["29"] = 9
    before = copy.deepcopy(obj)
    with pytest.raises(HeadroomError) as info:
        parse(obj)
    assert obj == before
    assert info.value.args == (str(info.value),)


def test_invalid_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    # Line 3 is `  "version": 1,,`: two spaces, 9 characters of "version", ": 1," (4) -> 15 characters,
    # so the second comma, where a property name was expected, is column 16.
    path.write_text('{\n  "format": "headroom.mask",\n  "version": 1,,\n}\n', encoding="utf-8")
    with pytest.raises(HeadroomError, match=r"broken\.json is not valid JSON: .* at line 3 column 16"):
        load_mask(path, SMOL, NAME)


def test_file_with_an_unparsable_number_is_rejected(tmp_path):
    path = tmp_path / "long.json"
    path.write_text('{"format": "headroom.mask", "version": 1' + "0" * 5000 + "}", encoding="utf-8")
    with pytest.raises(HeadroomError, match=r"long\.json is not valid JSON"):
        load_mask(path, SMOL, NAME)


def test_non_utf8_file_is_rejected(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes('{"note": "café"}'.encode("latin-1"))
    with pytest.raises(HeadroomError, match=r"cannot read mask file .*latin\.json"):
        load_mask(path, SMOL, NAME)


def test_missing_file_is_rejected(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(HeadroomError, match=r"mask file .*nope\.json does not exist; check the path"):
        load_mask(path, SMOL, NAME)


# --- budget: SmolLM2, grouped-query attention -----------------------------------------------------


def test_unpruned_budget_is_all_zero_savings():
    b = budget(unpruned(), SMOL, 256)
    assert b.params_removed == 0 and b.params_removed_pct == 0.0
    assert b.kv_bytes_per_token == b.kv_bytes_per_token_unpruned == 30 * LAYER_KV == 46_080
    assert b.attention_flops_per_token == b.attention_flops_per_token_unpruned == 30 * layer_flops(256)
    assert b.kv_bytes_per_token_saved == 0 and b.attention_flops_per_token_saved == 0
    assert b.params_total == 134_515_008
    assert b.seqlen == 256


def test_pruning_a_whole_kv_group_saves_its_cache_and_kv_rows():
    # Query heads 0, 1, 2 all read KV head 0 (9 heads / 3 KV heads = groups of 3).
    mask = unpruned().with_head(5, 0, False).with_head(5, 1, False).with_head(5, 2, False)
    b = budget(mask, SMOL, 256)
    # q rows and o columns of 3 heads, plus the k and v rows of KV head 0.
    assert b.params_removed == 3 * W + 3 * W + W + W == 294_912
    assert b.kv_bytes_per_token_saved == GROUP_KV == 512
    assert b.kv_bytes_per_token == 30 * LAYER_KV - 512
    # FLOPs: projections of 3 q + 1 k + 1 v + 3 o heads, and scores/values of 3 heads over 256 positions.
    assert b.attention_flops_per_token_saved == 2 * (3 + 1 + 1 + 3) * W + 2 * 2 * 3 * 64 * 256 == 786_432


def test_pruning_two_of_three_heads_of_a_group_saves_no_kv_cache():
    mask = unpruned().with_head(5, 0, False).with_head(5, 2, False)
    b = budget(mask, SMOL, 256)
    assert b.kv_bytes_per_token_saved == 0
    assert b.params_removed == 2 * W + 2 * W  # q rows and o columns only; k/v still read by head 1
    assert b.attention_flops_per_token_saved == 2 * (2 + 2) * W + 2 * 2 * 2 * 64 * 256


def test_heads_of_different_groups_save_no_kv_cache():
    # Heads 2, 5, 8 are the last head of groups 0, 1, 2: every group still has two readers.
    mask = unpruned().with_head(0, 2, False).with_head(0, 5, False).with_head(0, 8, False)
    b = budget(mask, SMOL, 128)
    assert b.kv_bytes_per_token_saved == 0
    assert b.params_removed == 6 * W


def test_two_whole_groups_in_two_layers_save_two_groups_of_cache():
    mask = unpruned()
    for head in (3, 4, 5):  # group 1 of layer 0
        mask = mask.with_head(0, head, False)
    for head in (6, 7, 8):  # group 2 of layer 29
        mask = mask.with_head(29, head, False)
    b = budget(mask, SMOL, 64)
    assert b.kv_bytes_per_token_saved == 2 * GROUP_KV
    assert b.params_removed == 2 * (3 * W + 3 * W + 2 * W)


def test_all_heads_of_a_layer_pruned_removes_its_whole_attention():
    mask = unpruned()
    for head in range(9):
        mask = mask.with_head(7, head, False)
    b = budget(mask, SMOL, 256)
    assert b.params_removed == LAYER_PARAMS
    assert b.kv_bytes_per_token_saved == LAYER_KV
    assert b.attention_flops_per_token_saved == layer_flops(256)


def test_drop_qk_layer_saves_q_k_and_its_whole_kv_cache():
    mask = unpruned().with_layer(29, drop_qk=True)
    b = budget(mask, SMOL, 256)
    assert b.params_removed == 9 * W + 3 * W == 442_368  # q of 9 heads and k of 3 KV heads
    assert b.kv_bytes_per_token_saved == LAYER_KV == 1_536
    # What is left of the layer: v_proj (3 KV heads) and o_proj (9 heads), no scores.
    assert b.attention_flops_per_token_saved == layer_flops(256) - 2 * (3 + 9) * W


def test_drop_qk_alpha_does_not_change_the_budget_unless_zero():
    for alpha in (0.1, 1.0, 4.0):
        b = budget(unpruned().with_layer(29, drop_qk=True, alpha=alpha), SMOL, 256)
        assert b.params_removed == 12 * W
    b = budget(unpruned().with_layer(29, drop_qk=True, alpha=0.0), SMOL, 256)
    assert b.params_removed == LAYER_PARAMS


def test_pruned_heads_still_count_inside_a_drop_qk_layer():
    mask = unpruned().with_layer(29, drop_qk=True)
    for head in (0, 1, 2, 3):  # all of group 0 and one head of group 1
        mask = mask.with_head(29, head, False)
    b = budget(mask, SMOL, 256)
    # Left in the layer: v rows of groups 1 and 2 (2 W) and o columns of 5 heads (5 W).
    assert b.params_removed == LAYER_PARAMS - (2 * W + 5 * W)
    assert b.kv_bytes_per_token_saved == LAYER_KV
    assert b.attention_flops_per_token_saved == layer_flops(256) - 2 * (2 + 5) * W


@pytest.mark.parametrize("drop", [False, True])
def test_alpha_zero_removes_q_k_v_and_o(drop):
    mask = unpruned().with_layer(3, drop_qk=drop, alpha=0.0)
    b = budget(mask, SMOL, 256)
    assert b.params_removed == (9 + 3 + 3 + 9) * W == 884_736
    assert b.kv_bytes_per_token_saved == LAYER_KV
    assert b.attention_flops_per_token_saved == layer_flops(256)


def test_top4_drop_qk_saves_four_thirtieths_of_the_kv_cache():
    mask = parse(example())  # layers 26-29 drop-QK, alphas 0.2-0.8
    b = budget(mask, SMOL, 256)
    assert b.kv_bytes_per_token_saved == 4 * LAYER_KV == 6_144
    assert b.kv_bytes_per_token_saved * 30 == b.kv_bytes_per_token_unpruned * 4  # exactly 4/30
    assert b.kv_bytes_per_token == 26 * LAYER_KV == 39_936
    assert b.params_removed == 4 * (9 + 3) * W == 1_769_472
    # 100 * 1,769,472 / 134,515,008 = 1.31545 %
    assert b.params_removed_pct == pytest.approx(100 * 1_769_472 / 134_515_008)
    assert b.params_removed_pct == pytest.approx(1.31545, abs=1e-5)


def test_flops_depend_on_seqlen_only_through_non_drop_qk_layers():
    mask = parse(example())
    short, long = budget(mask, SMOL, 128), budget(mask, SMOL, 1024)
    per_position = 2 * 2 * 9 * 64  # scores and weighted values of 9 heads, per attended position
    longer = 1024 - 128
    assert long.attention_flops_per_token - short.attention_flops_per_token == 26 * per_position * longer
    unpruned_growth = long.attention_flops_per_token_unpruned - short.attention_flops_per_token_unpruned
    assert unpruned_growth == 30 * per_position * longer
    # The saving of 4 drop-QK layers: their q/k projections plus their whole seqlen term.
    for b in (short, long):
        assert b.attention_flops_per_token_saved == 4 * (2 * (9 + 3) * W + per_position * b.seqlen)
        assert b.attention_flops_per_token < b.attention_flops_per_token_unpruned
    # KV bytes and parameters do not depend on seqlen.
    assert (short.kv_bytes_per_token, short.params_removed) == (long.kv_bytes_per_token, long.params_removed)


def test_budget_fields_are_consistent():
    mask = parse(example()).with_head(0, 1, False).with_layer(10, alpha=0.0)
    b = budget(mask, SMOL, 512)
    assert b.params_removed_pct == pytest.approx(100.0 * b.params_removed / b.params_total)
    assert b.kv_bytes_per_token_saved == b.kv_bytes_per_token_unpruned - b.kv_bytes_per_token
    assert b.attention_flops_per_token_saved == b.attention_flops_per_token_unpruned - b.attention_flops_per_token
    # 4 drop-QK layers (12 W each), head 1 of layer 0 (2 W), layer 10 removed (24 W).
    assert b.params_removed == 4 * 12 * W + 2 * W + 24 * W
    assert b.kv_bytes_per_token_saved == 5 * LAYER_KV
    out = b.to_json()
    assert out["params_removed"] == b.params_removed and out["seqlen"] == 512
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("seqlen", [0, -5])
def test_budget_rejects_non_positive_seqlen(seqlen):
    with pytest.raises(HeadroomError, match=f"sequence length for the budget must be at least 1, got {seqlen}"):
        budget(unpruned(), SMOL, seqlen)


# --- budget: biases and q/k norms -----------------------------------------------------------------

QWEN = ModelShape(  # Qwen2-0.5B-like: 14 query heads in 2 KV groups of 7, q/k/v biases, no o bias
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    hidden_size=896,
    qkv_bias=True,
    o_bias=False,
    qk_norm_params_per_layer=0,
    total_params=494_032_768,
    bytes_per_element=2,
)
QW = 64 * 896  # = 57,344 weights per head and projection
QB = 64  # bias entries per head of q, k or v


def test_qkv_biases_are_counted():
    full = Mask.unpruned(QWEN, "qwen")
    # Unpruned layer: q 14 heads, k 2, v 2 (each with bias), o 14 heads (no bias).
    layer = (14 + 2 + 2) * (QW + QB) + 14 * QW
    assert layer == 1_836_160
    assert budget(full.with_layer(0, alpha=0.0), QWEN, 128).params_removed == layer

    # Drop-QK: q and k with their biases.
    assert budget(full.with_layer(0, drop_qk=True), QWEN, 128).params_removed == (14 + 2) * (QW + QB) == 918_528

    # Whole KV group 1 (heads 7..13): q rows + bias of 7 heads, k and v of one KV head with bias, o of 7.
    mask = full
    for head in range(7, 14):
        mask = mask.with_head(3, head, False)
    b = budget(mask, QWEN, 128)
    assert b.params_removed == 7 * (QW + QB) + 2 * (QW + QB) + 7 * QW == 918_080
    assert b.kv_bytes_per_token_saved == 2 * 64 * 2  # K and V of one KV head at 2 bytes
    assert b.kv_bytes_per_token_unpruned == 24 * 2 * 2 * 64 * 2


TINY_GEMMA3 = ModelShape(  # an o_proj bias and per-layer q/k norms of head_dim each
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    hidden_size=16,
    qkv_bias=False,
    o_bias=True,
    qk_norm_params_per_layer=2 * 8,
    total_params=10_000,
    bytes_per_element=2,
)


def test_o_bias_and_qk_norms_are_counted():
    w = 8 * 16  # 128 weights per head and projection
    full = Mask.unpruned(TINY_GEMMA3, "g")
    # Whole layer: q 4 + k 2 + v 2 + o 4 heads, o bias 16, q/k norms 16.
    assert budget(full.with_layer(1, alpha=0.0), TINY_GEMMA3, 8).params_removed == 12 * w + 16 + 16
    # Drop-QK removes q, k and their norms.
    assert budget(full.with_layer(1, drop_qk=True), TINY_GEMMA3, 8).params_removed == 6 * w + 16
    # One head: its q rows and o columns; the norms are shared by all heads and stay.
    assert budget(full.with_head(1, 0, False), TINY_GEMMA3, 8).params_removed == 2 * w
    # All heads pruned, branch still scaled by 1: the o bias is still added, everything else goes.
    mask = full
    for head in range(4):
        mask = mask.with_head(1, head, False)
    assert budget(mask, TINY_GEMMA3, 8).params_removed == 12 * w + 16
    assert budget(mask, TINY_GEMMA3, 8).params_removed_pct == pytest.approx(100 * (12 * w + 16) / 10_000)


# --- mask helpers ---------------------------------------------------------------------------------


def test_with_head_returns_a_new_mask():
    base = unpruned()
    pruned = base.with_head(4, 7, False)
    assert base.is_unpruned and base.heads[4][7]  # the original is unchanged
    assert pruned.heads[4] == (True,) * 7 + (False, True)
    assert pruned.heads[:4] == base.heads[:4] and pruned.heads[5:] == base.heads[5:]
    assert pruned.pruned_heads == 1
    assert pruned.with_head(4, 7, True) == base


def test_with_layer_sets_and_clears_drop_qk_and_alpha():
    base = unpruned()
    mask = base.with_layer(28, drop_qk=True, alpha=0.4)
    assert mask.drop_qk == frozenset({28}) and mask.alpha[28] == 0.4
    assert base.drop_qk == frozenset() and base.alpha[28] == 1.0
    assert mask.with_layer(28, alpha=0.7).drop_qk == frozenset({28})  # drop_qk=None leaves it
    assert mask.with_layer(28, drop_qk=False).alpha[28] == 0.4  # alpha=None leaves it
    assert mask.with_layer(28, drop_qk=False, alpha=1.0) == base
    assert mask.with_layer(28, drop_qk=True).drop_qk == frozenset({28})  # idempotent


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (-0.5, "alpha of layer 3 must be in [0, 4], got -0.5"),
        (4.5, "alpha of layer 3 must be in [0, 4], got 4.5"),
        (math.nan, "alpha of layer 3 must be a finite number in [0, 4], got nan"),
        ("1", "alpha of layer 3 must be a finite number in [0, 4], got '1'"),
    ],
)
def test_with_layer_rejects_bad_alpha(alpha, message):
    with pytest.raises(HeadroomError, match=re.escape(message)):
        unpruned().with_layer(3, alpha=alpha)


def test_first_difference():
    base = unpruned()
    assert base.first_difference(base) is None
    assert base.first_difference(replace(base, note="other", fingerprint="x")) is None
    assert base.first_difference(base.with_head(12, 0, False)) == 12
    assert base.first_difference(base.with_layer(20, drop_qk=True)) == 20
    assert base.first_difference(base.with_layer(25, alpha=0.9)) == 25
    both = base.with_layer(25, alpha=0.9).with_head(8, 3, False)
    assert base.first_difference(both) == 8 and both.first_difference(base) == 8
    assert both.first_difference(base.with_head(8, 3, False)) == 25


def test_is_unpruned():
    base = unpruned()
    assert base.is_unpruned
    assert not base.with_head(0, 0, False).is_unpruned
    assert not base.with_layer(29, drop_qk=True).is_unpruned
    assert not base.with_layer(29, alpha=0.5).is_unpruned
    assert not base.with_layer(29, alpha=0.0).is_unpruned
    assert base.with_layer(29, alpha=0.5).with_layer(29, alpha=1.0).is_unpruned


def test_summary():
    assert unpruned().summary() == "unpruned"
    mask = parse(example()).with_head(0, 0, False).with_head(1, 8, False)
    assert mask.summary() == {
        "pruned_heads": 2,
        "drop_qk": [26, 27, 28, 29],
        "alpha": {"26": 0.2, "27": 0.8, "28": 0.4, "29": 0.5},
    }
    assert unpruned().with_layer(3, alpha=0.0).summary() == {"pruned_heads": 0, "drop_qk": [], "alpha": {"3": 0.0}}


# --- the mask in a link ---------------------------------------------------------------------------


def test_a_link_carries_every_digit_of_alpha_and_reads_back_the_same_mask():
    third, many = 1 / 3, 0.123456789012345678
    mask = unpruned().with_head(5, 0, False).with_head(5, 3, False).with_layer(26, drop_qk=True, alpha=third)
    mask = mask.with_layer(27, alpha=many).with_layer(28, alpha=0.0).with_layer(29, alpha=0.5)
    query = mask_to_query(mask)
    assert query["pruned"] == "5:0.3" and query["drop_qk"] == "26"
    assert query["alpha"] == f"26:{third!r},27:{many!r},28:0,29:0.5"  # short where short is exact
    back = mask_from_query(query, SMOL, NAME)
    assert back == mask and back.alpha[26] == third and back.alpha[27] == many
    assert mask_to_query(unpruned()) == {}


def test_alphas_of_every_kind_survive_a_real_url_bit_for_bit():
    """Random doubles and the awkward ones (just below 1, the smallest subnormal, 4) through urlencode and back."""
    rng = random.Random(0)
    awkward = [1 - 2**-53, 5e-324, 4.0, 2**-30, 0.1 + 0.2, 3.999999999999999]
    for trial in range(100):
        alphas = awkward if trial == 0 else [rng.uniform(0.0, 4.0) for _ in range(6)]
        mask = unpruned()
        for layer, alpha in zip(rng.sample(range(SMOL.num_layers), len(alphas)), alphas, strict=True):
            mask = mask.with_layer(layer, alpha=alpha)
        url = "http://localhost:8501/Mask_editor?" + urlencode(mask_to_query(mask))
        back = mask_from_query(dict(parse_qsl(urlsplit(url).query, strict_parsing=True)), SMOL, NAME)
        assert back == mask
        assert [a.hex() for a in back.alpha] == [a.hex() for a in mask.alpha]  # every bit, not only ==


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"pruned": "5"}, "the link's 'pruned' entry '5' is not 'layer:value'"),
        ({"pruned": "30:1"}, "the link's mask does not fit this model"),
        ({"alpha": "3:abc"}, "the link's mask does not fit this model"),
        ({"alpha": "3:9"}, "the link's mask is invalid"),
    ],
)
def test_a_bad_link_says_what_is_wrong(query, message):
    with pytest.raises(HeadroomError, match=re.escape(message)):
        mask_from_query(query, SMOL, NAME)


def test_describe_says_what_the_mask_changes():
    mask = unpruned().with_head(0, 1, False).with_layer(26, drop_qk=True, alpha=0.25).with_layer(3, alpha=0.0)
    assert unpruned().describe() == "unpruned"
    assert mask.describe() == (
        "1 heads pruned; drop-QK on layers [26]; attention removed on layers [3]; alpha 26: 0.25"
    )
