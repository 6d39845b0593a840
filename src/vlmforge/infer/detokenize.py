"""Token ids to text, one token at a time, holding back what may start a stop string.

One `Detokenizer` per request. Byte-level BPE tokenizers (GPT-2, Llama 3, ours) decode one token
per step from a table of each token's bytes; any other tokenizer re-decodes a short window of
tokens (as TGI does).
"""

from __future__ import annotations

import codecs


def byte_level_table(tok) -> list[bytes] | None:
    """Each token id's bytes, for byte-level BPE tokenizers (GPT-2, Llama 3, ours) whose decode
    is exactly the concatenation of those bytes (special tokens skipped); None otherwise. Lets
    the engine decode one token per step instead of re-decoding a window."""
    backend = getattr(tok, "backend_tokenizer", None)
    if (
        backend is None
        or type(backend.decoder).__name__ != "ByteLevel"
        or getattr(tok, "clean_up_tokenization_spaces", False)
    ):
        return None
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):  # GPT-2's bytes_to_unicode, inverted
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    special = set(tok.all_special_ids)
    added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    table = []
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in special or piece is None:
            table.append(b"")
        elif i in added:
            table.append(added[i].encode())
        elif all(c in chars for c in piece):
            table.append(bytes(chars[c] for c in piece))
        else:
            return None
    return table


class Detokenizer:
    """The text of one request's tokens, emitted as they come; `stop` strings end it."""

    def __init__(self, tok, token_bytes: list[bytes] | None, stop: tuple[str, ...] = ()):
        self.tok, self.token_bytes, self.stop = tok, token_bytes, stop
        self.pending = ""  # decoded text held back (a possible stop-string start)
        self.cut = False  # ended by a stop string
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.prefix_offset = self.read_offset = 0

    def push(self, tokens: list[int]) -> tuple[str, bool]:
        """The text to emit now that `tokens[-1]` was generated, and True when a stop string
        appeared (the text is cut before it)."""
        if self.token_bytes is not None:  # byte-level BPE: each token is a byte string
            new = self.utf8.decode(self.token_bytes[tokens[-1]])
        else:  # any tokenizer: decode a window of tokens
            prefix = self.tok.decode(tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
            full = self.tok.decode(tokens[self.prefix_offset :], skip_special_tokens=True)
            new = ""
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                new = full[len(prefix) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
        pending = self.pending + new
        if not self.stop:
            self.pending = ""
            return pending, False
        for s in self.stop:
            at = pending.find(s)
            if at >= 0:
                self.pending, self.cut = "", True
                return pending[:at], True
        hold = 0
        for s in self.stop:  # the longest tail that could start a stop string
            for k in range(min(len(s) - 1, len(pending)), 0, -1):
                if pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """What was held back, when the request ends."""
        tail, self.pending = self.pending, ""
        if self.token_bytes is not None and not self.cut:
            tail += self.utf8.decode(b"", final=True)  # an incomplete character, as decode shows it
        return tail
