"""Importance scores against their formulas, recomputed by hand from activations the tests capture themselves."""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import analysis.importance as importance
from analysis.activation_metrics import (
    attention_block_influence,
    block_influence,
    flap_wifv,
    magnitude,
    o_proj_input_stats,
    wanda_sp,
)
from analysis.architecture import Architecture
from analysis.head_map import DEFAULT_METRICS
from analysis.importance import (
    CHEAP_METRICS,
    DESCRIPTIVE_METRICS,
    HEAD_METRICS,
    cheapest_heads,
    lowest_heads,
    ranking_metrics,
    ranks,
)
from analysis.loss_metrics import gradient, gradient_normalized
from tests.helpers import forbid, random_windows, tiny_model

HEADS = [(0, 0), (1, 4), (3, 5)]  # (layer, head) pairs checked by plain loops


def run_with_pre_hooks(arch: Architecture, ids: torch.Tensor, modules: list[nn.Module]) -> list[list[torch.Tensor]]:
    """Each module's first positional-or-hidden_states input, per call, from a plain forward pass."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]

    def grab(i: int):
        def hook(module, args, kwargs):
            seen[i].append((args[0] if args else kwargs["hidden_states"]).double())

        return hook

    handles = [m.register_forward_pre_hook(grab(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            arch.decoder(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def o_proj_inputs(arch: Architecture, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the o_proj input of every token, ``[tokens, num_heads * head_dim]`` float64."""
    modules = [arch.attention(i).o_proj for i in range(arch.shape.num_layers)]
    return [torch.cat(calls).flatten(0, 1) for calls in run_with_pre_hooks(arch, ids, modules)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two vectors; 0 when either is zero (Gemma's padding token 0 embeds to a zero vector)."""
    norms = a.norm().item() * b.norm().item()
    return (a @ b).item() / norms if norms > 0 else 0.0


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_o_proj_stats_match_captured_activations(tiny_arch):
    windows = random_windows()
    stats = o_proj_input_stats(tiny_arch, windows)
    xs = o_proj_inputs(tiny_arch, windows.input_ids)
    assert stats.tokens == windows.input_ids.numel() == xs[0].shape[0]
    for name in ("sum_sq", "mean", "var"):
        assert getattr(stats, name).dtype == torch.float64
        assert getattr(stats, name).shape == (4, 6 * 16)
    for layer, x in enumerate(xs):
        torch.testing.assert_close(stats.sum_sq[layer], (x**2).sum(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.mean[layer], x.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.var[layer], x.var(0, correction=0), rtol=1e-7, atol=1e-12)


def scored(arch: Architecture, metric: Callable) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``metric``'s head scores on random windows (float64 ``[layers, heads]``) and the o_proj inputs they read."""
    windows = random_windows()
    scores = metric(arch, o_proj_input_stats(arch, windows))
    assert scores.dtype == torch.float64 and scores.shape == (4, 6)
    return scores, o_proj_inputs(arch, windows.input_ids)


def test_wanda_sp_matches_the_formula_by_brute_force(tiny_arch):
    scores, xs = scored(tiny_arch, wanda_sp)
    hd = tiny_arch.shape.head_dim
    for layer, head in HEADS:
        w = tiny_arch.attention(layer).o_proj.weight.double()
        x = xs[layer]
        expected = 0.0
        for j in range(head * hd, (head + 1) * hd):
            mean_abs_w = sum(abs(w[i, j].item()) for i in range(w.shape[0])) / w.shape[0]
            norm_x = math.sqrt(sum(x[t, j].item() ** 2 for t in range(x.shape[0])))
            expected += mean_abs_w * norm_x
        assert scores[layer, head].item() == pytest.approx(expected, rel=1e-6)


def test_flap_wifv_matches_the_formula_of_flaps_code_by_brute_force(tiny_arch):
    """method.md: s_j = (var_j(X) * sum_i W_o[i,j]^2)^2, standardised per layer over channels, mean per head."""
    scores, xs = scored(tiny_arch, flap_wifv)
    hd = tiny_arch.shape.head_dim
    for layer in (0, 3):
        w = tiny_arch.attention(layer).o_proj.weight.double()
        x = xs[layer]
        channel = []
        for j in range(6 * hd):
            column = [x[t, j].item() for t in range(x.shape[0])]
            channel.append((statistics.pvariance(column) * sum(w[i, j].item() ** 2 for i in range(w.shape[0]))) ** 2)
        mean, std = statistics.mean(channel), statistics.stdev(channel)
        for head in range(6):
            expected = statistics.mean((channel[j] - mean) / std for j in range(head * hd, (head + 1) * hd))
            assert scores[layer, head].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(scores.mean(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_magnitude_sp_sums_the_l2_norms_of_the_heads_o_proj_columns(tiny_arch):
    scores = magnitude(tiny_arch)
    assert scores.dtype == torch.float64 and scores.shape == (4, 6)
    hd = tiny_arch.shape.head_dim
    for layer, head in HEADS:
        o = tiny_arch.attention(layer).o_proj.weight.double()
        expected = sum(
            math.sqrt(sum(o[i, j].item() ** 2 for i in range(o.shape[0]))) for j in range(head * hd, (head + 1) * hd)
        )
        assert scores[layer, head].item() == pytest.approx(expected, rel=1e-9)


def test_zeroed_o_proj_columns_score_zero_in_wanda_sp_and_magnitude_and_lowest_in_flap(tiny_arch):
    windows = random_windows()
    layer, head, hd = 2, 3, tiny_arch.shape.head_dim
    before = magnitude(tiny_arch)
    with torch.no_grad():
        tiny_arch.attention(layer).o_proj.weight[:, head * hd : (head + 1) * hd] = 0.0
    stats = o_proj_input_stats(tiny_arch, windows)
    assert wanda_sp(tiny_arch, stats)[layer, head].item() == 0.0
    assert wanda_sp(tiny_arch, stats)[layer].count_nonzero() == 5
    after = magnitude(tiny_arch)
    assert after[layer, head].item() == 0.0 and after[layer].count_nonzero() == 5
    assert flap_wifv(tiny_arch, stats)[layer].argmin().item() == head
    assert torch.equal(after[[0, 1, 3]], before[[0, 1, 3]])


def test_gradient_normalized_divides_each_layer_by_its_l2_norm(tiny_arch):
    windows = random_windows(n=2, length=10)
    raw = gradient(tiny_arch, windows)
    normalized = gradient_normalized(tiny_arch, windows)
    for layer in range(4):
        norm = math.sqrt(sum(v * v for v in raw[layer].tolist()))
        for head in range(6):
            assert normalized[layer, head].item() == pytest.approx(raw[layer, head].item() / norm, rel=1e-9)
    # The registry makes it from known gradient scores without another backward pass, to the same numbers.
    from_known = HEAD_METRICS["gradient_normalized"].scores(tiny_arch, windows, known={"gradient": raw})
    torch.testing.assert_close(from_known, normalized, rtol=0, atol=0)


def test_one_registry_says_which_metrics_are_cheap():
    assert CHEAP_METRICS == ("magnitude", "wanda_sp", "flap_wifv")  # weights or one forward pass, and they rank
    assert DEFAULT_METRICS == CHEAP_METRICS
    assert {"attention_entropy", "sink_attention"} == DESCRIPTIVE_METRICS
    assert ranking_metrics("backward") == ("gradient", "gradient_normalized", "magnitude", "wanda_sp", "flap_wifv")
    assert set(ranking_metrics("many")) == set(HEAD_METRICS) - DESCRIPTIVE_METRICS


def test_attention_block_influence_matches_a_hand_loop(tiny_arch):
    """Checked against the residual right after attention, read where the MLP half of the block starts.

    That point (the input of the pre-MLP norm: ``pre_feedforward_layernorm`` in Gemma,
    ``post_attention_layernorm`` in pre-norm blocks; the MLP itself in OLMo2, whose blocks have no
    pre-sublayer norms, ``input_layernorm`` included) is found without the adapter's ``branch_output``.
    """
    windows = random_windows(n=3, length=10)
    bi = attention_block_influence(tiny_arch, windows)
    assert bi.dtype == torch.float64 and bi.shape == (4,)
    assert ((bi >= 0) & (bi <= 2)).all()
    blocks = list(tiny_arch.layers)
    pre_norm = [hasattr(b, "input_layernorm") for b in blocks]
    mids = [
        getattr(b, "pre_feedforward_layernorm", None) or (b.post_attention_layernorm if pre else b.mlp)
        for b, pre in zip(blocks, pre_norm, strict=True)
    ]
    seen = run_with_pre_hooks(tiny_arch, windows.input_ids, blocks + mids)
    for layer in range(4):
        h = torch.cat(seen[layer]).flatten(0, 1)
        after = torch.cat(seen[4 + layer]).flatten(0, 1)
        cosines = [cosine(h[t], after[t]) for t in range(h.shape[0])]
        # The model adds the branch in float32, the score in float64: they agree to float32 rounding.
        assert bi[layer].item() == pytest.approx(1 - sum(cosines) / len(cosines), rel=1e-6)


def test_block_influence_matches_a_hand_loop(tiny_arch):
    windows = random_windows(n=3, length=10)
    bi = block_influence(tiny_arch, windows)
    assert bi.dtype == torch.float64 and bi.shape == (4,)
    assert ((bi >= 0) & (bi <= 2)).all()
    # Layer l's output is layer l+1's input; the last layer's output goes into the final norm.
    modules = [*tiny_arch.layers, tiny_arch.final_norm()]
    seen = [torch.cat(calls).flatten(0, 1) for calls in run_with_pre_hooks(tiny_arch, windows.input_ids, modules)]
    for layer in range(4):
        h, out = seen[layer], seen[layer + 1]
        cosines = [cosine(h[t], out[t]) for t in range(h.shape[0])]
        assert bi[layer].item() == pytest.approx(1 - sum(cosines) / len(cosines), rel=1e-9)


def test_attention_branch_that_adds_nothing_has_zero_influence(tiny_arch):
    with torch.no_grad():
        tiny_arch.attention(1).o_proj.weight.zero_()
    bi = attention_block_influence(tiny_arch, random_windows(n=2, length=10))
    assert bi[1].item() == pytest.approx(0.0, abs=1e-12)
    assert (bi[[0, 2, 3]] > 1e-6).all()


def test_scores_leave_weights_and_hooks_as_they_were(tiny_arch):
    before = {k: v.clone() for k, v in tiny_arch.model.state_dict().items()}
    hooks = hooks_left(tiny_arch.model)
    windows = random_windows(n=2, length=10)
    stats = o_proj_input_stats(tiny_arch, windows)
    wanda_sp(tiny_arch, stats), flap_wifv(tiny_arch, stats), magnitude(tiny_arch)
    attention_block_influence(tiny_arch, windows), block_influence(tiny_arch, windows)
    after = tiny_arch.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hooks_left(tiny_arch.model) == hooks


def test_hooks_are_removed_when_the_pass_fails():
    arch = Architecture(tiny_model("llama"))
    bad = random_windows(vocab=96)
    bad.input_ids[0, 3] = 10_000  # beyond the vocabulary: the embedding raises
    for score in (o_proj_input_stats, attention_block_influence, block_influence):
        with pytest.raises(IndexError):
            score(arch, bad)
        assert hooks_left(arch.model) == 0


def test_passes_from_other_threads_are_not_counted():
    """A session scoring the shared model is not disturbed by another session's forward pass."""
    arch = Architecture(tiny_model("llama"))
    windows, other = random_windows(seed=0), random_windows(n=7, seed=1)
    alone = o_proj_input_stats(arch, windows)

    def other_session(module, args):
        handle.remove()  # once is enough
        thread = threading.Thread(target=lambda: arch.decoder(input_ids=other.input_ids, use_cache=False))
        thread.start()
        thread.join()

    handle = arch.layers[0].register_forward_pre_hook(other_session)
    disturbed = o_proj_input_stats(arch, windows)
    assert disturbed.tokens == alone.tokens
    assert torch.equal(disturbed.sum_sq, alone.sum_sq)
    assert torch.equal(disturbed.var, alone.var)


# --- ablation and gradient ----------------------------------------------------------------------------


def test_ablation_equals_an_independent_leave_one_out(tiny_arch):
    from analysis.evaluation import perplexity
    from analysis.loss_metrics import ablation
    from analysis.masks import Mask

    windows = random_windows()
    scores = ablation(tiny_arch, windows, layers=[1, 3])
    base = Mask.unpruned(tiny_arch.shape, "tiny")
    reference = perplexity(tiny_arch, windows).mean_nll
    for layer in (1, 3):
        for head in range(tiny_arch.shape.num_heads):
            alone = perplexity(tiny_arch, windows, base.with_head(layer, head, False)).mean_nll - reference
            assert scores[layer, head].item() == pytest.approx(alone, abs=1e-6)
    assert torch.isnan(scores[[0, 2]]).all()  # rows not asked for are left out


def test_gradient_equals_the_slope_of_the_loss_in_each_head_scale(tiny_arch):
    """Independent check: scale one head's o_proj input slice by s and differentiate each window's loss in s.

    (A finite difference would not do: the models keep some float32 even in float64, e.g. in norms.)
    """
    from analysis.loss_metrics import gradient

    windows = random_windows(n=3)
    scores = gradient(tiny_arch, windows)
    hd = tiny_arch.shape.head_dim
    for layer, head in [(0, 1), (2, 4), (3, 0)]:
        scale = torch.ones((), requires_grad=True)

        def scale_slice(module, args, head=head, scale=scale):
            x = args[0]
            return (
                torch.cat(
                    [x[..., : head * hd], x[..., head * hd : (head + 1) * hd] * scale, x[..., (head + 1) * hd :]], -1
                ),
            )

        handle = tiny_arch.attention(layer).o_proj.register_forward_pre_hook(scale_slice)
        slopes = []
        try:
            with torch.enable_grad():
                for w in range(3):
                    ids = windows.input_ids[w : w + 1]
                    logits = tiny_arch.model(input_ids=ids).logits[:, :-1]
                    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                    slopes.append(torch.autograd.grad(loss, scale)[0].abs().item())
        finally:
            handle.remove()
        assert scores[layer, head].item() == pytest.approx(sum(slopes) / 3, rel=1e-4, abs=1e-8)
    for p in tiny_arch.model.parameters():
        assert p.grad is None  # the weights got no gradient


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_integrated_gradients_equal_a_hand_path_integral_and_are_complete(family):
    """Independent check: the midpoint rule over 128 points of d(window loss)/d(gates) on the path t * 1."""
    from analysis.loss_metrics import integrated_gradients

    tiny_arch = Architecture(tiny_model(family))
    windows = random_windows(n=2, length=12)
    result = integrated_gradients(tiny_arch, windows)
    shape = tiny_arch.shape
    hd = shape.head_dim
    gates = torch.zeros(shape.num_layers, shape.num_heads, requires_grad=True)

    def gate(layer):
        return lambda module, args: (args[0] * gates[layer].repeat_interleave(hd),)

    handles = [tiny_arch.attention(i).o_proj.register_forward_pre_hook(gate(i)) for i in range(shape.num_layers)]
    points = 128
    integral = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.float64)
    losses = []
    try:
        with torch.enable_grad():
            for w in range(2):
                ids = windows.input_ids[w : w + 1]

                def loss_at(t, ids=ids):
                    with torch.no_grad():
                        gates.fill_(t)
                    logits = tiny_arch.model(input_ids=ids).logits[:, :-1]
                    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

                for k in range(points):
                    integral += torch.autograd.grad(loss_at((k + 0.5) / points), gates)[0].double() / points
                losses.append((loss_at(1.0).item(), loss_at(0.0).item()))
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(result.scores, -integral / 2, rtol=1e-3, atol=1e-6)
    assert result.loss_all_heads == pytest.approx(statistics.mean(a for a, _ in losses), rel=1e-6)
    assert result.loss_no_heads == pytest.approx(statistics.mean(b for _, b in losses), rel=1e-6)
    # Completeness: the attributions add up to the loss change from removing every head.
    assert abs(result.completeness_error) < 1e-3 * abs(result.loss_no_heads - result.loss_all_heads)


def test_integrated_gradients_are_refused_where_a_post_attention_norm_undoes_the_gates():
    from analysis.errors import HeadroomError
    from analysis.loss_metrics import integrated_gradients

    with pytest.raises(HeadroomError, match="post-attention norm"):
        integrated_gradients(Architecture(tiny_model("gemma2")), random_windows(n=1, length=8))


def test_integrated_gradients_details_come_back_from_the_cache(tmp_path, monkeypatch):
    from analysis.cache import DiskCache
    from analysis.importance import cached_head_result
    from analysis.loading import LoadedModel

    arch = Architecture(tiny_model("llama"))
    lm = LoadedModel(model=arch.model, tokenizer=None, arch=arch, name="tiny", fingerprint="f" * 64, source="test")
    windows = random_windows(n=2, length=12)
    cache = DiskCache(tmp_path)
    first = cached_head_result(lm, windows, "integrated_gradients", cache=cache)
    assert set(first.details) >= {"loss_all_heads", "loss_no_heads", "attribution_sum", "completeness_error"}
    assert first.details["attribution_sum"] == pytest.approx(sum(map(sum, first.scores)))
    forbid(monkeypatch, importance, "integrated_gradients")
    again = cached_head_result(lm, windows, "integrated_gradients", cache=cache)
    assert again == first


# --- agreement between metrics ------------------------------------------------------------------------


def test_metric_agreement_spearman_and_top_k_overlap():
    from analysis.importance import metric_agreement

    a = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.7]], dtype=torch.float64)
    reverse = -a
    shifted = a.clone()
    shifted[0, 0], shifted[1, 1] = 0.25, 0.05  # swaps the two lowest heads' order, keeps the set
    partial = torch.full_like(a, float("nan"))
    partial[1] = a[1]  # one layer computed (a --layers run)
    agreement = metric_agreement({"a": a, "reverse": reverse, "shifted": shifted, "partial": partial}, k=2)
    rho = dict(zip(agreement.metrics, agreement.spearman, strict=True))
    overlap = dict(zip(agreement.metrics, agreement.top_k_overlap, strict=True))
    assert rho["a"][0] == pytest.approx(1.0) and rho["a"][1] == pytest.approx(-1.0)
    # ranks of a: [1, 4, 3, 6, 2, 5]; of shifted: [2, 4, 3, 6, 1, 5]; sum d^2 = 1 + 1 = 2;
    # rho = 1 - 6 * 2 / (n (n^2 - 1)) with n = 6: 1 - 12 / 210
    assert rho["a"][2] == pytest.approx(1 - 12 / 210)
    assert rho["a"][3] == pytest.approx(1.0)  # over layer 1 only, where both scored
    assert overlap["a"][0] == 1.0 and overlap["a"][1] == 0.0 and overlap["a"][2] == 1.0
    assert agreement.to_json()["k"] == 2


def test_head_orders_by_hand():
    scores = [[0.5, None, 0.1], None, [0.1, 2.0, -1.0]]  # layer 1 not scored
    assert lowest_heads(scores, 3) == [(2, 2), (0, 2), (2, 0)]  # the tie at 0.1 goes to the lower layer
    assert ranks(scores) == [[4, None, 2], [None, None, None], [3, 5, 1]]
    assert cheapest_heads(scores, "magnitude", 2) == [(2, 2), (0, 2)]
    assert cheapest_heads(scores, "attention_entropy", 2) == [(2, 1), (0, 0)]  # pattern statistics: highest first
