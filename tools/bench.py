"""Training steps of a stage on random clips: `python tools/bench.py STAGE.py --bench N [the stage's own flags]`.

One JSON line on stdout (SPEC.md, "Benchmark modes"): the median time of N optimizer steps after a warm-up step, clips
per second, peak memory, the FLOPs of a step per clip and those achieved, the device's matrix-product speed in the
run's precision, and what a checkpoint of the model and its AdamW state costs (--save_every_minutes pays it inside an
epoch). No data loading: tools/bench_loader.py times the loader. The model and its loss are the stage's own
(STAGE.build), under its flags (python STAGE.py --help), and a step is train_one_epoch's. Figures: docs/speed.md.

    python tools/bench.py distill.py --bench 3 --model vit_small --batch_size 2 --input_size 224 --num_frames 16
"""
import argparse
import json
import math
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the core

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import data  # noqa: E402
import distill  # noqa: E402
import finetune  # noqa: E402
import pretrain_mae  # noqa: E402
from model import param_groups, save_checkpoint, setup_distributed  # noqa: E402

STAGES = {"pretrain_mae.py": pretrain_mae, "distill.py": distill, "finetune.py": finetune}

# FLOP formulas (on shapes) for torch.utils.flop_counter, which does not know the CPU attention kernel: attention is 2
# products of 2*N*M*d per head forward, 5 backward (grads of q, k, v, probabilities, recompute)
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, *_, **__: 4 * math.prod(q) * k[-2],
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, *_, **__: 10 * math.prod(q) * k[-2]}


def get_args(argv=None):
    """-> (the stage's module, the stage's own args with .bench = N): the stage's flags go to its get_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # a stage flag is never taken for an abbreviation of ours
    p.add_argument("stage", choices=list(STAGES), help="the stage whose training step to time; its flags follow")
    p.add_argument("--bench", type=int, required=True, metavar="N", help="time N steps on random clips")
    ours, rest = p.parse_known_args(argv)
    args = STAGES[ours.stage].get_args(rest)
    args.bench = ours.bench
    return STAGES[ours.stage], args


def random_batch(stage, args, model, nb_classes):
    """A batch as the stage's loader gives it, of random clips: uint8 clips (or images) and their masks for pretraining
    and distillation; for fine-tuning batch_size x --num_sample normalized clips and their labels."""
    B, T, S = args.batch_size, args.num_frames, args.input_size
    if stage is finetune:
        return {"video": torch.randn(B * args.num_sample, 3, T, S, S),
                "label": torch.randint(nb_classes, (B,)).repeat_interleave(args.num_sample)}
    if stage is pretrain_mae and args.mode == "image":
        masks = [data.random_mask(math.prod(model.grid), args.mask_ratio) for _ in range(B)]
        return {"image": torch.randint(256, (B, 3, S, S), dtype=torch.uint8), "mask": torch.stack(masks)}
    grid = data.mask_grid(model.encoder.grid, args.mask_type) if stage is pretrain_mae else model.grid
    batch = {"video": torch.randint(256, (B, 3, T, S, S), dtype=torch.uint8),
             "mask": data.tube_mask(grid, args.mask_ratio)[None].expand(B, -1)}
    if stage is distill and args.teacher_input_size != S:
        size = args.teacher_input_size
        batch["teacher_video"] = torch.randint(256, (B, 3, T, size, size), dtype=torch.uint8)
    return batch


def bench_steps(step_fn, steps, clips_per_step):
    """One warm-up call, then `steps` timed calls. -> dict(step_s (median), clips_per_s, peak_rss_mb and, on CUDA,
    peak_gpu_mb). CUDA runs asynchronously: each timed call ends when the GPU is done."""
    cuda = torch.cuda.is_available()
    step_fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    return dict(step_s=round(step_s, 4), clips_per_s=round(clips_per_step / step_s, 4),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)} if cuda else {}))


def main(stage, args):
    """Time args.bench steps of `stage`; print and return its JSON line as a dict."""
    env = setup_distributed(args)
    nb_classes = args.nb_classes or 400 if stage is finetune else None  # fine-tuning: K400's classes unless given
    built = finetune.build(args, env, nb_classes) if stage is finetune else stage.build(args, env)
    model, loss_fn = built[:2]
    batch = {k: v.to(env.device) for k, v in random_batch(stage, args, model, nb_classes).items()}  # on the device
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=1e-4)  # once: the step is what is timed
    model.train()

    def step():  # an optimizer step as model.train_one_epoch takes it (autocast, grad scaler)
        with env.autocast():
            loss, _ = loss_fn(model, batch)
        env.scaler.scale(loss).backward()
        env.scaler.step(optimizer)
        env.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        step()
    clips = len(batch["video" if "video" in batch else "image"])
    result = bench_steps(step, args.bench, clips)
    a = torch.randn(1024, 1024, dtype=env.dtype, device=env.device)  # the device's product speed in this dtype
    matmul = bench_steps(lambda: a @ a, 3, 1)["step_s"]
    gflop = counter.get_total_flops() / 1e9 / clips
    # a checkpoint of the model and its AdamW state, as written inside an epoch: the cost --save_every_minutes pays
    path = os.path.join(args.output_dir, "bench-checkpoint.pth")
    saving = bench_steps(lambda: save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict()),
                         3, 1)
    checkpoint_gb = os.path.getsize(path) / 1e9
    os.unlink(path)
    what = ({"mode": args.mode} if stage is pretrain_mae else {"num_sample": args.num_sample} if stage is finetune
            else {"teachers": {name: type(teacher).__name__ for name, teacher in built[2].items()}})
    line = {**what, "model": args.model, "precision": args.precision, "batch_size": args.batch_size,
            "frames": args.num_frames, "input_size": args.input_size, **result, "gflop_per_clip": round(gflop, 1),
            "achieved_gflops": round(gflop * result["clips_per_s"], 1),
            "matmul_gflops": round(2 * 1024 ** 3 / matmul / 1e9, 1), "checkpoint_s": saving["step_s"],
            "checkpoint_gb": round(checkpoint_gb, 3)}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    stage, args = get_args()
    try:
        main(stage, args)
    except (ValueError, OSError) as e:
        sys.exit(f"bench.py: error: {e}")
