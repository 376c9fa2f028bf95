"""`make demo`: the main job, end to end on CPU.

For now: build a VLM from the embedded SmolLM2-135M-Instruct and a small CLIP vision tower
(randomly initialised: no pretrained vision weights are reachable offline), and ask it about a
bundled photo. The connector is untrained, so the answer shows the pipeline working, not
visual understanding; the staged training pipeline replaces this.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vlkit.build import build_vlm
from vlkit.vision import save_default_image_processor


def build_small_vision_tower(folder: str) -> None:
    config = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                              image_size=224, patch_size=32)
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(folder)
    save_default_image_processor(config, folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="reduced version")
    parser.add_argument("--question", default="Describe this image in one sentence.")
    args = parser.parse_args(argv)
    from skimage import data as skimage_data
    from PIL import Image

    start = time.time()
    with tempfile.TemporaryDirectory() as vision_dir:
        build_small_vision_tower(vision_dir)
        model, processor = build_vlm(vision=vision_dir, llm="smollm2-135m-instruct", connector={"type": "mlp"})
    image = Image.fromarray(skimage_data.astronaut())
    conversation = [{"role": "user", "content": f"<image>\n{args.question}"}]
    inputs = processor.prompt_inputs([conversation], [[image]])
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"model: CLIP ViT tower (untrained) -> mlp connector (untrained, {model.config.image_seq_length} tokens/image)"
          " -> SmolLM2-135M-Instruct")
    print(f"image: skimage.data.astronaut()  question: {args.question}")
    print(f"answer: {answer}")
    print(f"({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
