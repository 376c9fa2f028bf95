"""CLIP / SigLIP losses on one process: parity with transformers, clamp, sigmoid-loss sanity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip import modeling_clip

from vlkit.clip.loss import LOGIT_SCALE_INIT, ClipLoss, SigLipLoss, build_loss, clamp_logit_scale, text_keys
from vlkit.train.clip import ClipTrainer, LogitScaleClamp

# transformers 5 renamed `clip_loss` to `image_text_contrastive_loss`; same function.
hf_clip_loss = getattr(modeling_clip, "clip_loss", None) or modeling_clip.image_text_contrastive_loss


def normalised(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_clip_loss_equals_transformers_clip_loss(batch):
    image, text = normalised(batch, 16, seed=batch), normalised(batch, 16, seed=batch + 100)
    logit_scale = torch.tensor(math.log(LOGIT_SCALE_INIT))
    ours = ClipLoss()(image, text, logit_scale)
    logits_per_text = logit_scale.exp() * text @ image.T  # what CLIPModel.forward computes
    assert torch.allclose(ours, hf_clip_loss(logits_per_text), atol=1e-6)


def test_clip_loss_matches_clipmodel_forward_loss():
    config = modeling_clip.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 20, "max_position_embeddings": 8, "eos_token_id": 3},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = modeling_clip.CLIPModel(config).eval()
    input_ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0], [2, 9, 10, 3]])
    attention_mask = (input_ids != 0).long()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, return_loss=True)
        ours = ClipLoss()(output.image_embeds, output.text_embeds, model.logit_scale)
    assert torch.allclose(ours, output.loss, atol=1e-6)


def test_clip_loss_is_low_for_matching_pairs_and_high_for_shuffled():
    image = normalised(16, 32, seed=1)
    loss = ClipLoss()
    scale = torch.tensor(math.log(100.0))
    assert loss(image, image, scale) < 0.01
    assert loss(image, image.roll(1, dims=0), scale) > 5.0


def test_clamp_caps_logit_scale_at_100():
    scale = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    clamp_logit_scale(scale)
    assert math.isclose(float(scale.detach().exp()), 100.0, rel_tol=1e-6)
    low = torch.nn.Parameter(torch.tensor(-3.0))
    clamp_logit_scale(low)
    assert float(low.detach()) == 0.0
    inside = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    clamp_logit_scale(inside)
    assert math.isclose(float(inside.detach().exp()), 20.0, rel_tol=1e-6)


def test_clamp_callback_runs_after_the_optimizer_step():
    # A big learning rate pushes the scale far past 100 in one step; the callback pulls it back.
    scale = torch.nn.Parameter(torch.tensor(math.log(90.0)))
    optimizer = torch.optim.SGD([scale], lr=100.0)
    (-scale).backward()
    optimizer.step()
    assert float(scale.detach().exp()) > 100.0
    LogitScaleClamp(scale, max_scale=100.0).on_optimizer_step(args=None, state=None, control=None)
    assert math.isclose(float(scale.detach().exp()), 100.0, rel_tol=1e-6)


def test_no_weight_decay_on_logit_scale_biases_and_norms():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.logit_scale = torch.nn.Parameter(torch.tensor(1.0))

    names = ClipTrainer.get_decay_parameter_names(None, Tiny())
    assert names == ["linear.weight"]


def test_siglip_loss_sanity():
    image = normalised(8, 32, seed=3)
    loss = SigLipLoss()
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    matched, shuffled = loss(image, image, scale, bias), loss(image, image.roll(1, dims=0), scale, bias)
    assert matched < shuffled
    # Definition: -sum(logsigmoid(sign * logits)) / batch, with +1 on the diagonal.
    logits = scale.exp() * image @ image.T + bias
    signs = 2 * torch.eye(8) - 1
    assert torch.allclose(matched, -F.logsigmoid(signs * logits).sum() / 8, atol=1e-6)
    # Gradients reach both the scale and the bias.
    scale_p, bias_p = torch.nn.Parameter(scale.clone()), torch.nn.Parameter(bias.clone())
    loss(image, image, scale_p, bias_p).backward()
    assert scale_p.grad is not None and bias_p.grad is not None and bias_p.grad.abs() > 0


def test_siglip_counts_every_copy_of_a_caption_as_positive():
    # Rows 0 and 2 carry the same caption, padded to different lengths in different batches.
    ids = torch.tensor([[5, 6, 7, 0], [5, 8, 7, 0], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    keys = text_keys(ids, mask)
    assert keys[0] == keys[2] != keys[1]
    assert text_keys(torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))[0] == keys[0]
    image, text = normalised(3, 16, seed=4), normalised(3, 16, seed=5)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-1.0)
    logits = scale.exp() * image @ text.T + bias
    signs = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]])
    expected = -F.logsigmoid(signs * logits).sum() / 3
    assert torch.allclose(SigLipLoss()(image, text, scale, bias, keys), expected, atol=1e-6)
    assert not torch.allclose(SigLipLoss()(image, text, scale, bias), expected, atol=1e-3)


def test_build_loss_by_name():
    assert isinstance(build_loss("clip"), ClipLoss)
    assert isinstance(build_loss("siglip", gather_with_grad=False), SigLipLoss)


def test_contrastive_model_passes_caption_keys_to_siglip(tiny_clip_dir):
    from transformers import CLIPModel

    from vlkit.clip.model import ContrastiveModel

    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, clip.config.vision_config.image_size, clip.config.vision_config.image_size)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2], [1, 5, 6, 2]])  # rows 0 and 2: one caption
    outputs = {flag: ContrastiveModel(clip, "siglip", same_caption_positive=flag).eval()(pixels, ids, torch.ones_like(ids))
               for flag in (False, True)}
    image, text = outputs[True].image_embeds, outputs[True].text_embeds
    with_copies = SigLipLoss()(image, text, clip.logit_scale, torch.tensor(-10.0), text_keys(ids))
    assert torch.allclose(outputs[True].loss, with_copies) and not torch.allclose(outputs[False].loss, with_copies)
    # The clip loss is the same either way, so the flag does nothing there.
    assert not ContrastiveModel(clip, "clip", same_caption_positive=True).same_caption_positive
