"""Incremental detokenization and stop-string handling.

Decoding token by token is wrong for byte-level BPE (a character split over tokens decodes to U+FFFD
until its last byte arrives) and for SentencePiece (a token's leading space depends on its left
neighbour). As vLLM does, each step decodes a short window of earlier tokens with and without the new
ones and emits the difference, holding text back while it ends in an incomplete character.
"""

from __future__ import annotations

from ..models.tokenizer import Tokenizer
from .sequence import Sequence


def append_new_text(tokenizer: Tokenizer, seq: Sequence) -> str:
    """Extend ``seq.text`` with whatever its newest tokens add; return the new text."""
    skip = seq.params.skip_special_tokens
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new = full[len(prefix) :]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.text += new
    return new


def find_stop_string(seq: Sequence, new_text_len: int) -> str | None:
    """If a stop string ends inside the newly added text, truncate ``seq.text`` there and return it.
    Only the tail that could contain a new match is searched, so this is O(new text) per step."""
    stops = seq.params.stop
    if not stops or not new_text_len:
        return None
    window = new_text_len + max(len(s) for s in stops) - 1
    tail_start = max(0, len(seq.text) - window)
    best: tuple[int, str] | None = None
    for stop in stops:
        at = seq.text.find(stop, tail_start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return None
    at, stop = best
    seq.text = seq.text[: at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
    return stop
