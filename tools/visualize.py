"""Pictures of a trained stage: `python tools/visualize.py STAGE.py --visualize N [the stage's own flags]`.

For each of the list's first N videos a PNG in OUTPUT_DIR/visualize/, from the stage's checkpoint (--resume, else
OUTPUT_DIR/checkpoint-last.pth; finetune.py: --finetune first). It never trains and never writes a checkpoint. The
stage's flags mean what they mean to the stage (its own get_args parses them: python STAGE.py --help), and the models
are the stage's own (STAGE.build, then the checkpoint: finetune.load_pretrained for finetune.py).

    pretrain_mae.py  every 2nd frame of the clip, the same frames with the hidden patches grey, the reconstruction
    distill.py       the visible tubes; for each teacher its features, the student's predictions, their cosine
    finetune.py      the encoder's tokens as colours (run it for two encoders on the same list to compare them)

    python tools/visualize.py distill.py --visualize 4 --data_path list.csv --output_dir output/distill
"""
import argparse
import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: the core

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import data  # noqa: E402
import distill  # noqa: E402
import finetune  # noqa: E402
import pretrain_mae  # noqa: E402
from model import (check_trained_with, load_checkpoint, patchify, read_checkpoint, saved_args,  # noqa: E402
                   setup_distributed, to_pixels)

STAGES = {"pretrain_mae.py": pretrain_mae, "distill.py": distill, "finetune.py": finetune}


def get_args(argv=None):
    """-> (the stage's module, the stage's own args with .visualize = N): the stage's flags go to its get_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # a stage flag is never taken for an abbreviation of ours
    p.add_argument("stage", choices=list(STAGES), help="the stage whose trained model to show; its flags follow")
    p.add_argument("--visualize", type=int, required=True, metavar="N",
                   help="write a PNG for each of the list's first N videos into OUTPUT_DIR/visualize")
    ours, rest = p.parse_known_args(argv)
    args = STAGES[ours.stage].get_args(rest)
    args.visualize = ours.visualize
    return STAGES[ours.stage], args


def main(stage, args):
    """The pictures of `stage` (pretrain_mae, distill or finetune) -> [dict(png, rows)], as write_pictures."""
    checkpoint = trained_checkpoint(args, stage is finetune)  # fails before anything is built or written
    env = setup_distributed(args)
    torch.manual_seed(args.seed)
    if args.data_path is None:  # the list the stage's demo trains on; finetune.py: its held-out list
        data.use_synthetic_set(args, "appearance" if stage is finetune else "all.csv")
    pictures = {pretrain_mae: teacher_pictures, distill: student_pictures, finetune: encoder_pictures}[stage]
    return pictures(args, env, checkpoint)


def trained_checkpoint(args, finetuned=False):
    """The checkpoint shown: (finetune.py: --finetune, else) --resume, else OUTPUT_DIR/checkpoint-last.pth; one clear
    error without one."""
    path = (finetuned and args.finetune) or args.resume or os.path.join(args.output_dir, "checkpoint-last.pth")
    if not os.path.exists(path):
        raise ValueError(f"--visualize shows a trained model, but {path} does not exist: train this stage first (the "
                         f"same --output_dir) or give {'--finetune PATH or ' if finetuned else ''}--resume PATH")
    return path


@torch.no_grad()
def teacher_pictures(args, env, checkpoint):
    """pretrain_mae.py: for each of the list's first N videos a PNG of every 2nd frame of the clip, the same frames
    with the hidden patches grey, and the teacher's reconstruction with the visible patches kept."""
    if os.path.isdir(args.data_path):
        raise ValueError("--visualize shows clips: give a video list as --data_path, not an image folder")
    video, p, pictures = args.mode == "video", args.patch_size, []
    if video:  # the position table it was trained with (pretrain_mae.build checks the one it would resume)
        check_trained_with(checkpoint, saved_args(read_checkpoint(checkpoint)), "pos_embed", args.pos_embed, "1d")
    model, _ = pretrain_mae.build(args, env)
    load_checkpoint(model, checkpoint)
    paths, clips = first_clips(args.data_path, args.data_root, args.visualize, args.num_frames, args.sampling_rate,
                               args.input_size)
    for i, clip in enumerate(clips.to(env.device)):
        generator = torch.Generator().manual_seed(args.seed + i)  # a fixed mask per video
        if video:  # one mask of --mask_type over the tubes; VideoMAE predicts the masked tubes
            shown, tubelet, grid = clip[None], 2, model.encoder.grid  # (1, 3, T, S, S)
            mask = data.tube_mask(data.mask_grid(grid, args.mask_type), args.mask_ratio, generator)[None].to(env.device)
            loss, pred = model.eval()(shown, mask)  # pred (1, N_mask, 2*p*p*3)
        else:  # the image MAE on frames 0, 2, 4, ... (those it teaches from), each with its own random mask
            shown, tubelet, grid = clip[None, :, ::2], 1, (args.num_frames // 2, *model.grid)  # (1, 3, T/2, S, S)
            mask = torch.stack([data.random_mask(math.prod(model.grid), args.mask_ratio, generator)
                                for _ in range(grid[0])]).to(env.device)  # (T/2, L)
            loss, pred, _ = model.eval()(shown[0].transpose(0, 1), mask=mask)  # pred (T/2, L, p*p*3), every patch
            pred, mask = pred[mask][None], mask.reshape(1, -1)  # the masked patches in token order; (1, N)
        x = patchify(to_pixels(shown) if video else shown, p, tubelet)  # what the targets were made of: (1, N, ...)
        if not video or model.normalize_target:
            # Normalized targets lost each patch's brightness and contrast: de-normalize every prediction with its own
            # patch's mean and std, as MAE's and VideoMAE's visualizations do (MAE: over all p*p*3 values, in
            # ImageNet-normalized space; VideoMAE: per channel over the tube, in 0-1 pixels).
            v = x[mask].view(pred.shape[1], -1, 3 if video else 1)  # (N_mask, values, channels)
            std = v.std(1, keepdim=True) + 1e-6 if video else (v.var(1, keepdim=True) + 1e-6).sqrt()
            pred = pred.view(v.shape) * std + v.mean(1, keepdim=True)
        x[mask] = pred.reshape(-1, x.shape[-1]).float()  # the reconstruction: predicted where masked, else the input
        reconstruction = unpatchify(x, grid, p, tubelet)
        frames = to_pixels(shown)  # (1, 3, T or T/2, S, S)
        hidden = unpatchify(mask[..., None].repeat(1, 1, tubelet * p * p), grid, p, tubelet)  # (1, 1, ...) True: masked
        panels = [frames, torch.where(hidden, 0.5, frames), reconstruction if video else to_pixels(reconstruction)]
        what = ("PATCHES (AT RANDOM IN EACH FRAME)" if not video else "TUBES (THE SAME CELLS AT EVERY STEP)"
                if args.mask_type == "tube" else "TUBES (ANYWHERE IN SPACE AND TIME)")
        labels = [f"{args.mode} MAE ON {os.path.basename(paths[i])}: EVERY 2ND FRAME",
                  f"MASKED: {int(mask.sum())} OF {mask.shape[1]} {what}",
                  f"RECONSTRUCTED, VISIBLE PATCHES KEPT (LOSS {loss.item():.3f})"]
        pictures.append([(label, panel[0, :, ::tubelet].transpose(0, 1).cpu()) for label, panel in zip(labels, panels)])
    return write_pictures(args.output_dir, paths, pictures, args.input_size)


@torch.inference_mode()
def student_pictures(args, env, checkpoint):
    """distill.py: for each of the list's first N videos a PNG of every 2nd frame, the visible tubes, then for each
    teacher its features on the whole clip, the student's predictions at the masked tubes (the teacher's own features
    at the visible ones) and the cosine of prediction and target per tube. Features are drawn as colours: the top 3
    principal components of the teacher's tokens on these N videos, one basis per teacher."""
    student, _, teachers = distill.build(args, env)
    load_checkpoint(student, checkpoint)
    paths, video = first_clips(args.data_path, args.data_root, args.visualize, args.num_frames, args.sampling_rate,
                               args.input_size)  # (n, 3, T, S, S)
    mask = torch.stack([data.tube_mask(student.grid, args.mask_ratio, torch.Generator().manual_seed(args.seed + i))
                        for i in range(len(paths))])  # (n, N): the masks of the VideoMAE's pictures
    video = video.to(env.device)
    clips = {"vid": video, "img": video if args.teacher_input_size == args.input_size else F.interpolate(
        video, size=(args.num_frames, args.teacher_input_size, args.teacher_input_size), mode="trilinear")}
    with env.autocast():
        preds = dict(zip(("img", "vid"), student.eval()(video, mask.to(env.device))))
        feats = {name: distill.teacher_features(t, clips[name], args.norm_feature) for name, t in teachers.items()}
    paint = functools.partial(paint_tokens, grid=student.grid, p=student.patch_size, tubelet=student.tubelet_size)
    frames = to_pixels(video)[:, :, ::2].transpose(1, 2).cpu()  # (n, T/2, 3, S, S)
    pictures = [[(f"{os.path.basename(path)}: EVERY 2ND FRAME", frames[i]),
                 (f"THE STUDENT SEES {int((~mask[i]).sum())} OF {mask.shape[1]} TUBES (THE REST GREY)",
                  torch.where(paint(mask[..., None])[i], 0.5, frames[i]))] for i, path in enumerate(paths)]
    for name, feat in feats.items():
        feat, pred = feat.float().cpu(), preds[name].float().cpu()  # (n, N, D), (n, N_mask, D)
        colours = pca_colours(feat.flatten(0, 1))  # fitted on every token of the teacher on these videos
        recovered = feat.clone()
        recovered[mask] = pred.flatten(0, 1)  # the student's predictions where it saw nothing
        cosine = F.cosine_similarity(pred, feat[mask].view(pred.shape), dim=-1)  # (n, N_mask)
        heat = torch.full((*mask.shape, 3), 0.5)  # visible tubes grey; black (cosine <= 0) -> red -> yellow (1)
        heat[mask] = (cosine.flatten()[:, None] * 2 - torch.tensor([0.0, 1.0, 2.0])).clamp(0, 1)
        maps = [paint(colours(feat)), paint(colours(recovered)), paint(heat)]
        for i, rows in enumerate(pictures):
            rows += [(f"{dict(img='IMAGE', vid='VIDEO')[name]} TEACHER: FEATURES OF THE WHOLE CLIP, PCA", maps[0][i]),
                     ("STUDENT: PREDICTIONS AT THE MASKED TUBES, SAME PCA", maps[1][i]),
                     (f"COSINE OF PREDICTION AND TARGET: MEAN {cosine[i].mean():.2f} (0 BLACK, 1 YELLOW)", maps[2][i])]
    return write_pictures(args.output_dir, paths, pictures, args.input_size)


@torch.no_grad()
def encoder_pictures(args, env, checkpoint):
    """finetune.py: for each of the list's first N videos (val.csv when --data_path is a folder) a PNG of every 2nd
    frame and the encoder's token features (its last block, before pooling) as colours: the top 3 principal
    components of its tokens on these N videos. Run it for two encoders on the same list to compare them."""
    list_path = os.path.join(args.data_path, "val.csv") if os.path.isdir(args.data_path) else args.data_path
    nb_classes = args.nb_classes or 1 + max(label for _, label in data.read_list(list_path))  # as finetune.main
    model, _ = finetune.build(args, env, nb_classes, checkpoint)  # a linear probe's head too: its checkpoint loads
    finetune.load_pretrained(model, checkpoint, args.pos_embed)
    paths, video = first_clips(list_path, args.data_root, args.visualize, args.num_frames, args.sampling_rate,
                               args.input_size, "segment" if args.data_set == "SSV2" else "dense")
    tokens = model.eval().forward_features(video.to(env.device)).float().cpu()  # (n, N, D)
    maps = paint_tokens(pca_colours(tokens.flatten(0, 1))(tokens), model.grid, model.patch_size, model.tubelet_size)
    frames = to_pixels(video)[:, :, ::2].transpose(1, 2)  # (n, T/2, 3, S, S)
    pictures = [[(f"{os.path.basename(path)}: EVERY 2ND FRAME", frames[i]),
                 (f"ENCODER OF {'/'.join(checkpoint.split(os.sep)[-2:])}: TOKENS, PCA", maps[i])]
                for i, path in enumerate(paths)]
    return write_pictures(args.output_dir, paths, pictures, args.input_size)


# ------------------------------------------------------------------------------------- tokens and features as colours
def unpatchify(x, grid, p, tubelet=1):
    """The inverse of model.patchify: (B, N, tubelet*p*p*C) on the token grid (t, h, w) -> (B, C, t*tubelet, h*p,
    w*p)."""
    (t, h, w), B = grid, x.shape[0]
    x = x.reshape(B, t, h, w, tubelet, p, p, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, t, tubelet, h, p, w, p)
    return x.reshape(B, -1, t * tubelet, h * p, w * p)


def paint_tokens(values, grid, p, tubelet):
    """(B, N, C) one value per token -> (B, t, C, h*p, w*p), each token's values over its patch, one picture per time
    step (tubes span `tubelet` frames: it is drawn on the first)."""
    return unpatchify(values.repeat(1, 1, tubelet * p * p), grid, p, tubelet)[:, :, ::tubelet].transpose(1, 2)


def pca_colours(tokens):
    """A colour map fitted on feature tokens (M, D): centre them, project on their top 3 principal directions (right
    singular vectors) and map each component's +-2 std to 0-1. Returns the map (..., D) -> (..., 3), one fixed basis
    and scaling, so that a teacher's features and a student's predictions share the colours."""
    mean = tokens.mean(0)
    _, s, vh = torch.linalg.svd(tokens - mean, full_matrices=False)  # tokens - mean = U diag(s) Vh
    four_std = (4 * s[:3] / (len(tokens) - 1) ** 0.5).clamp_min(1e-12)  # a component's std is s / sqrt(M - 1)
    return lambda x: (0.5 + (x - mean) @ vh[:3].T / four_std).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------- pictures
def first_clips(list_path, data_root, n, num_frames, sampling_rate, input_size, sampling="dense"):
    """The list's first n videos as the centred test view of each: the same frames in every stage's pictures.
    -> (paths, clips (n, 3, T, S, S))."""
    dataset = data.VideoDataset(list_path, data_root, mode="test", num_frames=num_frames, sampling_rate=sampling_rate,
                                sampling=sampling, input_size=input_size, short_side_size=input_size,
                                test_num_segment=1, test_num_crop=1)
    n = min(n, len(dataset))
    return [path for path, _ in dataset.items[:n]], torch.stack([dataset[(i, 0)]["video"] for i in range(n)])


# Capitals, digits and a few signs, 3x5 pixels each: 5 rows of 3 bits, one octal digit per row (4 = left column).
FONT = {g[0]: g[1:] for g in """A25755 B65656 C34443 D65556 E74647 F74644 G34553 H55755 I72227 J11152 K55655 L44447
    M57755 N65555 O25552 P65644 Q25563 R65655 S34216 T72222 U55557 V55552 W55775 X55255 Y55222 Z71247 075557 126227
    261247 361216 455711 574616 634757 771222 875757 975716 .00002 ,00024 -00700 _00007 :02020 %51245 (12221 )42224
    /11244 =07070 +02720""".split()}


def write_pictures(output_dir, videos, pictures, input_size):
    """The PNGs, OUTPUT_DIR/visualize/{i}_{video name}.png, one per video: pictures[i] = [(label, images float
    (K, 3, S, S) in 0-1)], a row each. A row is its label (FONT at twice its size, 14 px) over its K images side by
    side, enlarged by scale = max(1, 128 // input_size) (nearest: patches stay sharp), on white with 2 px gaps: the
    PNG is (3, sum(14 + S*scale) + 2, max K*(S*scale + 2) + 2), by torchvision's encoder. -> [dict(png, rows)]."""
    written, scale = [], max(1, 128 // input_size)
    for i, (video, rows) in enumerate(zip(videos, pictures)):
        strips = []
        for label, images in rows:
            images = images.float().clamp(0, 1).repeat_interleave(scale, -2).repeat_interleave(scale, -1)
            K, _, h, w = images.shape
            strip = F.pad(images, (2, 0, 14, 0), value=1.0)  # (K, 3, 14 + h, 2 + w): label space, gap on the left
            strip = strip.permute(1, 2, 0, 3).reshape(3, h + 14, K * (w + 2))  # the K images side by side
            glyphs = torch.tensor([[int(FONT.get(c, "00000")[r]) for c in label.upper()] for r in range(5)])
            text = F.pad(glyphs[..., None] >> torch.tensor([2, 1, 0]) & 1, (0, 1)).flatten(1)  # (5, 4 * letters)
            text = text.repeat_interleave(2, 0).repeat_interleave(2, 1)[:, :K * (w + 2) - 2]
            strip[:, 2:12, 2:2 + text.shape[1]] = 1.0 - text  # black letters, left column of a glyph first
            strips.append(strip)
        width = max(strip.shape[2] for strip in strips) + 2
        picture = torch.cat([F.pad(strip, (0, width - strip.shape[2]), value=1.0) for strip in strips]
                            + [torch.ones(3, 2, width)], dim=1)
        png = os.path.join(output_dir, "visualize", f"{i:02d}_{os.path.splitext(os.path.basename(video))[0]}.png")
        os.makedirs(os.path.dirname(png), exist_ok=True)
        torchvision.io.write_png((picture * 255).round().to(torch.uint8), png)
        print(f"wrote {png}")
        written.append(dict(png=png, rows=rows))
    return written


if __name__ == "__main__":
    stage, args = get_args()
    try:
        main(stage, args)
    except (ValueError, data.TooManyBadVideos) as e:
        sys.exit(f"visualize.py: error: {e}")
