"""Where words and sentences begin and end, per vocabulary entry: what word- and sentence-level policies group by."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# How tokenizers write the whitespace before a piece: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and
# SentencePiece (Llama 2, Gemma).
_SPACE_MARKS = ("Ġ", "Ċ", "ĉ", "▁", " ", "\n", "\t")
_SENTENCE_ENDS = (".", "!", "?", "Ċ", "\n")
_CLAUSE_ENDS = (",", ":", ";")


@dataclass(frozen=True)
class TokenShapes:
    """Three lookups over the vocabulary: ``word_start[id]`` (the token begins a word: it starts with whitespace, holds
    no letter or digit like punctuation, or is a special token), ``sentence_end[id]`` (it ends with ``.``, ``!`` or
    ``?``, holds a line break, or is a special token) and ``clause_end[id]`` (a sentence end, or it ends with ``,``,
    ``:`` or ``;``). A token after a sentence end also begins a word."""

    word_start: torch.Tensor
    sentence_end: torch.Tensor
    clause_end: torch.Tensor

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int = 0) -> TokenShapes:
        """The lookups for ``tokenizer``, over at least ``vocab_size`` ids (a model's embedding table can be larger
        than its tokenizer; ids past the tokenizer count as word starts)."""
        known = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        size = max(known, vocab_size)
        pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
        word_start = torch.ones(size, dtype=torch.bool)
        sentence_end = torch.zeros(size, dtype=torch.bool)
        clause_end = torch.zeros(size, dtype=torch.bool)
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        for i, piece in enumerate(pieces):
            if not piece or i in special:
                sentence_end[i] = i in special  # a special token (a role marker, an end of turn) ends what precedes
                continue
            word_start[i] = piece.startswith(_SPACE_MARKS) or not any(c.isalnum() for c in piece)
            sentence_end[i] = piece.rstrip("Ġ▁ ").endswith(_SENTENCE_ENDS) or "Ċ" in piece or "\n" in piece
            clause_end[i] = piece.rstrip("Ġ▁ ").endswith(_CLAUSE_ENDS)
        return cls(word_start, sentence_end, sentence_end | clause_end)

    def of(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(word_start, sentence_end, clause_end) of each token in ``token_ids``."""
        return self.word_start[token_ids], self.sentence_end[token_ids], self.clause_end[token_ids]
