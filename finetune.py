"""Stage 3: fine-tune an encoder on labelled clips and evaluate it over several views of every video.

The classifier is the encoder on the whole clip, a mean over its tokens, fc_norm and a linear head. Its encoder
comes from --finetune (our student, a VideoMAE or an official MVD checkpoint); resuming the run itself is
--resume / --auto_resume and ignores --finetune. The test score of a video is the softmax averaged over
test_num_segment clips x test_num_crop crops, merged across ranks in the same run (no separate merge step).

    torchrun --nproc_per_node 8 finetune.py --model vit_base --data_set Kinetics-400 --data_path k400 \\
        --data_root k400/videos --finetune output/distill/checkpoint-last.pth --update_freq 2
    python finetune.py --eval --finetune mvd_b_k400_ft.pth --data_path k400 --data_root k400/videos
    python finetune.py --linear_probe --finetune output/distill/checkpoint-last.pth   # frozen encoder, a cheap probe
    python finetune.py --extract_features feats.npy --finetune student.pth --data_path list.csv
    python finetune.py          # no --data_path: the synthetic set's appearance task, minutes on a CPU
"""
import argparse
import csv
import json
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from model import (VideoClassifier, add_training_flags, agree, check_flags, check_trained_with, checkpoint_to_resume,
                   fill_defaults, load_checkpoint, one_line, param_groups, read_checkpoint, saved_args, scale_lr,
                   setup_distributed, train_epochs)

# Flags left at None take these: the official recipe with a --data_path (ViT-B; K400: 6 per GPU x --update_freq 2 x
# 32 GPUs = 384, SSv2: 24 x 16 GPUs), a CPU-sized demo without one (one crop: the synthetic videos are square).
OFFICIAL = dict(epochs=75, warmup_epochs=5, batch_size=6, input_size=224, num_frames=16, sampling_rate=4,
                test_num_segment=5, test_num_crop=3)
OFFICIAL_SSV2 = dict(OFFICIAL, epochs=30, batch_size=24, test_num_segment=2)  # segment sampling: no sampling rate
DEMO = dict(epochs=2, warmup_epochs=1, batch_size=4, input_size=64, num_frames=8, sampling_rate=2,
            test_num_segment=2, test_num_crop=1)
# ...and these: the official fine-tuning regularization, or none for a linear probe (as MAE's, but with AdamW)
FINETUNE = dict(blr=5e-4, weight_decay=0.05, drop_path=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0, num_sample=2,
                aa="rand-m7-n4-mstd0.5-inc1", reprob=0.25)
LINEAR_PROBE = dict(blr=1e-3, weight_decay=0.0, drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, num_sample=1,
                    aa="none", reprob=0.0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pos_embed", choices=["3d", "1d"], default="3d",
                   help="position table: 3d for MVD students, 1d for VideoMAE checkpoints (the table they learnt)")
    p.add_argument("--finetune", help="start from the encoder (and a head of the same class count) of this "
                                      "checkpoint, any layout; ignored when the run resumes")
    p.add_argument("--data_set", choices=["Kinetics-400", "SSV2", "UCF101", "HMDB51", "custom"], default="Kinetics-400",
                   help="SSV2: segment sampling and no flip (left/right are in its labels); others: dense and flip")
    p.add_argument("--data_path", help="folder with train.csv, val.csv and optionally test.csv (then the final "
                                       "evaluation); omitted: the synthetic demo set's appearance task")
    add_training_flags(p, "output/finetune", blr=None, min_lr=1e-6, weight_decay=None, drop_path=None,
                       lr_note=" (5e-4; 1e-3 linear probe)", min_lr_note=" (as run_class_finetuning.py)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flip in training; default: on, off for SSV2 (never for direction labels)")
    p.add_argument("--nb_classes", type=int, help="default: max label + 1 of train.csv")
    p.add_argument("--num_sample", type=int, help="augmented clips per decoded video (repeated augmentation)")
    p.add_argument("--test_num_segment", type=int, help="clips per video at test time (official: 5 K400, 2 SSv2)")
    p.add_argument("--test_num_crop", type=int, help="crops along the long side per clip at test time")
    p.add_argument("--short_side_size", type=int, help="test frames' short side before cropping (default input size)")
    p.add_argument("--layer_decay", type=float, default=0.75, help="lr of block i scaled by decay^(depth + 1 - i)")
    p.add_argument("--fc_drop_rate", type=float, default=0.0, help="dropout before the head (ViT-L: 0.5)")
    p.add_argument("--init_scale", type=float, default=0.001, help="the fresh head's initial weights are scaled so")
    p.add_argument("--aa", help="RandAugment as timm's string: rand-m7-n4-mstd0.5-inc1 (4 ops, magnitude 7 +- 0.5, "
                   "the official), or none")
    p.add_argument("--crop_scale", type=float, default=0.08,
                   help="smallest area fraction of the training random-resized crop (0.5-1 for frames under 100 px)")
    p.add_argument("--reprob", type=float, help="random erasing probability: 0.25 (0 for a linear probe)")
    p.add_argument("--smoothing", type=float, help="label smoothing: 0.1 (0 for a linear probe)")
    p.add_argument("--mixup", type=float, help="mixup alpha: 0.8 (0 for a linear probe; 0 and --cutmix 0: none)")
    p.add_argument("--cutmix", type=float, help="cutmix alpha: 1.0 (0 for a linear probe)")
    p.add_argument("--linear_probe", action=argparse.BooleanOptionalAction, default=False,
                   help="freeze the encoder; train only a head after a non-affine BatchNorm (MAE's linear probing)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=False,
                   help="evaluate the weights of --finetune, else --resume, else OUTPUT_DIR's last checkpoint; exit")
    p.add_argument("--eval_freq", type=int, default=5, help="evaluate on val.csv every N epochs (and at the end)")
    p.add_argument("--extract_features", metavar="OUT.npy",
                   help="save the pooled features (after fc_norm) of every video of val.csv or of the list given "
                        "as --data_path, centre crop of one clip, float32 (videos, D) in list order; exit")
    args = p.parse_args(argv)
    official = OFFICIAL_SSV2 if args.data_set == "SSV2" else OFFICIAL
    fill_defaults(p, args, official if args.data_path else DEMO, LINEAR_PROBE if args.linear_probe else FINETUNE)
    check_flags(p, args, [(flag, lambda v: v >= 1, "at least 1") for flag in ("test_num_segment", "test_num_crop")] + [
        ("smoothing", lambda v: 0 <= v < 1, "in [0, 1)"), ("mixup", lambda v: v >= 0, "0 or more"),
        ("cutmix", lambda v: v >= 0, "0 or more"), ("layer_decay", lambda v: 0 < v <= 1, "in (0, 1]")])
    args.short_side_size = args.short_side_size or args.input_size
    aa = re.fullmatch(r"rand-m(\d+)-n(\d+)(?:-mstd([\d.]+))?-inc1", args.aa)
    if args.aa != "none" and not aa:
        p.error(f"--aa {args.aa!r}: give 'none' or timm's RandAugment string rand-mM-nN[-mstdS]-inc1 (the increasing "
                "op set), e.g. rand-m7-n4-mstd0.5-inc1")
    args.rand_augment = (int(aa[2]), int(aa[1]), float(aa[3] or 0)) if aa else None  # (ops, magnitude, std)
    return args


def load_pretrained(model, path, pos_embed="3d"):
    """Weights of any checkpoint layout (model.load_checkpoint), but a classifier head whose class count differs from
    the model's is dropped, so that the head starts fresh (as the official code; fc_norm, if present, is kept)."""
    state = read_checkpoint(path)
    recorded = saved_args(state)  # our checkpoints record their patch size and VideoMAE its position table
    check_trained_with(path, recorded, "patch_size", model.patch_size, model.patch_size)
    state = state.get("model", state.get("module", state))  # where our and the official checkpoints keep weights
    if any(key.startswith("encoder.") for key in state):  # a VideoMAE: official ones learnt the 1d table
        check_trained_with(f"{path} (a VideoMAE)", recorded, "pos_embed", pos_embed, "1d")
    for block in model.blocks:  # a transformers folder records its epsilon (the Hub's VideoMAE: 1e-12; ours 1e-6)
        block.norm1.eps = block.norm2.eps = recorded.get("layer_norm_eps", block.norm1.eps)
    print(f"weights from {path}:", end=" ")
    return load_checkpoint(model, state, fresh=("head.weight", "head.bias"))


@torch.no_grad()
def average_views(fn, loader, env, num_videos, width):
    """Mean of fn(clips) -> (n, width) over the readable views of every video, merged across ranks.
    -> (means (num_videos, width) float64, NaN for a video without a readable view; view counts (num_videos,)).
    The sampler deals views out to the ranks in turn, so a video's views are spread over ranks: each rank sums what it
    saw and one all_reduce adds the ranks up. The DistributedSampler pads the last round with repeats of the first
    views: a rank's j-th view has place j * world_size + rank in the padded order; places past the end are skipped."""
    sums = torch.zeros(num_videos, width, dtype=torch.float64, device=env.device)
    counts = torch.zeros(num_videos, dtype=torch.float64, device=env.device)
    place = env.rank
    for batch in loader:
        places = place + env.world_size * torch.arange(len(batch["index"]))
        place += env.world_size * len(batch["index"])
        keep = batch["ok"] & (places < len(loader.dataset))
        if keep.any():
            with env.autocast():
                out = fn(batch["video"][keep].to(env.device, non_blocking=True)).double()
            index = batch["index"][keep].to(env.device)
            sums.index_add_(0, index, out)
            counts.index_add_(0, index, torch.ones_like(out[:, 0]))
    if env.ddp:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return sums / counts[:, None], counts


def evaluate(model, loader, env, num_classes):
    """The official multi-view test: softmax of every view, averaged over a video's views; top-1 / top-5 (%) over the
    videos with at least one readable view. -> (stats, probabilities (videos, classes), view counts)."""
    model.eval()
    items = loader.dataset.items
    probs, counts = average_views(lambda clips: model(clips).float().softmax(-1), loader, env, len(items), num_classes)
    labels = torch.tensor([label for _, label in items], device=probs.device)
    seen = counts > 0
    hits = probs[seen].topk(min(5, num_classes), dim=1).indices == labels[seen, None]  # (videos seen, 5)
    stats = dict(top1=100 * hits[:, 0].double().mean().item(), top5=100 * hits.any(1).double().mean().item(),
                 videos=int(seen.sum()), views=int(counts.sum()), unreadable=int((~seen).sum()))
    return stats, probs.cpu(), counts.cpu()


def main(args):
    # 1. Devices and DDP, and the checkpoint this run continues or evaluates (the same on every rank)
    env = setup_distributed(args)
    run_state = agree("the checkpoint to resume or evaluate", checkpoint_to_resume(args),
                      "give every node the same one, or --no-auto_resume")
    if (args.eval or args.extract_features) and not (args.finetune or run_state):
        raise ValueError("nothing to evaluate: give --finetune PATH or --resume PATH (or train first)")
    # 2. Data: train.csv, val.csv (every --eval_freq epochs), test.csv (the final evaluation, when present)
    if args.data_path is None:
        data.use_synthetic_set(args, "appearance")  # the appearance task's train.csv and val.csv
    if env.is_main:  # one run at a time per folder (data.hold_folder): a second is refused here
        data.hold_folder(args.output_dir)
    loaders = make_loaders(args, env)
    top = {split: max(label for _, label in loader.dataset.items) for split, loader in loaders.items()}
    nb_classes = args.nb_classes or 1 + top.get("train", max(top.values()))
    if max(top.values()) >= nb_classes:
        raise ValueError(f"labels up to {max(top.values())} in the lists, but --nb_classes is {nb_classes}")
    # 3. Model, from the weights this mode reads
    weights = (args.finetune or run_state) if args.eval or args.extract_features else run_state or args.finetune
    raw, loss_fn = build(args, env, nb_classes, weights)
    # 4. One mode: features or an evaluation of given weights, or training (a fresh run starts from --finetune)
    if args.eval or args.extract_features:  # the weights of --finetune, else of this run's checkpoint
        missing, _ = load_pretrained(raw, weights, args.pos_embed)
        if args.extract_features:
            return extract_features(args, env, raw, loaders["features"])
        if any(key.startswith("head.") for key in missing):
            print("WARNING: the checkpoint has no head for these classes: this evaluates a random head")
        return evaluate_once(args, env, raw, loaders, nb_classes, weights)
    if args.finetune and run_state:
        print(f"resuming this run from {run_state}: --finetune {args.finetune} is not read")
    elif args.finetune:
        load_pretrained(raw, args.finetune, args.pos_embed)
    else:
        print("no --finetune: training from a random initialisation (a baseline; the student is "
              "--finetune output/distill/checkpoint-last.pth)")
    return train(args, env, raw, loaders, nb_classes, loss_fn)


def build(args, env, nb_classes, weights=None):
    """What this stage trains, as main, tools/bench.py and tools/visualize.py build it: the classifier (a frozen encoder
    and a BatchNorm/linear head for a linear probe) and loss_fn(model, batch) -> (loss, {}), soft-target cross entropy
    on mixed clips, as the official (timm's SoftTargetCrossEntropy after its Mixup). Its layer norms take the epsilon
    of the weights it starts from (a Hub VideoMAE's 1e-12, else 1e-6), recorded in this run's checkpoints."""
    args.layer_norm_eps = saved_args(read_checkpoint(weights)).get("layer_norm_eps", 1e-6) if weights else 1e-6
    torch.manual_seed(args.seed)  # the same initial weights (a fresh head at least) in every process and every run
    model = VideoClassifier(args.model, nb_classes, args.num_frames, args.input_size, args.patch_size,
                            drop_path=args.drop_path, head_drop=args.fc_drop_rate, init_scale=args.init_scale,
                            pos=args.pos_embed, use_checkpoint=args.use_checkpoint, depth=args.depth,
                            eps=args.layer_norm_eps)
    if args.linear_probe:  # as MAE: BatchNorm1d without affine parameters, then the head (keys head.0.*, head.1.*)
        model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.dim, affine=False, eps=1e-6), model.head)
        model.requires_grad_(False).head.requires_grad_(True)
    mix = data.mixup_cutmix(nb_classes, args.mixup, args.cutmix, args.smoothing)

    def loss_fn(model, batch):
        video, labels = batch["video"].to(env.device, non_blocking=True), batch["label"].to(env.device)  # B x R clips
        video, targets = mix(video, labels)
        return F.cross_entropy(model(video).float(), targets), {}
    return model.to(env.device), loss_fn


def make_loaders(args, env):
    """{split: loader}: train.csv (augmented clips), val.csv and test.csv (every view), or for --extract_features the
    list (val.csv of a folder) with one centre crop of one clip."""
    if args.extract_features:
        lists = {"features": os.path.join(args.data_path, "val.csv") if os.path.isdir(args.data_path) else args.data_path}
    else:
        lists = {split: os.path.join(args.data_path, f"{split}.csv") for split in ("train", "val", "test")}
        lists = {split: path for split, path in lists.items() if os.path.exists(path)}
        if not ({"val", "test"} & set(lists) if args.eval else {"train", "val"} <= set(lists)):
            raise ValueError(f"--data_path {args.data_path} must be a folder holding train.csv and val.csv "
                             "(--eval: val.csv or test.csv)")
    segment = args.data_set == "SSV2"  # segment sampling, and no flip: left and right are in its labels
    views = (1, 1) if args.extract_features else (args.test_num_segment, args.test_num_crop)
    sets = {split: data.VideoDataset(path, args.data_root, mode="train" if split == "train" else "test",
                                     num_frames=args.num_frames, sampling_rate=args.sampling_rate,
                                     sampling="segment" if segment else "dense", input_size=args.input_size,
                                     num_sample=args.num_sample, flip=not segment if args.flip is None else args.flip,
                                     rand_augment=args.rand_augment, erase_prob=args.reprob, crop_scale=args.crop_scale,
                                     short_side_size=args.short_side_size, test_num_segment=views[0],
                                     test_num_crop=views[1], seed=args.seed, output_dir=args.output_dir,
                                     max_bad_videos=args.max_bad_videos, cache_videos=args.cache_videos)
            for split, path in lists.items()}
    return {split: data.make_loader(d, args.batch_size * (1 if split == "train" else args.num_sample),
                                    seed=args.seed, rank=env.rank, world_size=env.world_size, shuffle=split == "train",
                                    drop_last=split == "train", num_workers=args.num_workers,
                                    device_type=env.device.type) for split, d in sets.items()}


def train(args, env, raw, loaders, nb_classes, loss_fn):
    """Fine-tuning or a linear probe: AdamW (0.9, 0.999) with layer-wise lr decay, lr and min_lr scaled with the total
    batch of videos; evaluation every --eval_freq epochs and after the last (test.csv if present), then each epoch's log
    line and checkpoint (a run killed during an evaluation resumes inside the epoch and evaluates once)."""
    total = scale_lr(args, env, clips=False)  # videos, as the official (not x num_sample)
    optimizer = torch.optim.AdamW(param_groups(raw, args.weight_decay, args.layer_decay, raw.depth), lr=args.lr,
                                  betas=(0.9, 0.999))
    final = "test" if "test" in loaders else "val"

    def evaluate_due(epoch):
        split = final if epoch + 1 == args.epochs else "val" if (epoch + 1) % args.eval_freq == 0 else None
        return evaluate_and_report(args, env, raw, loaders[split], nb_classes, split, epoch) if split else {}
    what = f"{'linear probe' if args.linear_probe else 'fine-tuning'} {args.model} on {nb_classes} classes: {total}"
    return train_epochs(args, env, raw, optimizer, loaders["train"], loss_fn, what, "classifier weights", evaluate_due)


def evaluate_once(args, env, model, loaders, nb_classes, weights):
    """--eval: the final split (test.csv if present, else val.csv), its line appended to OUTPUT_DIR/log.txt."""
    split = "test" if "test" in loaders else "val"
    stats = evaluate_and_report(args, env, model, loaders[split], nb_classes, split, None)
    if env.is_main:
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps({"eval": weights, **stats}) + "\n")
    return model


def evaluate_and_report(args, env, model, loader, nb_classes, split, epoch):
    """Evaluate, print one JSON line and write OUTPUT_DIR/predictions.csv (path, label, predicted class, its
    probability; empty for a video without a readable view). -> the stats, for the epoch's log line."""
    stats, probs, counts = evaluate(model, loader, env, nb_classes)
    stats = {"epoch": epoch, "split": split, **stats}
    if env.is_main:
        print(json.dumps(stats), flush=True)
        if stats["unreadable"]:
            print(f"WARNING: {stats['unreadable']} videos had no readable view and are not counted "
                  f"(see {os.path.join(args.output_dir, 'bad_videos.txt')})")
        rows = [[path, label, int(p.argmax()), f"{p.max():.6f}"] if n else [path, label, "", ""]
                for (path, label), p, n in zip(loader.dataset.items, probs, counts)]
        with open(os.path.join(args.output_dir, "predictions.csv"), "w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "prediction", "probability"], *rows])
    return {f"test_{k}": v for k, v in stats.items() if k != "epoch"}


def extract_features(args, env, model, loader):
    """--extract_features OUT.npy: the pooled features of every video of the list, float32 (videos, D), NaN rows for
    videos without a readable view."""
    feats, counts = average_views(model.eval().features, loader, env, len(loader.dataset.items), model.dim)
    if env.is_main:
        np.save(args.extract_features, feats.float().cpu().numpy())
        print(f"features of {int((counts > 0).sum())} videos ({int((counts == 0).sum())} unreadable: NaN rows), "
              f"shape {tuple(feats.shape)}, in {args.extract_features}")
    return model


if __name__ == "__main__":
    args = get_args()
    try:
        main(args)
    except (ValueError, FloatingPointError, data.TooManyBadVideos, OSError) as e:  # a non-finite loss, a full disk
        sys.exit(f"finetune.py: error: {one_line(e, args.output_dir)}")
