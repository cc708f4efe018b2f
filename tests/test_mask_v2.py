"""Mask v2 (shared/docs/protocol.md, "Mask file, version 2"): the per-layer o_proj bias.

The file contract (v2 round trip, v1 still read and still written without bias, all-or-nothing
rejection), the budget (a new bias costs hidden_size parameters, counted by hand), and the effect on a
model, compared with a physically edited copy whose o_proj has a real bias tensor, on every family.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from analysis.architecture import Architecture, ModelShape
from analysis.budget import budget
from analysis.errors import HeadroomError
from analysis.evaluation import IncrementalEvaluator, perplexity
from analysis.intervention import apply_mask
from analysis.mask_files import load_mask, parse_mask
from analysis.masks import Mask
from tests.helpers import random_windows

SHAPE = ModelShape(
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=2,
    hidden_size=5,
    qkv_bias=False,
    o_bias=False,
    qk_norm_params_per_layer=0,
    total_params=1000,
    bytes_per_element=4,
)
BIAS = [0.125, -3.0, 1e-7, 2.5, 0.1]  # 0.1 is not exact in binary: the round trip must keep it exactly


def v2_obj() -> dict:
    return {
        "format": "headroom.mask",
        "version": 2,
        "model": {"name": "m", "num_layers": 3, "num_heads": 4, "num_kv_heads": 2},
        "heads": [[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]],
        "drop_qk": [2],
        "alpha": {"1": 0.9},
        "bias": {"1": list(BIAS), "2": [0, 0, 0, 0, 1]},
        "note": "compensated",
    }


def parse(obj: dict) -> Mask:
    return parse_mask(obj, SHAPE, "m")


# --- the file -------------------------------------------------------------------------------------


def test_v2_file_round_trips_exactly(tmp_path):
    mask = parse(v2_obj())
    assert mask.bias_of(1) == tuple(BIAS) and mask.bias_of(2) == (0.0, 0.0, 0.0, 0.0, 1.0) and mask.bias_of(0) is None
    path = tmp_path / "m.json"
    mask.save(path)
    written = json.loads(path.read_text())
    assert written["version"] == 2
    assert written["bias"] == {"1": BIAS, "2": [0.0, 0.0, 0.0, 0.0, 1.0]}
    again = load_mask(path, SHAPE, "m")
    assert again == mask and hash(again) == hash(mask)
    assert again.to_json() == written


def test_v1_file_loads_and_a_mask_without_bias_is_written_as_v1(tmp_path):
    obj = v2_obj()
    del obj["bias"]
    obj["version"] = 1
    mask = parse(obj)
    assert mask.bias == ()
    path = tmp_path / "m.json"
    mask.save(path)
    written = json.loads(path.read_text())
    assert written["version"] == 1 and "bias" not in written
    assert written == {**obj, "model": {**obj["model"]}}  # the same v1 file as the one read


def test_v2_file_without_bias_is_read_and_removing_the_bias_goes_back_to_v1():
    obj = v2_obj()
    del obj["bias"]
    assert parse(obj).bias == ()
    mask = parse(v2_obj()).with_bias(1, None).with_bias(2, None)
    assert mask.to_json()["version"] == 1 and "bias" not in mask.to_json()


def test_bias_is_part_of_what_the_mask_does():
    plain = Mask.unpruned(SHAPE, "m")
    biased = plain.with_bias(1, BIAS)
    assert not biased.is_unpruned
    assert plain.first_difference(biased) == 1
    assert biased.layer(1) != plain.layer(1) and biased.layer(0) == plain.layer(0)
    assert biased.cache_key() != plain.cache_key()
    assert set(plain.cache_key()) == {"heads", "drop_qk", "alpha"}  # v1 masks keep their cache keys
    assert biased.with_bias(1, [*BIAS[:-1], 0.2]).cache_key() != biased.cache_key()
    assert biased.summary()["bias_layers"] == [1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda o: o["bias"].update({"1": BIAS[:4]}), r'bias\["1"\] must be a list of 5 numbers \(the hidden size\)'),
        (lambda o: o["bias"].update({"3": BIAS}), r"bias key '3' is not a layer index in 0\.\.2"),
        (lambda o: o["bias"].update({"01": BIAS}), r"bias key '01' is not a layer index in 0\.\.2"),
        (lambda o: o["bias"]["1"].__setitem__(2, float("nan")), r'bias\["1"\]\[2\] must be a finite number, got nan'),
        (lambda o: o["bias"]["1"].__setitem__(0, 10**400), r'bias\["1"\]\[0\] must be a finite number, got 10{39}\.'),
        (lambda o: o["bias"]["1"].__setitem__(4, True), r'bias\["1"\]\[4\] must be a finite number, got True'),
        (lambda o: o["bias"]["1"].__setitem__(4, "0.1"), r"bias\[\"1\"\]\[4\] must be a finite number, got '0.1'"),
        (lambda o: o.update(bias=[BIAS]), r"'bias' must be an object mapping layer index to a list of numbers"),
        (lambda o: o.update(version=1), r"'bias' needs 'version' 2; a version 1 mask has no bias"),
        (lambda o: o.update(version=3), r"'version' must be 1 or 2, got 3"),
    ],
)
def test_invalid_bias_is_rejected_with_a_message(edit, message):
    obj = v2_obj()
    edit(obj)
    with pytest.raises(HeadroomError, match=message):
        parse(obj)


def test_every_bias_problem_is_reported_together_and_nothing_is_applied():
    obj = v2_obj()
    obj["bias"] = {"0": BIAS[:2], "7": BIAS, "1": [float("inf")] * 5}
    obj["alpha"] = {"1": 9}
    with pytest.raises(HeadroomError) as e:
        parse(obj)
    text = str(e.value)
    for part in ('bias["0"] must be a list of 5', "bias key '7'", 'bias["1"][0] must be a finite number', 'alpha["1"]'):
        assert part in text


def test_with_bias_rejects_bad_values():
    mask = Mask.unpruned(SHAPE, "m")
    with pytest.raises(HeadroomError, match="not a finite number"):
        mask.with_bias(0, [0, 0, float("inf"), 0, 0])
    with pytest.raises(HeadroomError, match=r"bias layer 3 is not a layer index in 0\.\.2"):
        mask.with_bias(3, BIAS)


# --- the budget -----------------------------------------------------------------------------------


def test_a_new_bias_costs_hidden_size_parameters():
    pruned = Mask.unpruned(SHAPE, "m").with_head(1, 0, False)
    head_params = 2 * 2 * 5  # q rows and o columns of one head: 2 * head_dim * hidden
    assert budget(pruned, SHAPE, 8).params_removed == head_params
    assert budget(pruned.with_bias(1, BIAS), SHAPE, 8).params_removed == head_params - 5
    # Where o_proj already has a bias, the mask's is folded into it: no new parameter.
    with_o_bias = ModelShape(**{**SHAPE.__dict__, "o_bias": True})
    assert budget(pruned.with_bias(1, BIAS), with_o_bias, 8).params_removed == head_params
    # A removed branch (alpha = 0) adds nothing, bias included.
    gone = Mask.unpruned(SHAPE, "m").with_layer(1, alpha=0.0)
    assert budget(gone.with_bias(1, BIAS), SHAPE, 8).params_removed == budget(gone, SHAPE, 8).params_removed
    # KV and FLOPs do not change with a bias.
    plain, biased = budget(pruned, SHAPE, 8), budget(pruned.with_bias(1, BIAS), SHAPE, 8)
    assert plain.kv_bytes_per_token_saved == biased.kv_bytes_per_token_saved
    assert plain.attention_flops_per_token_saved == biased.attention_flops_per_token_saved


# --- on a model -----------------------------------------------------------------------------------


def add_o_bias(arch: Architecture, layer: int, values: torch.Tensor) -> None:
    """Physically give ``layer``'s o_proj a bias of ``values`` (added to any it already has)."""
    o = arch.output_projection(layer)
    if o.bias is None:
        o.bias = nn.Parameter(torch.zeros(o.out_features), requires_grad=False)
    o.bias.add_(values)


def logits(arch: Architecture, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return arch.model(input_ids=ids).logits


def test_bias_equals_a_physically_edited_copy(tiny_arch):
    """Head pruning + bias + alpha, and a drop-QK layer with a bias, against a real o_proj bias."""
    arch, s = tiny_arch, tiny_arch.shape
    g = torch.Generator().manual_seed(3)
    b1, b2 = torch.randn(s.hidden_size, generator=g), torch.randn(s.hidden_size, generator=g)
    mask = Mask.unpruned(s, "tiny").with_head(1, 2, False).with_layer(1, alpha=0.6).with_bias(1, b1.tolist())
    mask = mask.with_layer(3, drop_qk=True, alpha=0.3).with_bias(3, b2.tolist())
    edited = Architecture(copy.deepcopy(arch.model))
    with torch.no_grad():
        add_o_bias(edited, 1, b1)
        add_o_bias(edited, 3, b2)
    unbiased = mask.with_bias(1, None).with_bias(3, None)
    ids = random_windows().input_ids
    with apply_mask(edited, unbiased):  # the same pruning on the edited copy, its bias real
        expected = logits(edited, ids)
    with apply_mask(arch, mask):
        got = logits(arch, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with apply_mask(arch, unbiased):
        assert not torch.allclose(got, logits(arch, ids), atol=1e-3)  # the bias did something


def test_bias_is_before_alpha_and_alpha_zero_removes_it(tiny_arch):
    arch, s = tiny_arch, tiny_arch.shape
    bias = torch.full((s.hidden_size,), 0.5).tolist()
    ids = random_windows().input_ids
    gone = Mask.unpruned(s, "tiny").with_layer(2, alpha=0.0)
    with apply_mask(arch, gone):
        expected = logits(arch, ids)
    with apply_mask(arch, gone.with_bias(2, bias)):
        torch.testing.assert_close(logits(arch, ids), expected, rtol=0, atol=0)


def test_incremental_evaluator_sees_the_bias(tiny_arch):
    arch, s = tiny_arch, tiny_arch.shape
    windows = random_windows()
    evaluator = IncrementalEvaluator(arch, windows)
    base = Mask.unpruned(s, "tiny").with_head(2, 1, False)
    evaluator.perplexity(base)
    biased = base.with_bias(2, torch.linspace(-1, 1, s.hidden_size).tolist())
    got = evaluator.perplexity(biased).perplexity
    assert evaluator.last_recomputed_from == 2
    assert got == pytest.approx(perplexity(arch, windows, biased).perplexity, rel=1e-5)
    assert got != pytest.approx(evaluator.perplexity(base).perplexity, rel=1e-4)
