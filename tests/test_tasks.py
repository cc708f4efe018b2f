"""The task suite on a tiny character-level model, each task against an independent computation.

One character is one token (:mod:`tests.char_model`), so prompts, targets and greedy generations
round-trip exactly through the tokenizer, and lengths in characters are lengths in tokens.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from analysis import long_context, task_scoring, task_suite, tasks
from analysis.cache import DiskCache
from analysis.corpus import default_text, make_windows
from analysis.errors import HeadroomError
from analysis.evaluation import perplexity
from analysis.intervention import apply_mask
from analysis.loading import LoadedModel
from analysis.masks import Mask
from tests.char_model import CHARS, MAX_POSITIONS, VOCAB, char_lm, generate, pruned


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return char_lm()


def test_tokenizer_is_one_character_per_token(lm):
    text = "The pass key is 12345.\n"
    assert lm.tokenizer(text).input_ids == [CHARS.index(c) for c in text]
    assert lm.tokenizer.decode(lm.tokenizer(text).input_ids) == text


# --- scoring -------------------------------------------------------------------------------------


def test_greedy_match_and_loglik_on_hand_made_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert task_scoring.greedy_match(logits, [1, 0, 2])
    assert not task_scoring.greedy_match(logits, [1, 0, 1])
    by_hand = sum(
        math.log(math.exp(row[t]) / sum(math.exp(v) for v in row))
        for row, t in zip(logits.tolist(), [2, 0, 1], strict=True)
    )
    assert task_scoring.target_loglik(logits, [2, 0, 1]) == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("mask_of", [lambda lm: None, pruned])
def test_exact_match_is_greedy_generation(lm, mask_of):
    mask = mask_of(lm)
    for prompt in ("The pass key is", "Hello world,"):  # no trailing space: it would move to the target
        produced = generate(lm, prompt, 5, mask)
        wrong = produced[:-1] + ("a" if produced[-1] != "a" else "b")
        with apply_mask(lm.arch, mask):
            assert task_scoring.exact_match(lm, prompt, produced)
            assert not task_scoring.exact_match(lm, prompt, wrong)


def test_choice_logliks_are_sums_of_log_probabilities(lm):
    prompt, choices = "Paris is in", [" France", " Peru"]
    ids = lm.tokenizer(prompt + choices[0]).input_ids
    logp = lm.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(prompt)
    by_hand = sum(float(logp[n + i - 1, ids[n + i]]) for i in range(len(choices[0])))
    assert task_scoring.choice_logliks(lm, prompt, choices)[0] == pytest.approx(by_hand, abs=1e-4)


def test_trailing_prompt_whitespace_moves_to_the_target(lm):
    context, target = task_scoring.encode_pair(lm, "key is ", "12")
    assert lm.tokenizer.decode(context) == "key is" and lm.tokenizer.decode(target) == " 12"


# --- tasks ---------------------------------------------------------------------------------------


def test_passkey_counts_greedy_generations_and_skips_lengths_beyond_the_context(lm):
    lengths, depths = (300, 500, 1024), (0.2, 0.8)
    result = tasks.passkey(lm, pruned(lm), lengths, depths, samples=2, seed=3)
    assert result.skipped_lengths == (1024,) and result.max_positions == MAX_POSITIONS
    filler = tasks.filler_tokens(lm)
    assert [(c.context_tokens, c.depth) for c in result.cells] == [(n, d) for n in (300, 500) for d in depths]
    for cell in result.cells:
        items = tasks.passkey_items(lm, cell.context_tokens, cell.depth, 2, 3, filler)
        assert len({i.target for i in items}) == 2  # seeded keys differ between samples
        for item in items:
            key = item.target.strip()
            assert item.target == f" {key}" and len(key) == 5 and key in item.prompt
            tokens = len(lm.tokenizer(item.prompt + item.target).input_ids)
            assert cell.context_tokens - 8 <= tokens <= cell.context_tokens
            needle = tasks.PASSKEY_NEEDLE.format(key=key)
            filler_chars = len(item.prompt) - len(tasks.PASSKEY_INTRO) - len(needle) - len(tasks.PASSKEY_QUESTION)
            before = item.prompt.index(needle) - len(tasks.PASSKEY_INTRO)
            assert before / filler_chars == pytest.approx(cell.depth, abs=0.02)
        expected = sum(generate(lm, i.prompt, len(i.target), pruned(lm)) == i.target for i in items)
        assert cell.correct == expected and cell.accuracy == expected / 2
    assert tasks.passkey(lm, pruned(lm), lengths, depths, samples=2, seed=3) == result  # deterministic


def test_induction_accuracy_equals_a_hand_count_from_logits(lm):
    mask = pruned(lm)
    result = tasks.induction(lm, mask, sequences=3, length=20, seed=1)
    ids = tasks.induction_ids(lm, 3, 20, seed=1)
    assert torch.equal(ids[:, :20], ids[:, 20:]) and ids.shape == (3, 40)
    with apply_mask(lm.arch, mask):
        logits = lm.model(ids).logits
    predicted = logits.argmax(-1)
    second = (predicted[:, 20:39] == ids[:, 21:40]).sum().item()
    first = (predicted[:, 0:19] == ids[:, 1:20]).sum().item()
    nll = F.cross_entropy(logits[:, 20:39].reshape(-1, VOCAB), ids[:, 21:40].reshape(-1)).item()
    assert result.accuracy == second / 57 and result.first_copy_accuracy == first / 57
    assert result.second_copy_mean_nll == pytest.approx(nll, rel=1e-5)
    assert result.predicted_tokens == 57


def test_last_word_items_end_their_article_and_are_scored_by_generation(lm):
    items = tasks.last_word_items(lm, samples=6, max_context_tokens=120)
    articles = tasks.eval_articles()
    assert len(items) == 6
    for item in items:
        assert len(item.prompt) <= 120 and item.target.strip().isalpha()
        assert any((item.prompt + item.target) in a for a in articles)
    result = tasks.last_word(lm, None, samples=6, max_context_tokens=120)
    assert result.correct == sum(generate(lm, i.prompt, len(i.target)) == i.target for i in items)


def test_continuation_agreement_against_generations_by_hand(lm):
    mask = pruned(lm)
    result = tasks.continuation(lm, mask, prompts=3, prompt_tokens=20, new_tokens=6)
    same = first = 0
    firsts = []
    for article in tasks.eval_articles()[:3]:
        a, b = generate(lm, article[:20], 6), generate(lm, article[:20], 6, mask)
        same += sum(x == y for x, y in zip(a, b, strict=True))
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 6)
        firsts.append(first)
    assert result.token_match_rate == same / 18 and result.first_divergence == tuple(firsts)
    itself = tasks.continuation(lm, None, prompts=3, prompt_tokens=20, new_tokens=6)
    assert itself.token_match_rate == 1.0 and itself.identical_continuations == 3


def test_long_context_perplexity_is_the_protocol_perplexity(lm, monkeypatch):
    monkeypatch.setattr(long_context, "LOGIT_POSITIONS", 100)  # logits made in several slices per window
    mask = pruned(lm)
    result = long_context.long_ppl(lm, mask, seqlens=(128, 512, 1024), tokens_per_seqlen=1024)
    assert result.skipped_seqlens == (1024,)  # beyond the 600 positions
    for row in result.rows:
        windows = make_windows(lm.tokenizer, default_text("default-eval"), row.seqlen, 1024)
        assert row.perplexity == pytest.approx(perplexity(lm.arch, windows, mask).perplexity, rel=1e-5)
        with apply_mask(lm.arch, mask):
            logits = lm.model(windows.input_ids).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), windows.input_ids[:, 1:], reduction="none").mean(0)
        width = row.bin_tokens
        assert row.loss_by_position[0] == pytest.approx(nll[:width].mean().item(), rel=1e-5)
        assert row.loss_by_position[-1] == pytest.approx(
            nll[(len(row.loss_by_position) - 1) * width :].mean().item(), rel=1e-5
        )


def test_cached_task_is_keyed_by_mask_and_parameters(lm, tmp_path):
    cache = DiskCache(tmp_path)
    params = {"sequences": 2, "length": 12}
    first = task_suite.cached_task(lm, "induction", None, cache, **params)
    assert task_suite.cached_task(lm, "induction", Mask.unpruned(lm.shape, "other"), cache, **params) == first
    entries = lambda: sorted(p.name for p in (tmp_path / "results" / "task").iterdir())  # noqa: E731
    assert len(entries()) == 1
    masked = task_suite.cached_task(lm, "induction", pruned(lm), cache, **params)
    assert masked == tasks.induction(lm, pruned(lm), **params) and len(entries()) == 2
    task_suite.cached_task(lm, "induction", None, cache, sequences=3, length=12)
    assert len(entries()) == 3


def test_continuation_reference_is_cached_once_for_every_mask(lm, tmp_path):
    cache = DiskCache(tmp_path)
    params = {"prompts": 2, "prompt_tokens": 16, "new_tokens": 4}
    a = task_suite.cached_task(lm, "continuation", pruned(lm), cache, **params)
    task_suite.cached_task(lm, "continuation", None, cache, **params)
    assert a == tasks.continuation(lm, pruned(lm), **params)
    assert len(list((tmp_path / "results" / "task_reference").iterdir())) == 1


def test_unknown_task_names_are_refused(lm):
    with pytest.raises(HeadroomError, match="unknown task passkee; choose among passkey"):
        task_suite.check_task_names(["passkee"])


def test_suite_progress_reaches_the_total(lm, tmp_path):
    seen = []
    task_suite.run_suite(lm, ["induction"], None, DiskCache(tmp_path), lambda d, t: seen.append((d, t)))
    assert seen[-1] == (1000, 1000) and all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))


def test_passkey_refuses_a_model_shorter_than_every_length(lm):
    with pytest.raises(HeadroomError, match="exceeds the model's context of 600 positions; leave passkey out"):
        tasks.passkey(lm, None, lengths=(1024, 2048))
