"""Event-text tokenizer for the trainable (CLUE) item encoder: byte-level BPE fitted on the corpus.

Why byte-level BPE rather than hashed word/char n-grams:

* It is what CLUE used, so scaling results stay comparable.
* Bytes cover every string: non-ASCII text (Korean titles, accents, emoji) never maps to UNK, and an
  id sequence decodes back to the text, which hashed n-grams cannot (collisions, no inverse).
* Merges are learned from the corpus, so frequent item words become single tokens and the
  (quadratic) item transformer sees short sequences; hashed char n-grams multiply sequence length.
* The HuggingFace ``tokenizers`` trainer is Rust, fast (a 1M-title corpus fits in seconds) and
  deterministic for a given corpus and settings (tested), and the fitted tokenizer is one JSON
  document saved next to the weights (never pickle). ``tokenizers`` is pinned in constraints.txt
  (it comes with sentence-transformers).

Every encoded text starts with ``<bos>``: an empty text is then one token, so the item transformer's
attention and mean pooling always have something to attend to (an all-padding row gives NaN).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
PAD_ID, UNK_ID, BOS_ID = 0, 1, 2


class TextTokenizer:
    """Byte-level BPE over event text; ``encode_batch`` gives padded int64 ids (pad = 0).

    Build with :meth:`fit` on the training corpus, or :meth:`from_json` / :meth:`load` from a saved one.
    """

    def __init__(self, tokenizer):
        # ``tokenizers.Tokenizer``; kept private so callers depend only on this class's methods.
        self._tok = tokenizer

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> "TextTokenizer":
        """Learn BPE merges from ``texts`` (iterate the unique texts of the training split).

        Args:
            texts: corpus of event texts.
            vocab_size: target size including the 256 byte symbols and 3 specials.
            min_frequency: a pair must occur this often to be merged.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[PAD, UNK, BOS],  # ids 0, 1, 2 in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
            show_progress=False,
        )
        tok.train_from_iterator((t or "" for t in texts), trainer)
        assert tok.token_to_id(PAD) == PAD_ID and tok.token_to_id(BOS) == BOS_ID
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode_batch(self, texts: Sequence[str | None], max_tokens: int) -> np.ndarray:
        """Texts -> (n, max_tokens) int64 ids: ``<bos>`` + BPE ids, truncated, right-padded with 0.

        ``None`` is treated as the empty string.
        """
        out = np.zeros((len(texts), max_tokens), dtype=np.int64)
        if max_tokens < 1 or not len(texts):
            return out
        out[:, 0] = BOS_ID
        encs = self._tok.encode_batch([t or "" for t in texts], add_special_tokens=False)
        for i, enc in enumerate(encs):
            ids = enc.ids[: max_tokens - 1]
            out[i, 1 : 1 + len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if i > BOS_ID])

    def to_json(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        return cls.from_json(Path(path).read_text())

    def __eq__(self, other) -> bool:
        return isinstance(other, TextTokenizer) and json.loads(self.to_json()) == json.loads(other.to_json())
