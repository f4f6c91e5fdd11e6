"""lab.tokens: word or phrase -> positions in the encoded prompt (the cross-attention key axis)."""

import pytest

import lab

PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def tokenizer():
    return lab.testing.clip_tokenizer()


def test_real_clip_tokenizer_ids(tokenizer):
    assert tokenizer(PROMPT).input_ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert tokenizer.model_max_length == 77


def test_single_word_positions_account_for_the_start_token(tokenizer, sd1):
    assert lab.token_indices(tokenizer, PROMPT, "horse") == [8]
    assert lab.token_indices(sd1, PROMPT, "astronaut") == [5]
    assert lab.token_indices(sd1, PROMPT, "riding a horse") == [6, 7, 8]


def test_multi_token_word(tokenizer):
    # "photorealistic" is two BPE tokens: photo + realistic</w>
    assert lab.token_indices(tokenizer, "a photorealistic horse", "photorealistic") == [2, 3]


def test_repeated_word_all_or_nth(tokenizer):
    assert lab.token_indices(tokenizer, PROMPT, "a") == [1, 7]  # "an" is another word
    assert lab.token_indices(tokenizer, PROMPT, "a", occurrence=1) == [7]
    assert lab.token_indices(tokenizer, PROMPT, "a", occurrence=-1) == [7]
    with pytest.raises(ValueError, match="occurs 2 time"):
        lab.token_indices(tokenizer, PROMPT, "a", occurrence=2)


def test_punctuation_and_case(tokenizer):
    prompt = "A Horse, a cat; and a HORSE!"
    assert lab.token_indices(tokenizer, prompt, "horse") == [2, 9]
    assert lab.token_indices(tokenizer, prompt, "Horse,") == [2, 3]
    assert lab.token_indices(tokenizer, prompt, ",") == [3]
    assert lab.token_indices(tokenizer, prompt, "HORSE", occurrence=1) == [9]


def test_only_whole_words_match(tokenizer):
    # "zxqvlight" ends with the token "light</w>", which must not count as the word "light".
    with pytest.raises(ValueError, match="'light' is not in the prompt"):
        lab.token_indices(tokenizer, "a zxqvlight lamp", "light")


def test_absent_word_lists_the_prompt_words(tokenizer):
    with pytest.raises(
        ValueError,
        match="'cat' is not in the prompt. The prompt's words: a, photograph, of, an, astronaut, riding, a, horse",
    ):
        lab.token_indices(tokenizer, PROMPT, "cat")
    with pytest.raises(ValueError, match="non-empty"):
        lab.token_indices(tokenizer, PROMPT, "  ")


def test_word_beyond_the_max_length_is_an_error(tokenizer):
    long_prompt = " ".join(["red"] * 80) + " horse"
    with pytest.raises(
        ValueError, match=r"position\(s\) \[81\], beyond the 77 tokens .* truncated after 'red red red'"
    ):
        lab.token_indices(tokenizer, long_prompt, "horse")
    # The last kept content position is 75 (76 is the end token after truncation).
    edge = " ".join(["red"] * 74) + " horse"
    assert lab.token_indices(tokenizer, edge, "horse") == [75]
    with pytest.raises(ValueError, match="beyond"):
        lab.token_indices(tokenizer, " ".join(["red"] * 75) + " horse", "horse")


def test_sdxl_two_tokenizers(sdxl):
    assert lab.token_indices(sdxl, PROMPT, "horse") == [8]
    assert lab.token_indices(sdxl, PROMPT, "horse", per_tokenizer=True) == {"tokenizer": [8], "tokenizer_2": [8]}
    assert sdxl.tokenizer_2.pad_token == "!"  # they differ only in padding


def test_prompt_tokens(sd1):
    tokens = lab.prompt_tokens(sd1, "a Horse,")
    assert tokens == [(0, "<|startoftext|>"), (1, "a</w>"), (2, "horse</w>"), (3, ",</w>"), (4, "<|endoftext|>")]


def test_bad_tokenizer_argument():
    with pytest.raises(TypeError, match="expected a pipeline or a tokenizer"):
        lab.token_indices(object(), PROMPT, "horse")
