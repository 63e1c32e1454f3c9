"""Stage 1: pretrain the two teachers by masked reconstruction of normalized pixels.

    --mode image   image MAE on single frames (or an image folder), 75% random masking  -> the image teacher
    --mode video   VideoMAE on clips of 2x16x16 tubes, 90% tube masking                  -> the video teacher

    torchrun --nproc_per_node 8 pretrain_mae.py --mode video --model vit_base --data_path k400/train.csv --data_root k400
    python pretrain_mae.py --mode image          # no --data_path: a demo on the synthetic set, a few minutes on a CPU
"""
import argparse
import math
import os
import sys

import torch

import data
from model import (NUM_SAMPLE_HELP, ImageMAE, VideoMAE, add_training_flags, check_flags, check_trained_with,
                   checkpoint_to_resume, fill_defaults, mask_ratio_rule, one_line, param_groups, read_checkpoint,
                   saved_args, scale_lr, setup_distributed, train_epochs)

# Flags left at None take these: the official recipe with a --data_path, a CPU-sized demo without one.
OFFICIAL = dict(epochs=800, warmup_epochs=40, batch_size=32, input_size=224, num_frames=16, sampling_rate=4)
DEMO = dict(epochs=2, warmup_epochs=1, batch_size=4, input_size=64, num_frames=8, sampling_rate=2)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["image", "video"], default="video", help="which teacher to train")
    p.add_argument("--mask_ratio", type=float, help="fraction hidden: default 0.75 (image) or 0.9 (video)")
    p.add_argument("--mask_type", choices=["tube", "random"], default="tube",
                   help="video: hide the same cells at every time step (official) or tubes anywhere in space and time, "
                        "so that a hidden tube must be predicted from the same place at other times (motion)")
    p.add_argument("--pos_embed", choices=["1d", "3d"], default="1d",
                   help="video: position table, VideoMAE's 1d over the flat token index (official), or the student's 3d "
                        "(time, row, column), with which a small model finds a tube's place at other times sooner")
    p.add_argument("--decoder_depth", type=int, help="pixel decoder blocks (default: MAE 8; VideoMAE 4, 12 for L/H)")
    p.add_argument("--decoder_dim", type=int, help="pixel decoder width (default: MAE 512; VideoMAE by size)")
    p.add_argument("--normlize_target", action=argparse.BooleanOptionalAction, default=True,
                   help="video: reconstruct each tube normalized per channel (official; spelled as the official flag); "
                        "--no-normlize_target: the 0-1 pixels, for data whose flat regions would be normalized noise")
    p.add_argument("--data_path", help="video list ('path label' lines) or, for --mode image, an image folder; "
                                       "omitted: the synthetic demo set")
    p.add_argument("--num_sample", type=int, default=1, help=NUM_SAMPLE_HELP)
    add_training_flags(p, None, min_lr_note=" (default: 0 for image, as MAE; 1e-5 for video, as VideoMAE)")
    args = p.parse_args(argv)
    fill_defaults(p, args, OFFICIAL if args.data_path else DEMO, dict(
        mask_ratio={"image": 0.75, "video": 0.9}[args.mode], min_lr={"image": 0.0, "video": 1e-5}[args.mode],
        output_dir=os.path.join("output", f"{args.mode}_mae")))
    grid = (args.num_frames // 2, args.input_size // args.patch_size, args.input_size // args.patch_size)
    cells = math.prod(data.mask_grid(grid, args.mask_type)[1:]) if args.mode == "video" else grid[1] * grid[2]
    check_flags(p, args, [mask_ratio_rule(cells, kept=args.mode == "image")])  # what tube_mask / random_mask draw over
    if args.decoder_depth is not None and args.decoder_depth < 1:
        p.error("--decoder_depth must be at least 1: pretraining reconstructs pixels through the decoder")
    return args


def build(args, env):
    """What this stage trains, as main, tools/bench.py and tools/visualize.py build it: the MAE or VideoMAE and its
    loss_fn(model, batch) -> (loss, {}). A VideoMAE keeps the position table it was trained with: resuming or showing
    it with another is an error."""
    previous = checkpoint_to_resume(args)
    if args.mode == "video" and previous and os.path.exists(previous):  # a missing --resume: resume()'s error
        check_trained_with(previous, saved_args(read_checkpoint(previous)), "pos_embed", args.pos_embed, "1d")
    torch.manual_seed(args.seed)  # the same initial weights in every process and every run
    if args.mode == "video":
        model = VideoMAE(args.model, args.num_frames, args.input_size, args.patch_size, decoder_dim=args.decoder_dim,
                         decoder_depth=args.decoder_depth, drop_path=args.drop_path, depth=args.depth,
                         normalize_target=args.normlize_target, use_checkpoint=args.use_checkpoint, pos=args.pos_embed)
    else:
        model = ImageMAE(args.model, args.input_size, args.patch_size, decoder_dim=args.decoder_dim or 512,
                         decoder_depth=8 if args.decoder_depth is None else args.decoder_depth,
                         drop_path=args.drop_path, depth=args.depth, use_checkpoint=args.use_checkpoint)

    def loss_fn(model, batch):  # clips and images come as uint8 and are normalized here, on the device
        inputs = batch[args.mode].to(env.device, non_blocking=True)  # (B, 3, T, H, W) or (B, 3, H, W)
        return model(data.normalize(inputs), mask=batch["mask"].to(env.device, non_blocking=True))[0], {}
    return model.to(env.device), loss_fn


def main(args):
    # 1. Devices and DDP
    env = setup_distributed(args)
    # 2. Data: clips with a tube mask, or single frames / images with a random mask
    if args.data_path is None:
        data.use_synthetic_set(args, "all.csv")
    if env.is_main:  # one run at a time per folder (data.hold_folder): a second is refused here
        data.hold_folder(args.output_dir)
    common = dict(input_size=args.input_size, mask_ratio=args.mask_ratio, patch_size=args.patch_size,
                  num_sample=args.num_sample, seed=args.seed, output_dir=args.output_dir,
                  max_bad_videos=args.max_bad_videos, cache_videos=args.cache_videos)
    if args.mode == "video":
        dataset = data.VideoDataset(args.data_path, args.data_root, mode="pretrain", num_frames=args.num_frames,
                                    sampling_rate=args.sampling_rate, mask_type=args.mask_type, **common)
    else:
        dataset = data.ImageDataset(args.data_path, args.data_root, **common)
    loader = data.make_loader(dataset, args.batch_size, seed=args.seed, rank=env.rank, world_size=env.world_size,
                              num_workers=args.num_workers, device_type=env.device.type)
    # 3. Model
    model, loss_fn = build(args, env)
    # 4. Optimizer: AdamW (0.9, 0.95), lr and min_lr scaled with the total batch, no decay on biases and norms (nor
    # on VideoMAE's mask_token; MAE's tokens decay)
    total = scale_lr(args, env)
    groups = param_groups(model, args.weight_decay, skip=("mask_token",) if args.mode == "video" else ())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    # 5. Loop: a checkpoint every epoch and every --save_every_minutes inside one, written atomically
    return train_epochs(args, env, model, optimizer, loader, loss_fn, f"{args.mode} MAE {args.model}: {total}",
                        "teacher weights")


if __name__ == "__main__":
    args = get_args()
    try:
        main(args)
    except (ValueError, FloatingPointError, data.TooManyBadVideos, OSError) as e:  # a non-finite loss, a full disk
        sys.exit(f"pretrain_mae.py: error: {one_line(e, args.output_dir)}")
