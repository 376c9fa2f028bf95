"""vlkit: vision-language models from a vision tower, a trained connector and an LLM.

Public API: `build_vlm`, `VlkitConfig`, `VlkitForConditionalGeneration`, `VlkitProcessor`.
Importing vlkit registers the classes with transformers' Auto classes.
"""

from vlkit.build import build_vlm
from vlkit.modeling import VlkitConfig, VlkitForConditionalGeneration
from vlkit.processing import VlkitProcessor

__all__ = ["VlkitConfig", "VlkitForConditionalGeneration", "VlkitProcessor", "build_vlm"]
__version__ = "0.1.0"
