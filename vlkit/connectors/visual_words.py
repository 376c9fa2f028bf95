"""`visual_words` connector: the image as a text in a fixed layout of soft words, in the LLM's own
word embeddings (as Oscar and VinVL give a language model the object tags a tagger read).

Owns the reader that chooses one word per slot of the layout, and their embedding:

    features[B, N, Dv] --flatten, mlp--> logits per slot --softmax--> sum_w p(w) * tokens(w) -> [B, M, Dt]

`groups` is the layout: per slot, each candidate word as token ids (`vlkit.data.words` makes it from a
words file). A slot with one candidate is fixed text ("left:"). A slot spans as many tokens as its
longest candidate; shorter ones end in zero vectors. `option_embeddings` holds the LLM's input
embeddings of those tokens: copied when the model is built (`use_llm_embeddings`), not trained.
The reader is trained outside the LLM, on the words file, by the align stage (`vlkit.train.words`):
a direct loss that gives the LLM tokens it reads as it reads text.
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.connectors.base import Connector
from vlkit.connectors.registry import register_connector
from vlkit.errors import ConfigError


@register_connector("visual_words")
class VisualWordsConnector(Connector):
    """An MLP reader over all patches, then each slot's candidates mixed by the reader's choice."""

    def __init__(
        self,
        vision_hidden_size: int,
        text_hidden_size: int,
        groups: list[list[list[int]]] | None = None,
        num_patches: int | None = None,
        hidden: int = 512,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(vision_hidden_size, text_hidden_size)
        if not groups or not num_patches:
            raise ConfigError("visual_words needs 'groups' and 'num_patches'; a recipe gives data.words_file and the "
                              "align stage fills them in")
        if any(not group for group in groups):
            raise ConfigError("visual_words: every slot of 'groups' needs at least one candidate word")
        self.groups = [[list(word) for word in group] for group in groups]
        self.options = [len(group) for group in self.groups]
        self.lengths = [max(1, *(len(word) for word in group)) for group in self.groups]
        self.num_patches = num_patches
        self.reader = nn.Sequential(
            nn.Linear(num_patches * vision_hidden_size, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, sum(self.options)),
        )
        self.register_buffer("option_embeddings", torch.zeros(sum(self.options), max(self.lengths), text_hidden_size))

    def use_llm_embeddings(self, table: torch.Tensor) -> None:
        row = 0
        for group in self.groups:
            for word in group:
                self.option_embeddings[row].zero_()
                if word:
                    self.option_embeddings[row, : len(word)] = table[word].detach().to(self.option_embeddings.dtype)
                row += 1

    def slot_logits(self, features: torch.Tensor, dropout: bool = False) -> list[torch.Tensor]:
        """Per slot, [B, candidates] logits; dropout (the reader's own fit) only when asked and training."""
        if features.shape[1] != self.num_patches:
            raise ConfigError(f"visual_words reads {self.num_patches} patches; the tower gave {features.shape[1]}")
        first, activation, drop, last = self.reader
        hidden = activation(first(features.flatten(1)))
        if dropout:
            hidden = drop(hidden)
        return list(last(hidden).split(self.options, dim=-1))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # No dropout here: the LLM always reads the reader's clean choice, in training too (a reader trained
        # on in the instruct stage with its dropout on: VQA summed over the five question types 3.94, against
        # 4.49 for one kept as the align stage left it; README).
        pieces, row = [], 0
        for logits, options, length in zip(self.slot_logits(features), self.options, self.lengths):
            table = self.option_embeddings[row : row + options, :length]
            pieces.append(torch.einsum("bo,otd->btd", logits.softmax(dim=-1).to(table.dtype), table))
            row += options
        return torch.cat(pieces, dim=1).to(features.dtype)

    def num_tokens(self, num_patches: int) -> int:
        if num_patches != self.num_patches:
            raise ConfigError(f"visual_words reads {self.num_patches} patches; the tower gives {num_patches}")
        return sum(self.lengths)
