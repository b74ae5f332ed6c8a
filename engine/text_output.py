"""Text of one request as it streams: incremental detokenization plus stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.tokenizer import IncrementalDetokenizer


@dataclass
class TextStream:
    """Feeds token ids in, hands text deltas out.

    Text that could be the start of a stop string is held back until it is known not to be;
    when a stop string appears, the text is cut before it and ``stopped`` is set.
    """

    detokenizer: IncrementalDetokenizer
    stop: tuple[str, ...] = ()
    text: str = ""
    num_emitted: int = 0
    stopped: bool = False
    _holdback: int = field(init=False)

    def __post_init__(self) -> None:
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    @classmethod
    def for_request(
        cls,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: tuple[str, ...],
        skip_special_tokens: bool = True,
    ) -> TextStream:
        detok = IncrementalDetokenizer.after_prompt(
            tokenizer, prompt_token_ids, skip_special_tokens
        )
        return cls(detok, stop)

    def add(self, new_token_ids: list[int], finished: bool) -> str:
        """Returns the text that became final with these tokens."""
        if self.stopped:
            return ""
        search_from = max(0, len(self.text) - self._holdback)
        self.text += self.detokenizer.add(new_token_ids)
        if finished:
            self.text += self.detokenizer.flush()
        cut = self._find_stop(search_from)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
        final = len(self.text) if finished or self.stopped else len(self.text) - self._holdback
        delta = self.text[self.num_emitted : max(final, self.num_emitted)]
        self.num_emitted += len(delta)
        return delta

    def _find_stop(self, search_from: int) -> int | None:
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        return min(hits) if hits else None
