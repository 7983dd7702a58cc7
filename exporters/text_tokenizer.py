"""The tokenizer that travels with an exported graph, without torch.

`tokenizer.json` (the `tokenizers` library's format, which every fast HF tokenizer
saves) is all serving needs: encoding applies the tokenizer's own post-processing
(special tokens such as BERT's [CLS]/[SEP] or Llama's BOS) *and* its own padding and
truncation settings, so the attention mask and token type ids it returns are the ones
the graph must be fed (a tokenizer that pads to a fixed length, like
sentence-transformers' all-MiniLM-L6-v2 at 128, marks the padding with 0s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    attention_mask: list[int]
    type_ids: list[int]


class TextTokenizer:
    """encode/decode over a `tokenizers.Tokenizer` loaded from `tokenizer.json`."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @classmethod
    def from_folder(cls, folder: Path) -> TextTokenizer | None:
        """The folder's tokenizer.json, or None when there is none (or it does not load).

        The file is read under the folder rule (a regular file inside the folder: no link
        leaving it, no FIFO) and at most `SIDE_FILE_MAX_BYTES`; breaking either is an
        `ExportError` naming it, not a silent fallback.
        """
        from exporters.errors import ExportError
        from exporters.export_folder import present
        from exporters.outputs import SIDE_FILE_MAX_BYTES
        from mora_core.checkpoint import member
        from mora_core.safe_io import read_capped

        if not present(Path(folder), TOKENIZER_FILE):
            return None
        raw = read_capped(member(folder, TOKENIZER_FILE, ExportError), SIDE_FILE_MAX_BYTES, ExportError, "tokenizer")
        try:
            from tokenizers import Tokenizer

            return cls(Tokenizer.from_str(raw.decode("utf-8")))
        except Exception:
            return None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> Encoded:
        enc = self._tok.encode(text)
        return Encoded(list(enc.ids), list(enc.attention_mask), list(enc.type_ids))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
