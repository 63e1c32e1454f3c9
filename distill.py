"""Stage 2, the method itself: masked video distillation with spatial-temporal co-teaching.

A student video ViT sees 10% of a clip's space-time tubes. Two shallow decoders predict, at every masked tube, the
features that two frozen teachers compute on the whole clip: the image teacher (an image MAE, run on every tubelet-th
frame) carries spatial knowledge, the video teacher (a VideoMAE) temporal knowledge.

    loss = w_img * SmoothL1(pred_img, image_teacher(clip)[masked]) + w_vid * SmoothL1(pred_vid, video_teacher(clip)[masked])

    torchrun --nproc_per_node 8 distill.py --model vit_base --data_path k400/train.csv --data_root k400 \\
        --image_teacher mae_pretrain_vit_base.pth --video_teacher videomae_k400_pretrain_base.pth
    torchrun distill.py --model vit_base     # no --data_path: a demo on the synthetic set, minutes on a CPU
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import data
from model import (NUM_SAMPLE_HELP, VIT_SIZES, ImageMAE, MVDStudent, VideoMAE, add_training_flags, agree, check_flags,
                   check_trained_with, fill_defaults, load_checkpoint, mask_ratio_rule, one_line, param_groups,
                   read_checkpoint, saved_args, scale_lr, setup_distributed, train_epochs)

# Flags left at None take these: the official recipe with a --data_path, a CPU-sized demo (~5 min on 2 cores) without.
OFFICIAL = dict(epochs=400, warmup_epochs=40, batch_size=16, input_size=224, num_frames=16, sampling_rate=4,
                min_lr=1e-4)
DEMO = dict(epochs=1, warmup_epochs=0, batch_size=4, input_size=64, num_frames=8, sampling_rate=2, min_lr=1e-5)
LOSSES = {"SmoothL1": F.smooth_l1_loss, "L2": F.mse_loss, "L1": F.l1_loss}  # SmoothL1 with beta 1, as the official


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder_depth", type=int, default=2, help="blocks of each feature decoder")
    p.add_argument("--feat_decoder_embed_dim", type=int, help="decoder width (default: the student's; 512 for ViT-L)")
    p.add_argument("--feat_decoder_num_heads", type=int, help="decoder heads (default: the student's)")
    p.add_argument("--mask_ratio", type=float, default=0.9, help="fraction of tubes hidden from the student")
    p.add_argument("--image_teacher", help="image MAE checkpoint (official MAE layout or ours); default: "
                                           "output/image_mae/checkpoint-last.pth if it exists, else random (smoke test)")
    p.add_argument("--video_teacher", help="VideoMAE checkpoint; default: output/video_mae/checkpoint-last.pth")
    p.add_argument("--image_teacher_model", choices=list(VIT_SIZES),
                   help="image teacher size (default: the size saved in our checkpoint, else vit_base)")
    p.add_argument("--video_teacher_model", choices=list(VIT_SIZES), help="video teacher size (as above)")
    p.add_argument("--teacher_patch_size", type=int, default=16, help="image teacher patch (14 for MAE-H)")
    p.add_argument("--teacher_input_size", type=int, help="the image teacher's input size (196 for MAE-H); default "
                   "input_size; the video teacher takes the student's clip")
    p.add_argument("--image_teacher_loss_weight", type=float, default=1.0, help="0 = video teacher only")
    p.add_argument("--video_teacher_loss_weight", type=float, default=1.0, help="0 = image teacher only")
    p.add_argument("--distill_loss_func", choices=list(LOSSES), default="SmoothL1")
    p.add_argument("--norm_feature", action=argparse.BooleanOptionalAction, default=False,
                   help="LayerNorm (no affine) on each teacher feature (off in the official scripts)")
    p.add_argument("--data_path", help="video list ('path label' lines); omitted: the synthetic demo set")
    p.add_argument("--num_sample", type=int, default=1, help=NUM_SAMPLE_HELP)
    add_training_flags(p, "output/distill", drop_path=0.1, min_lr_note=" (default 1e-4 with --data_path, as every "
                       "official 400-epoch script; their 800-epoch ViT-L/H scripts keep 1e-5; 1e-5 in the demo)")
    args = p.parse_args(argv)
    fill_defaults(p, args, OFFICIAL if args.data_path else DEMO)
    args.teacher_input_size = args.teacher_input_size or args.input_size
    check_flags(p, args, [mask_ratio_rule((args.input_size // args.patch_size) ** 2)])  # cells of a time step
    if args.image_teacher_loss_weight == 0 and args.video_teacher_loss_weight == 0:
        p.error("both teacher loss weights are 0: nothing to distill; set --image_teacher_loss_weight or "
                "--video_teacher_loss_weight above 0")
    # equal grids as fractions: the student's is whole (fill_defaults checks it), so the teacher's is whole too
    if args.teacher_input_size * args.patch_size != args.input_size * args.teacher_patch_size:
        p.error(f"the image teacher's grid ({args.teacher_input_size} px / --teacher_patch_size "
                f"{args.teacher_patch_size}) must equal the student's ({args.input_size} px / --patch_size "
                f"{args.patch_size}): one teacher token per tube")
    return args


def build_teacher(kind, args, device, dtype):
    """A frozen teacher in eval mode, encoder only: weights from --{kind}_teacher, else from pretrain_mae.py's default
    output, else random weights (a smoke test, said loudly). Its size comes from the flag, else from our checkpoint."""
    default = os.path.join("output", f"{kind}_mae", "checkpoint-last.pth")
    path = agree(f"the {kind} teacher", getattr(args, f"{kind}_teacher") or (
        default if os.path.exists(default) else None), f"give every node {default}, or pass --{kind}_teacher PATH")
    saved = saved_args(read_checkpoint(path)) if path else {}
    size = getattr(args, f"{kind}_teacher_model") or saved.get("model", "vit_base")
    depth, eps = saved.get("depth"), saved.get("layer_norm_eps", 1e-6)  # our test configs record their depth, a
    # transformers folder its depth and layer-norm epsilon (the Hub's VideoMAE: 1e-12, the original code 1e-6).
    # The video teacher takes the student's clip (its tubes are the student's), the image teacher the clip at
    # --teacher_input_size (as the official with --video_teacher_input_size = --input_size, its ViT-H script)
    patch = args.teacher_patch_size if kind == "image" else args.patch_size
    check_trained_with(f"the {kind} teacher {path}", saved, "patch_size", patch, patch,
                       "teacher_patch_size" if kind == "image" else "patch_size")
    if kind == "image":
        teacher = ImageMAE(size, args.teacher_input_size, patch, decoder_depth=0, depth=depth, eps=eps)
    else:
        teacher = VideoMAE(size, args.num_frames, args.input_size, patch, decoder_depth=0, depth=depth, eps=eps,
                           pos=saved.get("pos_embed", "1d"))  # the table it was trained with: official VideoMAE's 1d
    if path:
        print(f"{kind} teacher {size} from {path}")
        load_checkpoint(teacher, path)
    else:
        print(f"WARNING: no {kind} teacher given and none in {default}: using a RANDOMLY INITIALISED {kind} teacher. "
              "This run is a smoke test, not distillation: train one with pretrain_mae.py or pass --"
              f"{kind}_teacher PATH", flush=True)
    teacher.to(device).eval().requires_grad_(False)
    for layer in teacher.modules():  # autocast would cast these frozen weights again at every step: do it once
        if isinstance(layer, torch.nn.Linear) and dtype != torch.float32:
            layer.to(dtype)
    return teacher


@torch.inference_mode()
def teacher_features(teacher, video, norm_feature):
    """Features of a frozen teacher on the whole clip, (B, N, D) in the student's tube order. The image teacher sees
    every tubelet-th frame (0, 2, 4, ...) as a batch of images; the video teacher the clip itself."""
    feats = teacher.video_features(video) if isinstance(teacher, ImageMAE) else teacher.teacher_features(video)
    return F.layer_norm(feats, feats.shape[-1:], eps=1e-6) if norm_feature else feats  # as the official


def mvd_loss(pred, feats, mask, loss_func):
    """Distillation loss of one teacher at the masked tubes. pred (B, N_mask, D), feats (B, N, D), mask (B, N)."""
    target = feats[mask].reshape(pred.shape)  # indexing leaves inference mode: a normal tensor, safe for autograd
    return LOSSES[loss_func](pred.float(), target.float())


def build(args, env):
    """What this stage trains, as main, tools/bench.py and tools/visualize.py build it: the student, its loss_fn(model,
    batch) -> (loss, {loss_img, loss_vid}) and the frozen teachers, only those with a loss weight."""
    torch.manual_seed(args.seed)  # the same initial weights (random teachers' too) in every process and every run
    weights = {"img": args.image_teacher_loss_weight, "vid": args.video_teacher_loss_weight}
    teachers = {name: build_teacher(kind, args, env.device, env.dtype)
                for name, kind in (("img", "image"), ("vid", "video")) if weights[name] > 0}
    student = MVDStudent(args.model, args.num_frames, args.input_size, args.decoder_depth, patch_size=args.patch_size,
                         img_teacher_dim=teachers["img"].dim if "img" in teachers else 0,
                         vid_teacher_dim=teachers["vid"].encoder.dim if "vid" in teachers else 0,
                         decoder_dim=args.feat_decoder_embed_dim, decoder_heads=args.feat_decoder_num_heads,
                         drop_path=args.drop_path, use_checkpoint=args.use_checkpoint, depth=args.depth)

    def loss_fn(model, batch):  # clips come as uint8 and are normalized here, on the device
        video = data.normalize(batch["video"].to(env.device, non_blocking=True))  # (B, 3, T, H, W)
        mask = batch["mask"].to(env.device, non_blocking=True)
        clips = {"vid": video, "img": data.normalize(batch["teacher_video"].to(env.device))
                 if "teacher_video" in batch else video}  # the image teacher's at --teacher_input_size
        preds = dict(zip(("img", "vid"), model(video, mask)))
        losses = {name: mvd_loss(preds[name], teacher_features(t, clips[name], args.norm_feature), mask,
                                 args.distill_loss_func) for name, t in teachers.items()}
        return sum(weights[n] * losses[n] for n in losses), {f"loss_{n}": v.item() for n, v in losses.items()}
    return student.to(env.device), loss_fn, teachers


def main(args):
    # 1. Devices and DDP
    env = setup_distributed(args)
    # 2. Data: clips with a tube mask (and the same crop at the teachers' size when it differs)
    if args.data_path is None:
        data.use_synthetic_set(args, "all.csv")
    if env.is_main:  # one run at a time per folder (data.hold_folder): a second is refused here
        data.hold_folder(args.output_dir)
    dataset = data.VideoDataset(args.data_path, args.data_root, mode="pretrain", num_frames=args.num_frames,
                                sampling_rate=args.sampling_rate, input_size=args.input_size,
                                teacher_input_size=args.teacher_input_size, mask_ratio=args.mask_ratio,
                                patch_size=args.patch_size, num_sample=args.num_sample, seed=args.seed,
                                output_dir=args.output_dir, max_bad_videos=args.max_bad_videos,
                                cache_videos=args.cache_videos)
    loader = data.make_loader(dataset, args.batch_size, seed=args.seed, rank=env.rank, world_size=env.world_size,
                              num_workers=args.num_workers, device_type=env.device.type)
    # 3. The frozen teachers and the student
    student, loss_fn, teachers = build(args, env)
    # 4. Optimizer: AdamW (0.9, 0.95), lr and min_lr scaled with the total batch of clips, no decay on biases and
    # norms (the student's mask tokens decay, as the official)
    total = scale_lr(args, env)
    optimizer = torch.optim.AdamW(param_groups(student, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    # 5. Loop: a checkpoint every epoch and every --save_every_minutes inside one, written atomically; its 'model'
    # loads into the official MVD student
    return train_epochs(args, env, student, optimizer, loader, loss_fn,
                        f"MVD student {args.model} from teachers {', '.join(teachers)}: {total}",
                        "student checkpoint")


if __name__ == "__main__":
    args = get_args()
    try:
        main(args)
    except (ValueError, FloatingPointError, data.TooManyBadVideos, OSError) as e:  # a non-finite loss, a full disk
        sys.exit(f"distill.py: error: {one_line(e, args.output_dir)}")
