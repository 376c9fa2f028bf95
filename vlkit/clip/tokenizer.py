"""A word-level tokenizer for a text tower trained from scratch, built from the training captions.

Why word-level: there is no hub access here, so no pretrained BPE can be downloaded, and the
vocabularies CLIP is trained on in vlkit's offline world (the shapes world: colours, shapes,
positions, a few template words) are tiny; one token per lower-cased word is exact and keeps the
text tower small. It is a `tokenizers` model wrapped as `PreTrainedTokenizerFast`, so it saves
next to the model and `AutoTokenizer.from_pretrained(folder)` loads it without vlkit.

Every sequence is `<bos> words... <eos>`: CLIP's text tower pools the hidden state at the first
`eos_token_id`, so every caption must end with it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# Order fixes the ids: pad=0, unk=1, bos=2, eos=3. eos must not be 2: CLIP's text tower treats
# eos_token_id == 2 as the legacy "eos is the largest id" convention and pools at argmax(ids).
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]


def build_word_tokenizer(texts: Iterable[str], model_max_length: int = 32, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a lower-cased, punctuation-split word-level tokenizer on `texts`."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # splits words from punctuation
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos_id), (EOS, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
    )
