"""The contrastive losses across 2 CPU processes (gloo) equal 1 process with the doubled batch.

Each rank embeds its half of the batch with the same tiny towers, computes the local loss with
features gathered *with gradient*, and averages gradients like DDP does; the mean loss and the
averaged gradients must equal those of one process on the whole batch within 1e-5.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlkit.clip.loss import build_loss

WORLD, LOCAL_BATCH, IN_DIM, EMBED_DIM = 2, 4, 10, 6


def make_towers() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({"image": torch.nn.Linear(IN_DIM, EMBED_DIM), "text": torch.nn.Linear(IN_DIM, EMBED_DIM)})
    towers.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    towers.logit_bias = torch.nn.Parameter(torch.tensor(-2.0))
    return towers


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=generator), torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=generator)


# Caption keys of the global batch (vlkit.clip.loss.text_keys): copies within rank 0 (rows 0 and 3)
# and across the ranks (rows 1 and 4), which SigLIP's same-caption positives must find wherever they are.
KEYS = torch.tensor([10, 11, 12, 10, 11, 15, 16, 17])


def loss_and_grads(towers, images, texts, loss_type: str, gather_with_grad: bool, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    image_embeds = F.normalize(towers["image"](images), dim=-1)
    text_embeds = F.normalize(towers["text"](texts), dim=-1)
    loss = build_loss(loss_type, gather_with_grad)(image_embeds, text_embeds, towers.logit_scale, towers.logit_bias, keys)
    loss.backward()
    # The CLIP loss does not use the bias: its gradient is None, stored as zeros.
    grads = {name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for name, p in towers.named_parameters()}
    return loss.detach(), grads


CASES = [("clip", True, False), ("siglip", True, False), ("clip", False, False), ("siglip", True, True)]  # (loss type, gather_with_grad, keys)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        images, texts = global_batch()
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for loss_type, gather_with_grad, with_keys in CASES:
            keys = KEYS[local] if with_keys else None
            loss, grads = loss_and_grads(make_towers(), images[local], texts[local], loss_type, gather_with_grad, keys)
            # What DDP does to gradients (and what logging does to the loss): average over ranks.
            for tensor in [loss, *grads.values()]:
                dist.all_reduce(tensor)
                tensor /= WORLD
            name = f"{loss_type}_{gather_with_grad}_{with_keys}_rank{rank}.safetensors"
            save_file({"loss": loss.reshape(1), **grads}, os.path.join(out_dir, name))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    """One spawn of 2 gloo processes computes every case (spawning is the slow part)."""
    out = tmp_path_factory.mktemp("clip_dist")
    mp.start_processes(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="spawn")
    return {
        case: [load_file(out / f"{case[0]}_{case[1]}_{case[2]}_rank{rank}.safetensors") for rank in range(WORLD)] for case in CASES
    }


@pytest.mark.parametrize(("loss_type", "with_keys"), [("clip", False), ("siglip", False), ("siglip", True)])
def test_two_processes_equal_one_process_with_doubled_batch(two_process_results, loss_type, with_keys):
    images, texts = global_batch()
    keys = KEYS if with_keys else None
    expected_loss, expected_grads = loss_and_grads(make_towers(), images, texts, loss_type, True, keys)
    for result in two_process_results[(loss_type, True, with_keys)]:
        assert torch.allclose(result["loss"][0], expected_loss, atol=1e-5), (result["loss"], expected_loss)
        for name, grad in expected_grads.items():
            assert torch.allclose(result[name], grad, atol=1e-5), name
    assert expected_grads["image.weight"].abs().sum() > 0


def test_gather_without_grad_does_not_give_full_gradients(two_process_results):
    # The cheaper variant drops the gradient through other ranks' features; the test above would
    # catch a gather that silently lost its gradient.
    images, texts = global_batch()
    expected_loss, expected_grads = loss_and_grads(make_towers(), images, texts, "clip", gather_with_grad=True)
    result = two_process_results[("clip", False, False)][0]
    assert torch.allclose(result["loss"][0], expected_loss, atol=1e-5)  # the forward is the same
    assert not torch.allclose(result["image.weight"], expected_grads["image.weight"], atol=1e-5)


TRAIN_SCRIPT = """
import sys
from vlkit.clip.recipe import parse_clip_recipe
from vlkit.train.clip import train_clip
import json
for recipe in sys.argv[1:]:  # one after another in one process: the start-up is paid once
    train_clip(parse_clip_recipe(json.loads(recipe)))
"""


@pytest.mark.slow
def test_trainer_ddp_step_equals_single_process_step(tmp_path):
    # End to end through Trainer + DDP: one SGD step (lr 1, no clipping, no decay) on 8 pairs, as
    # 2 processes x 4 and as 1 process x 8, must move every weight identically.
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_clip_train import TINY_TEXT, TINY_VISION, write_pairs
    from train_helpers import finish

    write_pairs(tmp_path / "data", n=8)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)

    def recipe(out: str, batch: int, learning_rate: float = 1.0) -> str:
        return json.dumps({
            "stage": "clip", "output_dir": str(tmp_path / out),
            "data": {"dir": str(tmp_path / "data"), "train_file": "pairs.jsonl"},
            "model": {"projection_dim": 16, "vision": {"config": TINY_VISION}, "text": {"config": TINY_TEXT}},
            "train": {"batch_size": batch, "max_steps": 1, "optimizer": "sgd", "learning_rate": learning_rate,
                      "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": None, "seed": 0},
        })

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]  # a free port
    # The 1-process and 2-process runs are independent: they run at once (one thread each). The 1e-12 run
    # follows "one" in its process: train_clip seeds before it builds the model, so it starts from the same weights.
    single = [sys.executable, str(script), recipe("one", 8), recipe("zero", 8, learning_rate=1e-12)]
    started = {name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, command in (("one", single), ("two", [*launcher, str(script), recipe("two", 4)]))}
    done = {name: finish(process) for name, process in started.items()}
    for name, result in done.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    summaries = [json.loads((tmp_path / name / "run_summary.json").read_text()) for name in ("one", "two")]
    assert [s["world_size"] for s in summaries] == [1, 2] and [s["samples"] for s in summaries] == [8, 8]
    # The logged loss (mean over ranks) equals the single-process loss on the same 8 pairs.
    losses = [s["final_metrics"]["train_loss"] for s in summaries]
    assert math.isclose(losses[0], losses[1], abs_tol=1e-5), losses
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    # The step really moved the weights: the same run with learning rate 1e-12 keeps the initial ones.
    initial = load_file(tmp_path / "zero" / "model.safetensors")
    assert not torch.allclose(initial["visual_projection.weight"], one["visual_projection.weight"], atol=1e-4)
    assert not torch.allclose(initial["logit_scale"], one["logit_scale"])
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name
