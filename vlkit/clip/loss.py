"""Contrastive losses for stage 0 (CLIP): symmetric InfoNCE and the SigLIP sigmoid loss.

Both are correct across processes in the open_clip "local loss" way: each rank gathers the
features of every rank *with gradient* (`torch.distributed.nn.functional.all_gather`), scores its
own local rows against all gathered columns, and labels its rows with the rank offset. Under DDP,
whose gradient averaging divides by the world size, N processes with batch b then produce the
same loss (mean over ranks) and the same gradients as one process with batch N*b.

The logit scale lives in `CLIPModel.logit_scale` (log-space, learnable, initialised to ln(1/0.07));
`clamp_logit_scale` caps it at ln(100) and is called after every optimizer step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_INIT = 1.0 / 0.07  # CLIP paper
LOGIT_SCALE_MAX = 100.0  # CLIP paper: "clipped to prevent scaling the logits by more than 100"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_features(features: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """All ranks' `features` concatenated in rank order: [B, D] -> [world * B, D].

    `with_grad=True` lets gradients flow back to the rank that produced each slice (the
    autograd-aware all_gather). `with_grad=False` gathers detached copies and puts the local,
    grad-carrying slice back in place (open_clip's cheaper variant; gradients then differ from
    the single-process ones). Every rank must pass the same batch size (drop the last batch).
    """
    if not is_distributed():
        return features
    if with_grad:
        import torch.distributed.nn.functional as dist_nn

        return torch.cat(dist_nn.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[dist.get_rank()] = features
    return torch.cat(gathered, dim=0)


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the image x text similarity matrix (local-loss variant).

    forward(image_embeds[B, D], text_embeds[B, D], logit_scale: log-space scalar) -> loss scalar.
    Embeddings must already be L2-normalised. On one process this is exactly transformers'
    `image_text_contrastive_loss` (formerly `clip_loss`) of `exp(logit_scale) * text @ image.T`.
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None, text_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # text_keys is taken and unused: copies of a caption score alike, so the softmax loss is the
        # same whichever copy is the target (SigLipLoss uses them).
        scale = logit_scale.exp()
        all_image = gather_features(image_embeds, self.gather_with_grad)  # [N*B, D]
        all_text = gather_features(text_embeds, self.gather_with_grad)  # [N*B, D]
        logits_per_image = scale * image_embeds @ all_text.T  # [B, N*B]
        logits_per_text = scale * text_embeds @ all_image.T  # [B, N*B]
        batch = image_embeds.shape[0]
        labels = torch.arange(batch, device=image_embeds.device) + _rank() * batch
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def text_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One int64 per row, equal for rows with the same tokens [B, T] -> [B] (right padding ignored, as
    CLIP tokenizers pad), so that ranks can compare captions whose batches were padded to different lengths."""
    if attention_mask is not None:
        input_ids = input_ids * attention_mask
    # Fixed odd multipliers per position; int64 products wrap, which keeps the key deterministic.
    generator = torch.Generator().manual_seed(0)
    weights = torch.randint(1, 2**40, (input_ids.shape[1],), generator=generator, dtype=torch.int64) * 2 + 1
    return (input_ids.long() * weights.to(input_ids.device)).sum(dim=1)


class SigLipLoss(nn.Module):
    """SigLIP pairwise sigmoid loss (Zhai et al. 2023), local-loss variant.

    forward(image_embeds[B, D], text_embeds[B, D], logit_scale, logit_bias, text_keys[B]?) -> loss scalar.
    Local images are scored against all gathered texts; the matching pair is +1, every other pair
    -1; the sum over pairs is divided by the local batch size, as in the paper. (The paper passes
    text blocks round a ring instead of gathering; the result is the same, the gather is simpler.)
    With `text_keys` (`text_keys(input_ids, attention_mask)`), an image is also +1 with every other
    copy of its caption in the batch: templated captions repeat ("a red circle"), and the paper's -1
    would then push an image away from its own caption. (Softmax InfoNCE needs no such care: copies of
    a caption have equal scores, and its loss is the same either way.)
    """

    def __init__(self, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None, text_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        all_text = gather_features(text_embeds, self.gather_with_grad)  # [N*B, D]
        logits = logit_scale.exp() * image_embeds @ all_text.T  # [B, N*B]
        if logit_bias is not None:
            logits = logits + logit_bias
        batch = image_embeds.shape[0]
        signs = -torch.ones_like(logits)
        columns = torch.arange(batch, device=logits.device) + _rank() * batch
        signs[torch.arange(batch, device=logits.device), columns] = 1.0
        if text_keys is not None:
            signs[text_keys[:, None] == gather_features(text_keys, with_grad=False)[None, :]] = 1.0
        return -F.logsigmoid(signs * logits).sum() / batch


LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def build_loss(loss_type: str, gather_with_grad: bool = True) -> nn.Module:
    """The loss module named by a recipe's `loss.type` (`clip` | `siglip`)."""
    return LOSSES[loss_type](gather_with_grad=gather_with_grad)


@torch.no_grad()
def clamp_logit_scale(logit_scale: torch.Tensor, max_scale: float = LOGIT_SCALE_MAX) -> None:
    """Clamp a log-space logit scale in place to [0, ln(max_scale)]."""
    logit_scale.clamp_(0.0, math.log(max_scale))
