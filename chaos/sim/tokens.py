"""Deterministic output and token counting: what the worker generates, without a model.

Each generated token is one word, with a leading space, from a fixed 256-word vocabulary,
picked by SHAKE-256 over the request's material (model, prompt or messages, seed). Because
SHAKE's output is a stream, a shorter `max_tokens` yields a prefix of a longer one, as greedy
decoding would. Prompt tokens are whitespace-separated words; `CHAT_TOKENS_PER_MESSAGE` and
`CHAT_TOKENS_GENERATION_PROMPT` stand in for a chat template's role markers.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "CHAT_TOKENS_GENERATION_PROMPT",
    "CHAT_TOKENS_PER_MESSAGE",
    "VOCABULARY",
    "Sequence",
    "generate",
    "words",
]

CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_GENERATION_PROMPT = 3

VOCABULARY: tuple[str, ...] = tuple(
    """
    the of and to in is that for it as was with be by on not he this are or his from at which
    but have an they you were her she there one all we their has been if more when will would
    who so no out up into do can time about other could than its some what only new them two
    like first then now also any these may our over such most after well way even made many
    before must through back years where much your down should because each just those people
    how too little state good very make world still own see men work long here get both between
    life being under never day same another know while last might us great old year off come
    since against go came right used take three states himself few house use during without
    again place around however home small found thought went say part once general high upon
    school every does got united left number course war until always away something fact though
    water less public put think almost hand enough far took head yet government system better
    set told nothing night end why called didn find look asked later knew point next program
    city business give group toward young let room side social present given several order
    national second possible rather per face among form important often things looked early
    white case become large big need four within felt along children saw best church ever least
    power development light thing seemed
    """.split()  # noqa: SIM905 (a word list reads better as words)
)
assert len(VOCABULARY) == 256  # one SHAKE output byte picks one word
_TOKENS = tuple(" " + word for word in VOCABULARY)


class Sequence:
    """One prompt's generated output; `pieces` holds each generated token's text."""

    __slots__ = ("finish_reason", "index", "pieces", "prompt_tokens", "stop_reason")

    def __init__(
        self,
        index: int,
        prompt_tokens: int,
        pieces: list[str],
        finish_reason: str,
        stop_reason: str | None,
    ) -> None:
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.pieces = pieces
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason


def generate(material: bytes, max_tokens: int, stop: tuple[str, ...], *, skip: int = 0) -> Sequence:
    """`max_tokens` tokens of the output for `material`, after its first `skip` tokens."""
    digest = hashlib.shake_256(material).digest(skip + max_tokens)
    pieces = [_TOKENS[byte] for byte in digest[skip:]]
    if stop:
        text = "".join(pieces)
        cut, reason = -1, ""
        for candidate in stop:
            at = text.find(candidate) if candidate else -1
            if at != -1 and (cut == -1 or at < cut):
                cut, reason = at, candidate
        if cut != -1:
            # Generation ends with the token that completes the stop string; the text keeps
            # only what came before it, as vLLM does unless include_stop_str_in_output is set.
            end = cut + len(reason)
            kept: list[str] = []
            position = 0
            for piece in pieces:
                start = position
                position += len(piece)
                kept.append(piece[: max(0, cut - start)])
                if position >= end:
                    break
            return Sequence(0, 0, kept, "stop", reason)
    return Sequence(0, 0, pieces, "length", None)


def words(text: str) -> int:
    return len(text.split())
