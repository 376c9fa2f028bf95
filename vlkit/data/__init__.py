"""Data: file formats (LLaVA, ShareGPT, CLIP pairs), safe image loading, sample checks, training
datasets that skip and count bad samples, and batch collation.

    samples = load_conversations("instruct_train.json")           # datasets.Dataset, normalized
    train = ConversationDataset(samples, processor, image_root="data/shapes", max_length=512)
    loader = DataLoader(train, collate_fn=VlkitCollator(processor.tokenizer.pad_token_id))
    print(train.summary())                                          # skipped samples by reason
"""

from vlkit.data.collate import VlkitCollator
from vlkit.data.dataset import ConversationDataset
from vlkit.data.formats import detect_format, load_clip_pairs, load_conversations
from vlkit.data.images import load_image, resolve_image_path

__all__ = [
    "ConversationDataset",
    "VlkitCollator",
    "detect_format",
    "load_clip_pairs",
    "load_conversations",
    "load_image",
    "resolve_image_path",
]
