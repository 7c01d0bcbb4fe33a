"""The MiniLM prompt encoder (loaded once for this module) and prompt validation."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from worldloop.models.text import TEXT_DIM, PromptEncoder, null_embedding, validate_prompt

MAX_TOKENS = 16


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    return PromptEncoder(MAX_TOKENS)


def sentence_vectors(encoder: PromptEncoder, prompts: list[str]) -> torch.Tensor:
    return encoder.encode(prompts).tokens[:, 0]


def test_shapes_mask_and_padding(encoder: PromptEncoder) -> None:
    emb = encoder.encode(["ice cave", "a long corridor of red bricks lit by torches"])
    assert emb.tokens.shape == (2, MAX_TOKENS, TEXT_DIM) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (2, MAX_TOKENS) and emb.mask.dtype == torch.bool
    # Sentence vector + [CLS] ice cave [SEP]; real tokens come first, padding is zero.
    assert emb.mask[0].tolist() == [True] * 5 + [False] * (MAX_TOKENS - 5)
    assert emb.mask[1].sum() > 5
    assert torch.all(emb.tokens[~emb.mask] == 0)
    assert torch.all(emb.tokens[emb.mask].norm(dim=-1) > 0.5)
    assert emb.tokens[:, 0].norm(dim=-1) == pytest.approx(torch.ones(2), abs=1e-5)


def test_long_prompt_keeps_its_meaning_when_cut(encoder: PromptEncoder) -> None:
    head = "a stone maze with " + "narrow " * 20
    emb = encoder.encode([head + "corridors of ice", head + "corridors of fire"])
    assert emb.tokens.shape == (2, MAX_TOKENS, TEXT_DIM) and bool(emb.mask.all())
    # Same first tokens, but the sentence vectors (and the kept states) saw the different endings.
    assert not torch.allclose(emb.tokens[0, 0], emb.tokens[1, 0], atol=1e-3)
    assert not torch.allclose(emb.tokens[0, 1:], emb.tokens[1, 1:], atol=1e-3)


def test_sentence_vector_matches_sentence_transformers(encoder: PromptEncoder) -> None:
    # all-MiniLM-L6-v2 through sentence-transformers' SentenceTransformer.encode("ice cave")[:6].
    reference = torch.tensor([-0.049898, 0.028752, -0.006294, 0.038353, -0.014960, -0.018514])
    assert torch.allclose(sentence_vectors(encoder, ["ice cave"])[0, :6], reference, atol=2e-5)


def test_same_prompt_same_embedding_from_cache(encoder: PromptEncoder) -> None:
    first = encoder.encode(["desert ruins at noon"])
    before = encoder.cache_info()
    again = encoder.encode(["  desert   ruins at noon\n"])  # the same canonical text
    after = encoder.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.mask, again.mask)
    again.tokens.zero_()  # callers get their own tensors, not the cache's
    assert torch.equal(encoder.encode(["desert ruins at noon"]).tokens, first.tokens)


def test_batching_does_not_change_embeddings(encoder: PromptEncoder) -> None:
    prompts = ["toxic lab with green slime", "neon city at night, pink and cyan signs"]
    encoder.clear_cache()
    together = encoder.encode(prompts)
    encoder.clear_cache()
    alone = [encoder.encode([p]) for p in prompts]
    for i, single in enumerate(alone):
        assert torch.allclose(together.tokens[i], single.tokens[0], atol=1e-5)
        assert torch.equal(together.mask[i], single.mask[0])


def test_different_prompts_differ_and_semantics_hold(encoder: PromptEncoder) -> None:
    vectors = sentence_vectors(encoder, [
        "an ice cave with frozen blue walls",
        "a glacier cavern full of snow and ice crystals",
        "a hell fortress of red brick, lava and fire",
    ])
    cos = F.cosine_similarity(vectors[:, None], vectors[None], dim=-1)
    assert not torch.allclose(vectors[0], vectors[1])
    assert cos[0, 1] > cos[0, 2] + 0.1 and cos[0, 1] > cos[1, 2] + 0.1


def test_empty_prompt_is_the_null_condition(encoder: PromptEncoder) -> None:
    emb = encoder.encode(["", "   ", "ice cave"])
    null = null_embedding(2, MAX_TOKENS)
    assert torch.equal(emb.tokens[:2], null.tokens) and torch.equal(emb.mask[:2], null.mask)
    assert not emb.mask[:2].any() and emb.mask[2].any()
    assert torch.equal(encoder.null_embedding(3).mask, torch.zeros(3, MAX_TOKENS, dtype=torch.bool))
    assert len(encoder.encode([])) == 0


def test_lru_cache_evicts_the_least_recent() -> None:
    small = PromptEncoder(MAX_TOKENS, cache_size=2)
    small.encode(["one"])
    small.encode(["two"])
    small.encode(["one"])  # "two" is now the least recent
    small.encode(["three"])
    assert small.cache_info().size == 2
    misses = small.cache_info().misses
    small.encode(["one"])
    assert small.cache_info().misses == misses
    small.encode(["two"])
    assert small.cache_info().misses == misses + 1


def test_concurrent_encodes_agree(encoder: PromptEncoder) -> None:
    prompts = [f"a dungeon corridor number {i}" for i in range(4)]
    encoder.clear_cache()
    expected = {p: encoder.encode([p]).tokens for p in prompts}
    encoder.clear_cache()
    results: dict[tuple[int, str], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for p in prompts[worker % 2:] + prompts:
                results[(worker, p)] = encoder.encode([p]).tokens
        except BaseException as err:  # surfaced below, in the test's own thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (_, p), tokens in results.items():
        assert torch.allclose(tokens, expected[p], atol=1e-5)


def test_encode_validates(encoder: PromptEncoder) -> None:
    with pytest.raises(ValueError, match="too long"):
        encoder.encode(["x" * 301])
    with pytest.raises(ValueError, match="list of prompts"):
        encoder.encode("ice cave")  # type: ignore[arg-type]


def test_validate_prompt_canonical_form() -> None:
    assert validate_prompt("  ice\tcave \n\n at  dusk ") == "ice cave at dusk"
    assert validate_prompt("") == "" and validate_prompt(" \n ") == ""
    assert validate_prompt("cafe\u0301") == "caf\u00e9"  # NFC
    assert validate_prompt("ok " * 100, max_chars=300) == ("ok " * 100).strip()
    assert validate_prompt("🧊 cave") == "🧊 cave"


@pytest.mark.parametrize(("text", "message"), [
    ("x" * 301, "too long: 301 characters"),
    ("\u0958" * 300, "too long once normalised: 600 characters"),  # NFC decomposes it: it grows
    ("\ufb2c" * 300, "too long once normalised: 900 characters"),
    ("ice \ud800 cave", "lone surrogate U\\+D800 at position 4"),
    ("ice\x00cave", "control character U\\+0000 at position 3"),
    ("ice\x1b[31mcave", "control character U\\+001B"),
    ("ice\x85cave", "control character U\\+0085"),
    (None, "must be a string, got NoneType"),
    (b"ice cave", "must be a string, got bytes"),
    (["ice cave"], "must be a string, got list"),
])
def test_validate_prompt_rejects(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_prompt(text)
