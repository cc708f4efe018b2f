"""Protocol perplexity, and the incremental evaluator against full recomputes."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from analysis.architecture import Architecture
from analysis.corpus import Text, Windows, make_windows
from analysis.evaluation import TOKENS_PER_BATCH, IncrementalEvaluator, batches, perplexity
from analysis.masks import Mask
from tests.helpers import TINY, count_layer_calls, random_mask, random_windows, word_text, word_tokenizer


def test_perplexity_matches_plain_transformers_loss(tiny_arch):
    windows = random_windows()
    with torch.no_grad():
        loss = tiny_arch.model(input_ids=windows.input_ids, labels=windows.input_ids).loss
    result = perplexity(tiny_arch, windows)
    assert result.predicted_tokens == 5 * 23
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_bos_windows_predict_every_chunk_token(tiny_arch):
    """With a BOS column each of the seqlen chunk tokens is predicted, BOS itself never is."""
    plain = random_windows(length=12)
    ids = torch.cat([torch.full((5, 1), 1), plain.input_ids], dim=1)
    windows = Windows(ids, seqlen=12, has_bos=True, text_name="random", text_sha256="0" * 64)
    with torch.no_grad():
        out = tiny_arch.model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten())
    result = perplexity(tiny_arch, windows)
    assert result.predicted_tokens == 5 * 12
    assert result.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_incremental_equals_full_recompute(tiny_arch):
    windows = random_windows()
    evaluator = IncrementalEvaluator(tiny_arch, windows)
    rng = random.Random(0)
    mask = Mask.unpruned(tiny_arch.shape, "tiny")
    assert evaluator.perplexity(mask).perplexity == pytest.approx(perplexity(tiny_arch, windows).perplexity, rel=1e-6)
    for _ in range(12):
        mask = random_mask(mask, rng)
        fast = evaluator.perplexity(mask).perplexity
        full = perplexity(tiny_arch, windows, mask).perplexity
        assert abs(fast - full) / full < 1e-5


def test_a_change_at_layer_l_recomputes_only_layers_l_to_last(tiny_arch):
    windows = random_windows()
    evaluator = IncrementalEvaluator(tiny_arch, windows)
    calls, handles = count_layer_calls(tiny_arch)
    try:
        mask = Mask.unpruned(tiny_arch.shape, "tiny").with_head(2, 3, False)
        evaluator.perplexity(mask)
        assert calls == [0, 0, 1, 1]  # one batch: layers 2 and 3 run once each
        evaluator.perplexity(mask)  # unchanged: nothing reruns
        assert calls == [0, 0, 1, 1]
        evaluator.perplexity(mask.with_layer(3, alpha=0.5))
        assert calls == [0, 0, 1, 2]
    finally:
        for h in handles:
            h.remove()


def test_an_interrupted_recompute_is_repaired_on_the_next_call(tiny_arch):
    windows = random_windows()
    evaluator = IncrementalEvaluator(tiny_arch, windows)
    mask = Mask.unpruned(tiny_arch.shape, "tiny").with_head(1, 0, False)

    def boom(module, args, output):
        raise KeyboardInterrupt

    handle = tiny_arch.layers[3].register_forward_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        evaluator.perplexity(mask)
    handle.remove()
    # Layers 2.. were half updated; asking again (even for a mask that changes only layer 3) is exact.
    later = mask.with_layer(3, alpha=0.4)
    assert evaluator.perplexity(later).perplexity == pytest.approx(
        perplexity(tiny_arch, windows, later).perplexity, rel=1e-6
    )
    assert evaluator.last_recomputed_from == 1


def test_advance_updates_the_stream_below_a_layer_without_the_head(tiny_arch):
    windows = random_windows()
    evaluator = IncrementalEvaluator(tiny_arch, windows)
    mask = Mask.unpruned(tiny_arch.shape, "tiny").with_head(0, 1, False).with_layer(2, drop_qk=True)
    evaluator.advance(mask, 3)
    fresh = IncrementalEvaluator(tiny_arch, windows)
    fresh.perplexity(mask)
    assert all(torch.equal(a, b) for a, b in zip(evaluator.layer_inputs(3), fresh.layer_inputs(3), strict=True))
    full = perplexity(tiny_arch, windows, mask).perplexity
    assert evaluator.perplexity(mask).perplexity == pytest.approx(full, rel=1e-6)
    assert evaluator.last_recomputed_from == 3  # only what advance left stale


def test_a_mask_seen_recently_is_answered_without_recomputing(tiny_arch):
    windows = random_windows()
    evaluator = IncrementalEvaluator(tiny_arch, windows)
    base = Mask.unpruned(tiny_arch.shape, "tiny")
    first = evaluator.perplexity(base.with_head(1, 1, False)).perplexity
    evaluator.perplexity(base.with_head(2, 2, False))
    calls, handles = count_layer_calls(tiny_arch)
    try:
        again = evaluator.perplexity(base.with_head(1, 1, False)).perplexity  # e.g. undo
    finally:
        for h in handles:
            h.remove()
    assert again == first and calls == [0, 0, 0, 0] and evaluator.last_recomputed_from is None
    # The stored stream still belongs to the last computed mask, so the next change is exact.
    later = base.with_head(2, 2, False).with_layer(3, alpha=0.5)
    assert evaluator.perplexity(later).perplexity == pytest.approx(
        perplexity(tiny_arch, windows, later).perplexity, rel=1e-6
    )


# --- more than one batch, at the default batch cap --------------------------------------------------


def test_many_batches_of_bos_windows_equal_transformers_window_by_window_also_under_a_mask():
    """257-token windows (a BOS tokenizer, seqlen 256) at the default cap: batches of 7, 7 and 3 windows.

    The reference is plain transformers, one window at a time, on the model and on a physically edited copy
    (a pruned head's o_proj input columns zeroed: what pruning it means).
    """
    config = CONFIG_MAPPING["llama"](**{**TINY, "max_position_embeddings": 512})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():  # peaked predictions, so that pruning a few heads moves the perplexity visibly
        model.lm_head.weight.mul_(30.0)
    arch = Architecture(model)
    windows = make_windows(word_tokenizer(bos=True), Text.of("words", word_text(17 * 256 + 5)), 256)
    assert windows.input_ids.shape == (17, 257) and windows.has_bos
    assert [len(b) for b in batches(windows)] == [7, 7, 3] == [TOKENS_PER_BATCH // 257] * 2 + [3]

    pruned = [(0, 1), (2, 4), (2, 5), (3, 0)]
    mask = Mask.unpruned(arch.shape, "tiny")
    edited = copy.deepcopy(model)
    for layer, head in pruned:
        mask = mask.with_head(layer, head, False)
        columns = slice(head * arch.shape.head_dim, (head + 1) * arch.shape.head_dim)
        edited.model.layers[layer].self_attn.o_proj.weight[:, columns] = 0.0

    def reference(m: torch.nn.Module) -> float:
        """Mean NLL of every chunk token (BOS is never predicted), summed window by window in float64."""
        total = 0.0
        for window in windows.input_ids:
            total += m(input_ids=window[None], labels=window[None]).loss.double().item() * 256
        return total / (17 * 256)

    evaluator = IncrementalEvaluator(arch, windows)
    assert evaluator.num_batches == 3
    expected = {None: reference(model), mask: reference(edited)}
    assert abs(expected[mask] / expected[None] - 1) > 1e-3  # the mask matters far beyond the tolerance
    for under, want in expected.items():
        full = perplexity(arch, windows, under)
        assert full.predicted_tokens == 17 * 256
        assert full.mean_nll == pytest.approx(want, rel=1e-6)
        incremental = evaluator.perplexity(under or Mask.unpruned(arch.shape, "tiny"))
        assert incremental.mean_nll == pytest.approx(want, rel=1e-6)
