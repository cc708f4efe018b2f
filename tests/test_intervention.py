"""apply_mask: exact, reversible, per-thread, on every supported family."""

from __future__ import annotations

import copy
import threading

import torch

from analysis.architecture import Architecture
from analysis.intervention import apply_mask
from analysis.masks import Mask
from tests.helpers import qkv_weights, random_windows


def logits(arch: Architecture, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return arch.model(input_ids=ids).logits


def unpruned(arch: Architecture) -> Mask:
    return Mask.unpruned(arch.shape, "tiny")


def fold_alpha(arch: Architecture, layer: int, alpha: float) -> None:
    """Physically scale a layer's attention branch where it joins the residual stream."""
    if arch.has_post_attention_norm:  # Gemma's RMSNorm multiplies by (1 + weight), OLMo2's by weight
        w = arch.layers[layer].post_attention_layernorm.weight
        offset = 1.0 if arch.config.model_type in ("gemma2", "gemma3_text") else 0.0
        w.copy_(alpha * (offset + w) - offset)
    else:
        o = arch.attention(layer).o_proj
        o.weight.mul_(alpha)
        if o.bias is not None:
            o.bias.mul_(alpha)


def test_masked_forward_equals_physically_pruned_copy(tiny_arch):
    arch, hd = tiny_arch, tiny_arch.shape.head_dim
    mask = unpruned(arch).with_head(0, 1, False).with_head(2, 0, False).with_head(2, 5, False)
    mask = mask.with_layer(1, alpha=0.37).with_layer(3, alpha=2.5)
    copy_arch = Architecture(copy.deepcopy(arch.model))
    with torch.no_grad():
        for layer, row in enumerate(mask.heads):
            for head, keep in enumerate(row):
                if not keep:
                    copy_arch.attention(layer).o_proj.weight[:, head * hd : (head + 1) * hd] = 0
        fold_alpha(copy_arch, 1, 0.37)
        fold_alpha(copy_arch, 3, 2.5)
    ids = random_windows().input_ids
    with apply_mask(arch, mask):
        masked = logits(arch, ids)
    torch.testing.assert_close(masked, logits(copy_arch, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, logits(arch, ids), atol=1e-3)  # the mask did something


def branch_outputs(arch: Architecture, layer: int, mask: Mask | None) -> torch.Tensor:
    """What ``layer`` adds to the residual stream as its attention branch, under ``mask``."""
    seen = []
    with apply_mask(arch, mask):
        handle = arch.branch_output(layer).register_forward_hook(  # runs after the mask's hooks
            lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        logits(arch, random_windows().input_ids)
        handle.remove()
    return seen[0]


def test_alpha_scales_what_joins_the_residual_stream(tiny_arch):
    """For Gemma that is after the post-attention norm: the branch scales exactly linearly."""
    arch = tiny_arch
    scaled = branch_outputs(arch, 1, unpruned(arch).with_layer(1, alpha=0.3))
    torch.testing.assert_close(scaled, 0.3 * branch_outputs(arch, 1, None), rtol=1e-6, atol=1e-7)


def test_drop_qk_equals_the_formula_of_method_md(tiny_arch):
    """Branch output == alpha * [post-norm] o_proj(repeat_kv(v_proj(x))) with pruned heads zeroed."""
    arch, s = tiny_arch, tiny_arch.shape
    layer, alpha = 2, 0.6
    mask = unpruned(arch).with_layer(layer, drop_qk=True, alpha=alpha).with_head(layer, 4, False)
    seen: dict[str, torch.Tensor] = {}
    attn = arch.attention(layer)
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]), with_kwargs=True)

    def record(module, args, output):
        seen["branch"] = output[0] if isinstance(output, tuple) else output

    try:
        with apply_mask(arch, mask):
            h2 = arch.branch_output(layer).register_forward_hook(record)  # after the mask's own hooks
            logits(arch, random_windows().input_ids)
            h2.remove()
    finally:
        h1.remove()
    x = seen["x"]
    with torch.no_grad():
        v = torch.nn.functional.linear(x, *qkv_weights(arch, layer)[2]).view(*x.shape[:-1], s.num_kv_heads, s.head_dim)
        keep = torch.tensor(mask.heads[layer], dtype=x.dtype)
        per_head = v[..., [h // s.group_size for h in range(s.num_heads)], :] * keep[:, None]
        expected = attn.o_proj(per_head.flatten(-2))
        if arch.has_post_attention_norm:
            expected = arch.layers[layer].post_attention_layernorm(expected)
    torch.testing.assert_close(seen["branch"], alpha * expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_removes_the_attention_branch(tiny_arch):
    arch = tiny_arch
    zeroed = Architecture(copy.deepcopy(arch.model))
    with torch.no_grad():
        o = zeroed.attention(1).o_proj
        o.weight.zero_()
        if o.bias is not None:
            o.bias.zero_()
    ids = random_windows().input_ids
    with apply_mask(arch, unpruned(arch).with_layer(1, alpha=0.0)):
        masked = logits(arch, ids)
    torch.testing.assert_close(masked, logits(zeroed, ids), rtol=1e-5, atol=1e-6)


def test_leaving_the_context_restores_bit_identical_outputs(tiny_arch):
    arch = tiny_arch
    ids = random_windows().input_ids
    state = {k: v.clone() for k, v in arch.model.state_dict().items()}
    before = logits(arch, ids)
    mask = unpruned(arch).with_head(1, 2, False).with_layer(3, drop_qk=True, alpha=0.5).with_layer(0, alpha=0.0)
    with apply_mask(arch, mask):
        logits(arch, ids)
    assert torch.equal(before, logits(arch, ids))
    assert all(torch.equal(state[k], v) for k, v in arch.model.state_dict().items())
    for module in arch.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in module.__dict__


def test_threads_with_different_masks_see_only_their_own(tiny_arch):
    arch = tiny_arch
    ids = random_windows().input_ids
    masks = [
        unpruned(arch).with_head(0, 0, False).with_layer(2, drop_qk=True),
        unpruned(arch).with_layer(1, alpha=0.2).with_head(3, 5, False),
        None,
    ]
    expected = []
    for mask in masks:
        with apply_mask(arch, mask):
            expected.append(logits(arch, ids))
    assert not torch.equal(expected[0], expected[1])
    barrier = threading.Barrier(len(masks))
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(masks))}

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(6):
            with apply_mask(arch, masks[i]):
                results[i].append(logits(arch, ids))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(masks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        assert len(outs) == 6
        assert all(torch.equal(out, expected[i]) for out in outs), f"thread {i} saw another thread's mask"


def test_nested_masks_restore_the_outer_one(tiny_arch):
    arch = tiny_arch
    ids = random_windows().input_ids
    outer = unpruned(arch).with_head(0, 0, False)
    inner = unpruned(arch).with_layer(2, alpha=0.0)
    with apply_mask(arch, outer):
        first = logits(arch, ids)
        with apply_mask(arch, inner):
            nested = logits(arch, ids)
        again = logits(arch, ids)
    with apply_mask(arch, inner):
        alone = logits(arch, ids)
    assert torch.equal(first, again)
    assert torch.equal(nested, alone)


def test_an_unpruned_block_inside_a_masked_one_runs_unpruned(tiny_arch):
    arch = tiny_arch
    ids = random_windows().input_ids
    plain = logits(arch, ids)
    with apply_mask(arch, unpruned(arch).with_layer(1, alpha=0.0)):
        with apply_mask(arch, None):
            inner = logits(arch, ids)
        with apply_mask(arch, unpruned(arch)):
            inner_unpruned = logits(arch, ids)
        outer = logits(arch, ids)
    assert torch.equal(inner, plain) and torch.equal(inner_unpruned, plain)
    assert not torch.equal(outer, plain)
