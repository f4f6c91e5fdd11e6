"""Which token positions of an encoded prompt hold a word or phrase.

    lab.token_indices(pipe, "a photograph of an astronaut riding a horse", "horse")   # [8]
    lab.token_indices(pipe, prompt, "a")                  # every occurrence: [1, 7]
    lab.token_indices(pipe, prompt, "a", occurrence=1)    # the second one only: [7]

Indices are positions in the sequence the text encoder sees (77 long, position 0 is the
start-of-text token), i.e. the key axis of cross-attention probabilities. Matching is done on
token ids, so it follows the tokenizer: case is folded the way it folds it, a word split into
several tokens gives several indices, punctuation is its own token, and a word only matches whole
words ("light" does not match the end of "moonlight").
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["token_indices", "prompt_tokens", "clip_tokenizer", "TOKENIZER_DIR"]

# CLIP's real BPE vocabulary (converted from the open-clip wheel by tools/convert_clip_vocab.py):
# SD 1.x, 2.x and XL all tokenize with it.
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"

_WORD_END = "</w>"  # CLIP's BPE marks the last piece of every word with it


def clip_tokenizer(pad_token: str | None = None):
    """The real CLIP BPE tokenizer shipped in lab/tokenizer (SD-2 and SDXL's second one pad with "!")."""
    from transformers import CLIPTokenizer

    if pad_token is None:
        return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token)


def _tokenizers(tokenizer_or_pipe) -> dict:
    """{"tokenizer": ..., "tokenizer_2": ...} for a pipeline (SDXL has two), or the one tokenizer given."""
    if hasattr(tokenizer_or_pipe, "tokenizer"):
        found = {name: getattr(tokenizer_or_pipe, name, None) for name in ("tokenizer", "tokenizer_2")}
        found = {name: tok for name, tok in found.items() if tok is not None}
        if not found:
            raise ValueError("this pipeline has no tokenizer")
        return found
    if callable(getattr(tokenizer_or_pipe, "convert_ids_to_tokens", None)):
        return {"tokenizer": tokenizer_or_pipe}
    raise TypeError(f"expected a pipeline or a tokenizer, got {type(tokenizer_or_pipe).__name__}")


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    # No truncation: we want to see what falls beyond the limit to say so.
    return list(tokenizer(text, add_special_tokens=special, truncation=False, verbose=False)["input_ids"])


def _words(tokenizer, ids: list[int]) -> list[str]:
    """The prompt's words as the tokenizer sees them (word pieces joined), for error messages."""
    words, piece = [], ""
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token in tokenizer.all_special_tokens:
            continue
        piece += token
        if token.endswith(_WORD_END):
            words.append(piece[: -len(_WORD_END)])
            piece = ""
    return words + ([piece] if piece else [])


def prompt_tokens(tokenizer_or_pipe, prompt: str) -> list[tuple[int, str]]:
    """(index, token) for every token of the encoded prompt, start and end tokens included."""
    tokenizer = next(iter(_tokenizers(tokenizer_or_pipe).values()))
    ids = _encode(tokenizer, prompt, special=True)
    return list(enumerate(tokenizer.convert_ids_to_tokens(ids)))


def _indices_for(tokenizer, prompt: str, word: str, occurrence: int | None) -> list[int]:
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string, got {word!r}")
    prompt_ids = _encode(tokenizer, prompt, special=True)
    word_ids = _encode(tokenizer, word, special=False)
    tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    uses_word_ends = any(token.endswith(_WORD_END) for token in tokens)
    n = len(word_ids)

    starts = []
    for start in range(len(prompt_ids) - n + 1):
        if prompt_ids[start : start + n] != word_ids:
            continue
        # A match must begin a word: the token before it ends one (or is the start token).
        previous = tokens[start - 1] if start > 0 else None
        if (
            uses_word_ends
            and start > 0
            and not (previous.endswith(_WORD_END) or previous in tokenizer.all_special_tokens)
        ):
            continue
        starts.append(start)
    if not starts:
        words = _words(tokenizer, prompt_ids)
        raise ValueError(f"{word!r} is not in the prompt. The prompt's words: {', '.join(words)}")

    if occurrence is not None:
        if not -len(starts) <= occurrence < len(starts):
            raise ValueError(
                f"{word!r} occurs {len(starts)} time(s) in the prompt; occurrence={occurrence} is out of range"
            )
        starts = [starts[occurrence]]

    # The encoder keeps model_max_length tokens: start token, content, end token.
    last_kept = tokenizer.model_max_length - 2
    indices = [start + offset for start in starts for offset in range(n)]
    beyond = [index for index in indices if index > last_kept]
    if beyond:
        kept = _words(tokenizer, prompt_ids[1 : last_kept + 1])
        raise ValueError(
            f"{word!r} is at token position(s) {beyond}, beyond the {tokenizer.model_max_length} tokens the "
            f"text encoder keeps: the prompt is truncated after {' '.join(kept[-3:])!r}. Shorten the prompt"
            + (" or choose an earlier occurrence." if len(starts) > 1 or occurrence is not None else ".")
        )
    return indices


def token_indices(
    tokenizer_or_pipe, prompt: str, word: str, occurrence: int | None = None, *, per_tokenizer: bool = False
) -> list[int] | dict[str, list[int]]:
    """Positions of `word` (a word or phrase) in the encoded `prompt`.

    occurrence     None: every occurrence; n: only the n-th (0-based, negative counts from the end).
    per_tokenizer  SDXL has two tokenizers; by default the indices must agree (they do for CLIP
                   tokenizers, which share one vocabulary) and one list is returned. True returns
                   {"tokenizer": [...], "tokenizer_2": [...]}.
    """
    found = {name: _indices_for(tok, prompt, word, occurrence) for name, tok in _tokenizers(tokenizer_or_pipe).items()}
    if per_tokenizer:
        return found
    first = next(iter(found.values()))
    if any(indices != first for indices in found.values()):
        raise ValueError(f"the tokenizers disagree on {word!r}: {found}; pass per_tokenizer=True")
    return first
