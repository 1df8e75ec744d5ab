"""Incremental detokenisation with stop strings: each step decodes a few tokens, never the whole answer again."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TextAssembler:
    """Turns generated token ids into text pieces, holding back text that may start a stop string.

    Detokenising follows the usual windowed scheme (as in TGI and vLLM): decode the tokens since `prefix` and
    since `read`, and emit the difference once it no longer ends in a half character. A step costs the window,
    not the answer length.
    """

    tokenizer: Any
    stops: list[str]
    eos_ids: set[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded answer so far (complete characters only)
    sent: int = 0  # characters of `text` already handed out
    stopped_by: str | None = None  # "eos" or "stop" once the answer is complete
    stop_cut: int | None = None  # where the stop string starts in `text`
    _prefix: int = 0
    _read: int = 0
    _searched: int = 0  # characters of `text` already searched for stop strings

    def add(self, token_ids: list[int]) -> str:
        """Take new tokens and return the text that is now safe to send (nothing more once stopped)."""
        for tok in token_ids:
            if self.stopped_by:
                break
            self.ids.append(tok)
            if tok in self.eos_ids:
                self.stopped_by = "eos"
                break
            self._decode_step()
            if self._find_stop():
                break
        if self.stopped_by == "eos":
            self._decode_step(flush=True)  # the end token decodes to nothing; release what was held back
            self._find_stop()
        return self._release(final=self.stopped_by is not None)

    def finish(self) -> str:
        """The rest of the text once generation is over."""
        if not self.stopped_by:
            self._decode_step(flush=True)
            self._find_stop()
        return self._release(final=True)

    @property
    def finish_reason(self) -> str:
        """'stop' for an end-of-sequence token or a stop string, else 'length'."""
        return "stop" if self.stopped_by else "length"

    def _decode_step(self, flush: bool = False) -> None:
        """Extend `text` with the characters the tokens since the last emitted one complete."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def _find_stop(self) -> bool:
        """Search the new text (plus an overlap) for the earliest stop string; True once one is found."""
        if not self.stops:
            return False
        overlap = max(len(s) for s in self.stops) - 1
        start = max(0, self._searched - overlap)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        self._searched = len(self.text)
        if hits:
            self.stopped_by, self.stop_cut = "stop", min(hits)
            return True
        return False

    def _release(self, final: bool) -> str:
        """Hand out text up to a found stop string, or all but a tail that might begin one."""
        if self.stop_cut is not None:
            end = self.stop_cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - max((len(s) for s in self.stops), default=1) + 1
        end = max(self.sent, end)
        piece, self.sent = self.text[self.sent : end], end
        return piece
