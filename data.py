"""From video files to batches: PyAV decoding, frame sampling, augmentation, masks, loaders and a synthetic set
(preparing a data set and the loader's benchmark: tools/prepare.py, tools/bench_loader.py).

Conventions (see SPEC.md):
  a clip is float (3, T, H, W), normalized with the ImageNet mean and std; a batch adds B in front. Pretraining
  samples hand it over as uint8 (3, T, H, W), and the stage normalizes the batch on its device (normalize());
  a mask is bool (N,) per sample, True = masked (hidden from the student), tokens flattened t-major, then row, column;
  frames straight from a file are uint8 (T, H, W, 3) RGB.

Every random choice of a sample (clip start, crop, RandAugment draw, mask, replacement of a bad file) comes from an
RNG seeded by (seed, epoch, index) alone, so a run resumes exactly and 2 ranks x batch b see exactly the
samples of 1 rank x batch 2b. The official code draws them from each worker's global RNG instead."""
import argparse
import fcntl
import fractions
import functools
import hashlib
import itertools
import json
import math
import os
import sys

import av
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from model import IMAGENET_MEAN, IMAGENET_STD, agree

# What a missing, truncated, empty or non-video file raises while it is read (PIL raises OSError for images).
UNREADABLE = (av.error.FFmpegError, OSError, ValueError)


# ----------------------------------------------------------------------------------------------- reading and writing
def read_frames(path, indices, decode_all=False):
    """uint8 (len(indices), H, W, 3): the frames at 0-based `indices` in display order (repeats allowed; past the end:
    the last frame), exactly as a full decode, decoding only what they need (_decode). `indices` may be a function of
    the frame count (one file open, not two). decode_all=True: the slow reference (decode, convert all, then index)."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        if callable(indices):
            indices = indices(_frame_count(container, stream) or video_num_frames(path))
        indices = [int(i) for i in indices]
        frames = _decode(container, stream, set(indices), by_pts=not decode_all, convert_all=decode_all)
    if frames is None:  # timestamps unusable as frame numbers: count frames from the start
        with _open(path) as container:
            frames = _decode(container, _video_stream(container, path), set(indices), by_pts=False)
    return torch.from_numpy(np.stack([frames[i] for i in indices]))


def _open(path):
    """The file opened without FFmpeg's probe, which decodes a new file's first frames only to report a pixel format
    the decoder finds in the frames anyway (most of an open's time; the decoder opens later, without this option)."""
    return av.open(str(path), options={"skip_frame": "nonkey"})


def _video_stream(container, path):
    if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
    stream = container.streams.video[0]
    if not (stream.width and stream.height):  # e.g. a PNG signature and zeros: FFmpeg opens a picture of no pixels
        raise ValueError(f"{path}: frames of {stream.width}x{stream.height} pixels")
    # Frame- and slice-threaded decoding on as many threads as torch uses: all cores in the main process, one in a
    # loader worker (as many workers as cores is what feeds a GPU; more threads per worker would only contend).
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = torch.get_num_threads()
    return stream


def _decode(container, stream, wanted, by_pts, convert_all=False):
    """{index: uint8 (H, W, 3)} for every wanted index, or None if timestamps turn out unusable as frame numbers.
    by_pts: frame number = (pts - pts of frame 0) x time base x average rate, which allows seeking to the keyframe
    before the first needed frame and skipping the unneeded frames no other frame refers to (most B-frames). Only
    needed frames are converted to RGB; decoding stops after the last. Else frames are counted from the start."""
    first, last = min(wanted), max(wanted)
    origin = _frame_zero(container, stream) if by_pts and stream.average_rate and stream.time_base else None
    if by_pts and origin is None:
        return None
    ticks = 1 / float(stream.average_rate * stream.time_base) if by_pts else None  # pts ticks per frame
    if by_pts:  # to the keyframe before, aiming 4 frames early: AVI indexes a keyframe at its decoding time (B-frames)
        container.seek(origin + int(max(first - 4, 0) * ticks), stream=stream)
    # One converter for the clip (frame.to_ndarray makes a swscale context a frame, costlier than decoding), on one
    # thread (PyAV 17+ converts on every core: slower for frames this small, and a worker per core must not fan out).
    rgb = functools.partial(av.video.reformatter.VideoReformatter().reformat, format="rgb24", threads=1)
    out, previous, index, skipped = {}, None, -1, set()
    for packet, skip in _packets_to_decode(container.demux(stream), origin, ticks, wanted, skipped):
        stream.codec_context.skip_frame = skip  # set before the decoder's threads see the packet
        for frame in packet.decode():
            # By pts, gaps are expected before the first needed frame (the seek); from there on the only frames missing
            # may be those skipped on purpose, or timestamps do not count frames (variable rate).
            i = (None if frame.pts is None else round((frame.pts - origin) / ticks)) if by_pts else index + 1
            if by_pts and (i is None or i <= index or any(j not in skipped for j in range(max(index + 1, first), i))):
                return None
            index = i
            if index in wanted or convert_all:
                out[index] = rgb(frame).to_ndarray()
            if index >= last and not convert_all:
                return out
            previous = frame
    if previous is None and not by_pts:
        raise ValueError("no frames decoded")
    if by_pts and (previous is None or index < first or max(skipped, default=-1) > index):  # or the video ended
        return None  # among skipped frames: its last frame may be one of them
    tail = out[index] if index in out else rgb(previous).to_ndarray()
    return {i: out.get(i, tail) for i in wanted}  # indices past the end get the last frame


def _frame_zero(container, stream):
    """pts of frame 0, the first frame a full decode gives (stream.start_time can be a frame off: AVI with B-frames),
    or None. Read off the first packets when they show it plainly (the stream opens on a keyframe shown before the
    next 15 packets), which decodes nothing; otherwise decode up to the first frame."""
    head = list(itertools.islice(container.demux(stream), 16))
    timed = [packet.pts for packet in head if packet.pts is not None]
    if head and head[0].is_keyframe and head[0].pts is not None and head[0].pts == min(timed):
        return head[0].pts
    return next((frame.pts for packet in itertools.chain(head, container.demux(stream)) for frame in packet.decode()),
                None)


def _packets_to_decode(packets, origin, ticks, wanted, skipped):
    """The packets the decoder needs, each with its skip_frame: "DEFAULT" for a needed frame, "NONREF" for others
    (frames no other frame refers to are not decoded). A packet's frame number comes from its pts (None without origin:
    every packet is needed); unneeded ones go into `skipped`. An unneeded frame before the last needed one is held
    back, undecoded, until a needed one may refer to it; at a keyframe after every needed frame before it, what is held
    is dropped: clips far apart in one video cost two short decodes, not the reference frames between."""
    last, held, fed = max(wanted), [], set()
    for packet in packets:
        n = None if origin is None or packet.pts is None else round((packet.pts - origin) / ticks)
        needed = n is None or n in wanted
        if not needed:
            skipped.add(n)
            if n < last:
                held = [packet] if packet.is_keyframe and all(w in fed for w in wanted if w < n) else held + [packet]
                continue
        fed.add(n)
        yield from [(p, "NONREF") for p in held] + [(packet, "DEFAULT" if needed else "NONREF")]
        held = []


def _frame_count(container, stream):
    """The container's frame count, else duration x rate (webm/mkv carry no count), else None."""
    if stream.frames > 0:
        return stream.frames
    seconds = (stream.duration * stream.time_base if stream.duration and stream.time_base
               else (container.duration or 0) / av.time_base)
    return max(1, round(seconds * stream.average_rate)) if seconds and stream.average_rate else None


def video_num_frames(path):
    """Number of frames: the container's count, else duration x rate, else counted packet by packet."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        return _frame_count(container, stream) or sum(1 for packet in container.demux(stream) if packet.size)


def write_video(path, frames, fps=30, codec="libx264", options=None, format=None):
    """Write uint8 (H, W, 3) RGB arrays or av.VideoFrames of one size as yuv420p, frame i at i / fps, a decoded frame's
    display rotation kept; `options` go to the encoder (e.g. {"crf": "18", "g": "12"}). -> the number written."""
    count = -1
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.pix_fmt = "yuv420p"
        for count, frame in enumerate(frames):
            if not isinstance(frame, av.VideoFrame):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            if not count:  # the size of the first frame, and the rotation a player applies (phone footage)
                stream.width, stream.height = frame.width, frame.height
                if frame.rotation:
                    stream.set_display_rotation(frame.rotation)
            frame.pts, frame.time_base = count, 1 / fractions.Fraction(fps)
            frame.pict_type = av.video.frame.PictureType.NONE  # the encoder chooses (x264 keeps a decoded frame's)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return count + 1


def read_list(list_path):
    """[(path as written, label)] from lines `path label` (space or comma)."""
    if not os.path.isfile(list_path):
        raise ValueError(f"video list {list_path} does not exist: check --data_path")
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{list_path} is not UTF-8 text ({e.reason} at byte {e.start}): give a video list") from None
    rows = [line.strip().split("," if "," in line else None) for line in lines]  # [] for a blank line
    for number, fields in enumerate(rows, 1):
        if fields and (len(fields) != 2 or not fields[1].strip().isdigit()):  # a label is 0 or more
            raise ValueError(f"{list_path}:{number}: expected 'path label' with a label 0 or more, got "
                             f"{lines[number - 1].strip()!r}")
    return [(fields[0].strip(), int(fields[1])) for fields in rows if fields]


def agree_on_files(what, entries, fix):
    """[(path as given, label)], the same on every rank (their count and digest), or every rank stops in one line
    (model.agree): ranks with other files would deal other shards and steps, and wait for each other at the end."""
    digest = hashlib.sha1(repr(entries).encode()).hexdigest()[:12]
    agree(what, f"{len(entries)} files, sha1 {digest}", fix)


def load_video_list(list_path, data_root=""):
    """[(absolute path, label)] of a list (read_list). Files listed but missing stay listed and are replaced when read,
    as unreadable ones (--max_bad_videos): every rank of every node has the same list, so the same shards and steps."""
    if data_root and not os.path.isdir(data_root):
        raise ValueError(f"--data_root {data_root} does not exist: give the folder the paths of {list_path} are "
                         "relative to")
    entries = read_list(list_path)
    agree_on_files(f"the list {list_path}", entries, "give every node the same list")
    videos = [(os.path.abspath(os.path.join(data_root, path)), label) for path, label in entries]
    missing = dict.fromkeys(path for path, _ in videos if not os.path.exists(path))  # a set in list order
    if missing:
        print(f"warning: {len(missing)} of {len(videos)} files in {list_path} do not exist here and will be replaced "
              f"by other draws (--max_bad_videos), e.g. {', '.join(list(missing)[:3])}", flush=True)
    return videos


class CachedReader:
    """read_frames, but each video decoded once, whole, and kept as uint8 (T, H, W, 3): for small sets of small videos
    whose decoding would set the pace of a tiny model. `paths` are decoded up front by `num_workers` processes, before
    the DataLoader's workers fork and share them; a file that fails is left out and read (and skipped) as usual."""

    def __init__(self, paths=(), num_workers=0):
        # without batching, a DataLoader applies its collate_fn to each path, in its workers (0 workers: here)
        whole = DataLoader(sorted(set(paths)), batch_size=None, num_workers=num_workers, collate_fn=_whole_video)
        self.videos = {path: torch.from_numpy(frames) for path, frames in whole if frames is not None}

    def __call__(self, path, indices):
        if path not in self.videos:
            self.videos[path] = read_frames(path, range)  # every frame: indices(frame count) = range(frame count)
        frames = self.videos[path]
        wanted = indices(len(frames)) if callable(indices) else indices
        return frames[[min(int(i), len(frames) - 1) for i in wanted]]  # past the end: the last frame, as read_frames


def _whole_video(path):  # -> (path, uint8 (T, H, W, 3) numpy, or None if unreadable): pickled, not shared
    try:
        return path, read_frames(path, range).numpy()
    except UNREADABLE:
        return path, None


# ----------------------------------------------------------------------------------------------- sampling and masks
def clip_indices(n, num_frames, sampling_rate, num_clips=1):
    """Pretraining: frame indices in an n-frame video of num_clips random clips of num_frames frames every
    sampling_rate frames, one after the other, the k-th starting in the k-th of num_clips equal parts of the possible
    starts (the official repeated sampling, TSN-style). A video shorter than the clip repeats its last frame;
    sampling_rate 0 repeats one frame (a single-frame baseline: no motion left to see)."""
    starts = max(n - (num_frames - 1) * sampling_rate, 1)  # possible starts: 0 .. starts - 1
    bounds = [k * starts // num_clips for k in range(num_clips + 1)]
    return [min(start + sampling_rate * i, n - 1) for lo, hi in zip(bounds, bounds[1:])
            for start in [int(torch.randint(lo, max(hi, lo + 1), ()))] for i in range(num_frames)]


def finetune_indices(n, num_frames, sampling_rate, sampling="dense"):
    """Fine-tuning: frame indices of one random clip of an n-frame video, the official loaders' formulas (kinetics.py,
    ssv2.py). dense: num_frames frames np.linspace'd over a window of num_frames * sampling_rate frames ending at a
    random frame (16 over 64: offsets 0, 4, 8, 12, 17, ..., 59, 63), or over a shorter video, its last frame repeated.
    segment (SSv2): one random frame in each of num_frames inclusive, overlapping segments."""
    if sampling == "segment":
        d = (n - 1) / num_frames
        return [int(torch.randint(round(d * i), round(d * (i + 1)) + 1, ())) for i in range(num_frames)]
    window = num_frames * sampling_rate
    if n <= window:
        k = n // sampling_rate
        return [min(int(i * (n / max(k - 1, 1))), n - 1) for i in range(k)] + [n - 1] * (num_frames - k)
    start = int(torch.randint(window, n, ())) - window  # sampling_rate 0: any frame, repeated
    return [min(int(start + i * (window / max(num_frames - 1, 1))), start + max(window - 1, 0))
            for i in range(num_frames)]


def view_indices(n, num_frames, sampling_rate, sampling, view, num_views):
    """Testing: frame indices of view `view` of `num_views` of an n-frame video, the official test loaders' formulas.
    dense: num_views evenly spaced windows of num_frames of the frames 0, r, 2r, ... (the last repeated); sampling_rate
    0 (the single-frame baseline): one frame, views evenly spaced. segment (SSv2): the segments cut into num_views
    parts, view k taking the middle of part k of every segment (2 views: the middles of the two halves)."""
    if sampling == "segment":
        d = (n - 1) / num_frames
        part = d / num_views
        return [(round(d * i + part * view) + round(d * i + part * (view + 1))) // 2 for i in range(num_frames)]
    if sampling_rate == 0:
        return [int(view * (n - 1) / max(num_views - 1, 1))] * num_frames
    num_strided = -(-n // sampling_rate)  # frames 0, r, 2r, ... that exist
    start = sampling_rate * int(view * (max(num_strided - num_frames, 0) / max(num_views - 1, 1)))
    return [min(start + sampling_rate * i, n - 1) for i in range(num_frames)]


def tube_mask(grid, mask_ratio, generator=None):
    """bool (t*h*w,), True = masked: one random spatial mask of int(ratio*h*w) cells, the same at every time step."""
    t, h, w = grid
    spatial = torch.zeros(h * w, dtype=torch.bool)
    spatial[torch.randperm(h * w, generator=generator)[:int(mask_ratio * h * w)]] = True
    return spatial.repeat(t)  # t-major flattening: the spatial pattern once per time step


def mask_grid(grid, mask_type):
    """The grid tube_mask draws on: "tube" the clip's (t, h, w); "random" (official VideoMAE's other choice) one cell
    per tube, (1, 1, t*h*w), so that int(ratio * t*h*w) tubes are hidden anywhere in space and time."""
    assert mask_type in ("tube", "random"), mask_type
    return grid if mask_type == "tube" else (1, 1, math.prod(grid))


def random_mask(num_patches, mask_ratio, generator=None):
    """bool (num_patches,), True = masked: keep int(num_patches * (1 - ratio)) random patches, as MAE."""
    mask = torch.ones(num_patches, dtype=torch.bool)
    mask[torch.randperm(num_patches, generator=generator)[:int(num_patches * (1 - mask_ratio))]] = False
    return mask


# ---------------------------------------------------------------------------------------------------- transforms
def normalize(x, channel_dim=1):
    """uint8 -> float (x / 255 - mean) / std along `channel_dim`, on x's device, in place: pretraining batches travel
    from the loader's workers as uint8 (B, 3, [T,] H, W), a quarter of the bytes, and are normalized on its device."""
    mean, std = _mean_std_255(x.device, x.ndim - channel_dim % x.ndim - 1)
    return x.float().sub_(mean).div_(std)


@functools.cache
def _mean_std_255(device, trailing):  # once per device and layout: a new GPU tensor would wait for a copy every step
    return tuple(255 * torch.tensor(v, device=device).view(3, *[1] * trailing) for v in (IMAGENET_MEAN, IMAGENET_STD))


def multi_scale_crop_box(height, width, size, scales=(1, 0.875, 0.75, 0.66)):
    """(top, left, crop_h, crop_w) as the official GroupMultiScaleCrop (VideoMAE/MVD pretraining, fix_crop): crop sides
    are fractions of the short side (snapped to `size` when within 2 px), height and width at most one scale step
    apart; the offset is one of 13 fixed points (corners, centre, edge centres, quarter points)."""
    sides = [int(min(height, width) * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    crop_h, crop_w = pairs[int(torch.randint(len(pairs), ()))]
    points = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
    row, col = points[int(torch.randint(len(points), ()))]  # in quarters of the free space
    return row * ((height - crop_h) // 4), col * ((width - crop_w) // 4), crop_h, crop_w


def _warp(x, a, b, c, d, e, f):
    """PIL's affine transform as timm calls it: output pixel centre (x, y) takes the input at (a x + b y + c,
    d x + e y + f); bicubic (torchvision's tensor affine has no bicubic), grey (128) where that is outside the frame."""
    H, W = x.shape[-2:]
    y0, x0 = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    u, v = a * x0 + b * y0 + c, d * x0 + e * y0 + f
    grid = torch.stack([2 * u / W - 1, 2 * v / H - 1], -1).expand(len(x), H, W, 2)
    out = F.grid_sample(x.float(), grid, "bicubic", "border", align_corners=False).round().clamp(0, 255).byte()
    return torch.where((u < 0) | (u >= W) | (v < 0) | (v >= H), 128, out)


def _rotate(x, degrees):  # PIL's Image.rotate: counter-clockwise about the centre
    a = math.radians(degrees)
    cos, sin, cx, cy = math.cos(a), math.sin(a), x.shape[-1] / 2, x.shape[-2] / 2
    return _warp(x, cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def _signed(v):  # timm's _randomly_negate
    return -v if torch.rand(()) < 0.5 else v


def _enhance(m):  # timm's _enhance_increasing_level_to_arg: 1 +- 0.9 at m = 10
    return 1.0 + _signed(m / 10 * 0.9)


# timm's "increasing" RandAugment op set (the official "inc1"), name -> (op on uint8 frames (T, 3, H, W), its
# argument at magnitude m on timm's 0-10 scale, by timm's level formula)
RAND_AUGMENT_OPS = {
    "AutoContrast": (lambda x, _: v2.functional.autocontrast(x), lambda m: None),
    "Equalize": (lambda x, _: v2.functional.equalize(x), lambda m: None),
    "Invert": (lambda x, _: v2.functional.invert(x), lambda m: None),
    "Rotate": (_rotate, lambda m: _signed(m / 10 * 30)),
    "PosterizeIncreasing": (v2.functional.posterize, lambda m: 4 - int(m / 10 * 4)),  # bits kept
    "SolarizeIncreasing": (lambda x, t: torch.where(x >= t, 255 - x, x), lambda m: 256 - int(m / 10 * 256)),
    "SolarizeAdd": (lambda x, n: torch.where(x < 128, (x.int() + n).clamp(max=255).byte(), x),
                    lambda m: int(m / 10 * 110)),
    "ColorIncreasing": (v2.functional.adjust_saturation, _enhance),
    "ContrastIncreasing": (v2.functional.adjust_contrast, _enhance),
    "BrightnessIncreasing": (v2.functional.adjust_brightness, _enhance),
    "SharpnessIncreasing": (v2.functional.adjust_sharpness, _enhance),
    "ShearX": (lambda x, s: _warp(x, 1, s, 0, 0, 1, 0), lambda m: _signed(m / 10 * 0.3)),
    "ShearY": (lambda x, s: _warp(x, 1, 0, 0, s, 1, 0), lambda m: _signed(m / 10 * 0.3)),
    "TranslateXRel": (lambda x, t: _warp(x, 1, 0, t * x.shape[-1], 0, 1, 0), lambda m: _signed(m / 10 * 0.45)),
    "TranslateYRel": (lambda x, t: _warp(x, 1, 0, 0, 0, 1, t * x.shape[-2]), lambda m: _signed(m / 10 * 0.45)),
}


class RandAugment:
    """timm's RandAugment as the official "rand-mM-nN-mstdS-inc1": N ops drawn with replacement from RAND_AUGMENT_OPS,
    each applied with probability 1/2 at a magnitude drawn from N(M, S) clipped to 0-10; one draw for all frames."""

    def __init__(self, num_ops=4, magnitude=7, std=0.5):
        self.num_ops, self.magnitude, self.std = num_ops, magnitude, std

    def __call__(self, frames):  # uint8 (T, 3, H, W) -> the same, a tv_tensors.Video stays one
        x, ops = frames.as_subclass(torch.Tensor), list(RAND_AUGMENT_OPS.values())
        for op, level in [ops[i] for i in torch.randint(len(ops), (self.num_ops,)).tolist()]:
            if torch.rand(()) < 0.5:
                x = op(x, level(min(10.0, max(0.0, self.magnitude + self.std * float(torch.randn(()))))))
        return tv_tensors.wrap(x, like=frames) if isinstance(frames, tv_tensors.Video) else x


class EraseClip(v2.RandomErasing):
    """The official (timm's) erasing of a clip: one box for all frames, fresh normal noise in each frame."""

    def transform(self, inpt, params):
        if params["v"] is not None:
            params = dict(params, v=torch.randn(*inpt.shape[:-2], params["h"], params["w"]))
        return super().transform(inpt, params)


def finetune_augmentation(input_size, flip=True, rand_augment=(4, 7, 0.5), erase_prob=0.25, crop_scale=0.08):
    """The official fine-tuning recipe on a tv_tensors.Video uint8 (T, 3, H, W), one random draw for all frames:
    RandAugment(num_ops, magnitude, std), a random-resized crop without antialiasing (the official interpolates
    bilinearly), flip, erasing; rand_augment=None and erase_prob=0 leave MAE's linear-probing crop and flip. crop_scale:
    the crop's smallest area fraction (official 0.08; larger keeps tiny frames recognisable)."""
    return v2.Compose([
        *([RandAugment(*rand_augment)] if rand_augment else []),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomResizedCrop(input_size, scale=(crop_scale, 1.0), ratio=(3 / 4, 4 / 3), antialias=False),
        *([v2.RandomHorizontalFlip(p=0.5)] if flip else []),  # off for SSv2: left and right are in its labels
        *([EraseClip(p=erase_prob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3))] if erase_prob else []),
    ])


# ---------------------------------------------------------------------------------------------------- datasets
class TooManyBadVideos(RuntimeError):
    """Raised past --max_bad_videos. One string argument, so the DataLoader can re-raise it from a worker."""


class SeededDataset(Dataset):
    """Items indexed by (index, epoch), each computed in a forked RNG seeded by (seed, epoch, index) alone (the caller's
    RNG untouched, nothing from the worker or rank). An unreadable file is printed once, appended to
    output_dir/bad_videos.txt (the count the workers share) and replaced by another draw; past max_bad_videos, stop."""

    def __init__(self, items, seed, output_dir, max_bad_videos, cache_videos=False):
        if not items:
            raise ValueError("no readable files listed")
        self.items, self.seed, self.bad = items, seed, set()
        self.max_bad = max(10, len(items) // 100) if max_bad_videos is None else max_bad_videos
        self.bad_file = os.path.join(output_dir, "bad_videos.txt") if output_dir else None
        # the benchmark swaps in read_frames(..., decode_all=True); cache_videos decodes every file once, up front
        self.reader = CachedReader([p for p, _ in items], min(4, os.cpu_count())) if cache_videos else read_frames

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        with torch.random.fork_rng(devices=[]):  # CPU only: manual_seed's GPU seeding formats a stack trace (slow)
            torch.default_generator.manual_seed(
                int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0]))
            return self.get(index)

    def read_good(self, index, read):
        """(index, read(path)) for the first readable file, drawing replacements from the sample's RNG."""
        while True:
            path = self.items[index][0]
            if path not in self.bad:
                try:
                    return index, read(path)
                except UNREADABLE as error:
                    self.skip_bad(path, error)
            index = int(torch.randint(len(self.items), ()))

    def skip_bad(self, path, error):
        known = set(self.bad)
        if self.bad_file and os.path.exists(self.bad_file):
            with open(self.bad_file) as f:
                known |= set(f.read().split("\n")) - {""}
        if path not in known:
            print(f"skipping unreadable file {path} ({type(error).__name__}: {str(error)[:200]!r})", flush=True)
            if self.bad_file:
                os.makedirs(os.path.dirname(self.bad_file), exist_ok=True)
                with open(self.bad_file, "a") as f:
                    f.write(path + "\n")
        self.bad.add(path)
        known.add(path)
        if len(known) > self.max_bad or len(known) == len(self.items):
            raise TooManyBadVideos(
                f"{len(known)} of {len(self.items)} files are unreadable (limit: --max_bad_videos {self.max_bad})"
                f"{f', listed in {self.bad_file}' if self.bad_file else ''}: {', '.join(sorted(known)[:5])}"
                f"{', ...' if len(known) > 5 else ''}; re-encode them, drop them from the list, or raise the limit")


class VideoDataset(SeededDataset):
    """Clips of the videos of a list file, for pretraining, fine-tuning ("train") or multi-view testing ("test")."""

    def __init__(self, list_path, data_root="", mode="pretrain", num_frames=16, sampling_rate=4, sampling="dense",
                 input_size=224, teacher_input_size=None, mask_ratio=0.9, mask_type="tube", tubelet_size=2,
                 patch_size=16, num_sample=1, flip=True, rand_augment=(4, 7, 0.5), erase_prob=0.25, crop_scale=0.08,
                 test_num_segment=5, test_num_crop=3, short_side_size=224, seed=0, output_dir=None,
                 max_bad_videos=None, cache_videos=False):
        assert mode in ("pretrain", "train", "test") and sampling in ("dense", "segment")
        super().__init__(load_video_list(list_path, data_root), seed, output_dir, max_bad_videos, cache_videos)
        self.mode, self.num_frames, self.sampling_rate, self.sampling = mode, num_frames, sampling_rate, sampling
        self.input_size, self.short_side_size, self.mask_ratio = input_size, short_side_size, mask_ratio
        self.num_sample, self.test_num_segment, self.test_num_crop = num_sample, test_num_segment, test_num_crop
        self.teacher_input_size = teacher_input_size if teacher_input_size not in (None, input_size) else None
        self.mask_grid = mask_grid((num_frames // tubelet_size, *[input_size // patch_size] * 2), mask_type)
        self.augment = (finetune_augmentation(input_size, flip, rand_augment, erase_prob, crop_scale)
                        if mode == "train" else None)

    def __len__(self):
        return len(self.items) * (self.test_num_segment * self.test_num_crop if self.mode == "test" else 1)

    def read_clip(self, path, view=None):
        """uint8 (T, 3, H, W): the frames of one clip (random, or temporal view `view` in testing); in pretraining
        (num_clips * T, 3, H, W): num_sample clips at num_sample places of the video, decoded in one pass."""
        frames, rate = self.num_frames, self.sampling_rate
        indices = {"pretrain": lambda n: clip_indices(n, frames, rate, self.num_sample),
                   "train": lambda n: finetune_indices(n, frames, rate, self.sampling),
                   "test": lambda n: view_indices(n, frames, rate, self.sampling, view, self.test_num_segment)}
        return self.reader(path, indices[self.mode]).permute(0, 3, 1, 2)

    def get(self, index):
        """A sample, or a list of num_sample samples of one video (make_loader's batches hold every one of them)."""
        if self.mode == "test":
            return self.get_view(index)
        index, frames = self.read_good(index, self.read_clip)
        if self.mode == "train":  # num_sample augmented copies of one decoded clip (repeated augmentation)
            samples = [{"video": self.augment(tv_tensors.Video(frames)).transpose(0, 1).as_subclass(torch.Tensor),
                        "label": self.items[index][1], "index": index} for _ in range(self.num_sample)]
        else:  # pretraining: each clip its own crop and mask, uint8 until the training device normalizes it
            samples = [self.crop_and_mask(clip, index) for clip in frames.split(self.num_frames)]
        return samples if len(samples) > 1 else samples[0]

    def crop_and_mask(self, frames, index):
        """Pretraining: uint8 (T, 3, H, W) -> {"video": uint8 (3, T, S, S), "mask": bool (N,), "index"}, the official
        multi-scale crop (and the same region at the teachers' size, if it differs) and a tube mask."""
        top, left, height, width = multi_scale_crop_box(*frames.shape[-2:], self.input_size)
        crop = functools.partial(v2.functional.resized_crop, frames, top, left, height, width, antialias=True)
        sample = {"video": crop([self.input_size] * 2).transpose(0, 1),  # (3, T, S, S)
                  "mask": tube_mask(self.mask_grid, self.mask_ratio), "index": index}
        if self.teacher_input_size:  # the same region for a teacher with another input size
            sample["teacher_video"] = crop([self.teacher_input_size] * 2).transpose(0, 1)
        return sample

    def get_view(self, index):
        """Test view: clip `index // crops % segments`, short side resized, crop `index % crops` along the long side."""
        video, view = divmod(index, self.test_num_segment * self.test_num_crop)
        path, label = self.items[video]
        sample = {"label": label, "index": video, "view": view, "ok": True}
        try:
            frames = self.read_clip(path, view // self.test_num_crop)
        except UNREADABLE as error:
            self.skip_bad(path, error)
            return {**sample, "video": torch.zeros(3, self.num_frames, self.input_size, self.input_size), "ok": False}
        s, crops = self.short_side_size, self.test_num_crop
        frames = v2.functional.resize(frames, [s], antialias=False)  # short side to s, as the official (cv2)
        height, width = frames.shape[-2:]
        free = max(height, width) - s  # the crops spread along the long side
        start = int(view % crops * (free / (crops - 1))) if crops > 1 else free // 2
        frames = frames[..., start:start + s, :] if height > width else frames[..., start:start + s]
        if s != self.input_size:  # the official code assumes short_side_size == input_size
            frames = v2.functional.resize(frames, [self.input_size] * 2, antialias=False)
        return {"video": normalize(frames).transpose(0, 1), **sample}


class ImageDataset(SeededDataset):
    """Image-MAE data: an ImageFolder root, or a video list (a random frame per item); RandomResizedCrop(0.2-1,
    bicubic) + flip as MAE; item {"image": uint8 (3, S, S), "mask": bool (L,), "index"}, normalized on the training
    device. num_sample > 1: a list of that many, frames from as many equal parts of a video (or crops of an image)."""

    def __init__(self, data_path, data_root="", input_size=224, patch_size=16, mask_ratio=0.75, num_sample=1, seed=0,
                 output_dir=None, max_bad_videos=None, cache_videos=False):
        folder = torchvision.datasets.ImageFolder(data_path) if os.path.isdir(data_path) else None
        if folder:  # as a video list is (load_video_list): paths relative to the folder, which nodes may mount apart
            agree_on_files(f"the image folder {data_path}", [(os.path.relpath(path, data_path), label)
                                                             for path, label in folder.samples],
                           "give every node the same images")
        super().__init__(load_video_list(data_path, data_root) if folder is None else folder.samples, seed,
                         output_dir, max_bad_videos, cache_videos and folder is None)
        self.load_image = None if folder is None else folder.loader  # PIL, as MAE
        self.num_patches, self.mask_ratio, self.num_sample = (input_size // patch_size) ** 2, mask_ratio, num_sample
        self.augment = v2.Compose([v2.RandomResizedCrop(input_size, scale=(0.2, 1.0), antialias=True,
                                                        interpolation=v2.InterpolationMode.BICUBIC),
                                   v2.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.items)

    def read_images(self, path):
        """uint8 (num_sample, 3, H, W)."""
        if self.load_image:
            return v2.functional.pil_to_tensor(self.load_image(path)).expand(self.num_sample, -1, -1, -1)
        return self.reader(path, lambda n: clip_indices(n, 1, 1, self.num_sample)).permute(0, 3, 1, 2)

    def get(self, index):
        index, images = self.read_good(index, self.read_images)
        samples = [{"image": self.augment(tv_tensors.Image(image)).as_subclass(torch.Tensor),  # uint8 (3, S, S)
                    "mask": random_mask(self.num_patches, self.mask_ratio), "index": index} for image in images]
        return samples if len(samples) > 1 else samples[0]


# ------------------------------------------------------------------------------------------- loaders and mixing
class EpochSampler(DistributedSampler):
    """DistributedSampler yielding (index, epoch), so that a sample's augmentation can depend on the epoch.
    set_epoch(epoch, skip) leaves out this rank's first `skip` indices, so that a run resumed mid-epoch never reads
    them (the DataLoader iterates the sampler in the main process, even with persistent workers: from the next iter)."""
    skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return ((index, self.epoch) for index in itertools.islice(super().__iter__(), self.skip, None))


def make_loader(dataset, batch_size, *, seed=0, rank=0, world_size=1, shuffle=True, drop_last=True, num_workers=2,
                device_type="cpu"):
    """Batches of `dataset` for one rank: batch_size items, each a sample or a list of one video's samples, all of them
    in the batch (the official collate of repeated samples). Without drop_last, DistributedSampler pads the ranks to
    equal length with repeated items: evaluation counts each (index, view) once. Every epoch: set_epoch(epoch)."""
    sampler = EpochSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    # The generator only seeds the workers' base seed; without it the DataLoader would draw from the global RNG.
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=device_type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate_samples)


def collate_samples(items):
    return default_collate([s for item in items for s in (item if isinstance(item, list) else [item])])


def mixup_cutmix(num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1):
    """timm's Mixup as the official code uses it: per batch, mixup or cutmix with probability 1/2 each, one lam ~
    Beta(alpha, alpha), each clip mixed with the batch reversed (torchvision's roll by one would mix every second clip
    with the other view of its own video at --num_sample 2), soft targets with label smoothing. Uses the global RNG
    (train_one_epoch seeds it per step). CutMix: timm's box, lam corrected by its clipped area, one H x W box in every
    frame. The official's box, drawn for (H, W) of (B, C, T, H, W) clips, cuts frames and rows: in most of its draws no
    pixel moves, yet the labels mix (docs/details.md)."""
    def apply(video, labels):
        """video (B, 3, T, H, W), labels (B,) -> video, soft targets (B, num_classes)."""
        targets = F.one_hot(labels, num_classes).float()
        if mixup_alpha > 0 or cutmix_alpha > 0:
            cut = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()).item() < 0.5)
            alpha = cutmix_alpha if cut else mixup_alpha
            lam = torch.distributions.Beta(alpha, alpha).sample().item()
            if cut:  # a box of area ~(1 - lam) around a random centre, clipped to the frame
                H, W = video.shape[-2:]
                h, w = int(H * math.sqrt(1 - lam)) // 2, int(W * math.sqrt(1 - lam)) // 2
                y, x = torch.randint(H, ()).item(), torch.randint(W, ()).item()
                top, bottom, left, right = max(y - h, 0), min(y + h, H), max(x - w, 0), min(x + w, W)
                video = video.clone()
                video[..., top:bottom, left:right] = video.flip(0)[..., top:bottom, left:right]
                lam = 1 - (bottom - top) * (right - left) / (H * W)
            else:
                video = lam * video + (1 - lam) * video.flip(0)
            targets = lam * targets + (1 - lam) * targets.flip(0)
        # smoothing commutes with mixing: (1 - e) * mixed one-hot + e / K is what timm computes
        return video, targets * (1 - label_smoothing) + label_smoothing / num_classes
    return apply


# ----------------------------------------------------------------------------------------------- synthetic set
MOTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # motion label = position here


def render_video(rng, height, width, num_frames, appearance, motion, background_step=(0, 0), noise=0.0):
    """uint8 (T, H, W, 3): an object textured by `appearance` (0-3: horizontal, vertical or diagonal stripes, checker)
    moving by `motion` (0-3, MOTIONS) over a smooth background. Everything lives on a torus: the object starts at a
    uniformly random position and wraps around at one speed, so any single frame has the same distribution whatever
    the motion; only frame-to-frame change reveals it. The object (a third of the frame, stripes a tenth) stands out
    from a dim, low-contrast background, lighter or darker at random: where stripes dominate the pixels, masked
    reconstruction learns the clip's mean colour rather than the motion (what earlier sets did: docs/details.md)."""
    scale = min(height, width) / 64
    y, x = np.mgrid[:height, :width] - np.array([height // 2, width // 2])[:, None, None]
    # background: smooth noise (random low-res field, bicubic upsampled) blending two colours 40 apart
    field = F.interpolate(torch.from_numpy(rng.random((1, 1, height // 8 + 2, width // 8 + 2))),
                          size=(height, width), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1).numpy()
    dark_object = rng.random() < 0.5
    low, high = (rng.integers(166, 216, 3) if dark_object else rng.integers(40, 90, 3)) + np.array([[-20], [20]])
    background = field[..., None] * low + (1 - field[..., None]) * high
    # object: disk or square of equal area (drawn at random: a nuisance, not a label), striped or checkered with a
    # random period and phase, its two colours 100 apart around a base far from the background's
    radius = min(height, width) * rng.uniform(0.28, 0.36)
    inside = (x ** 2 + y ** 2 <= radius ** 2) if rng.random() < 0.5 else (np.maximum(abs(x), abs(y)) <= 0.886 * radius)
    period, phase = max(3, round(rng.integers(6, 9) * scale)), rng.integers(0, 9)
    bits = [(y + phase) // period, (x + phase) // period, (x + y + phase) // period,
            (y + phase) // period + (x + phase) // period][appearance]
    colours = (rng.integers(25, 85, 3) if dark_object else rng.integers(170, 230, 3)) + np.array([[-50], [50]])
    pattern = np.where((bits % 2 == 0)[..., None], *colours)
    start = rng.integers(0, [height, width])
    step, speed = np.array(list(MOTIONS.values())[motion]), max(1, round(min(height, width) / 32))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        shift = start + t * speed * step
        frame = np.where(np.roll(inside, shift, (0, 1))[..., None], np.roll(pattern, shift, (0, 1)),
                         np.roll(background, t * np.array(background_step), (0, 1)))
        frames[t] = (frame + rng.normal(0, noise, frame.shape) if noise else frame).clip(0, 255)
    return frames


def make_synthetic_set(root, num_videos=400, num_frames=48, size=64, fps=24, seed=0, val_fraction=0.25):
    """Write H.264 videos under root/videos and the lists root/all.csv, root/{appearance,motion}/{train,val}.csv
    (paths relative to root: use data_root=root). Reuses a complete set made with the same parameters."""
    params = dict(version=3, num_videos=num_videos, num_frames=num_frames, size=size, fps=fps, seed=seed,
                  val_fraction=val_fraction)
    paths = {"root": root, "all": os.path.join(root, "all.csv"),
             **{f"{task}_{split}": os.path.join(root, task, f"{split}.csv")
                for task in ("appearance", "motion") for split in ("train", "val")}}
    marker = os.path.join(root, "synthetic.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return paths
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (num_videos, 2))  # (appearance, motion), drawn independently
    is_val = np.isin(np.arange(num_videos), rng.permutation(num_videos)[:round(val_fraction * num_videos)])
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    names = [f"videos/{i:04d}.mp4" for i in range(num_videos)]
    for i, name in enumerate(names):  # one encoder thread: the same bytes from the same seed
        frames = render_video(np.random.default_rng([seed, i]), size, size, num_frames, *labels[i])
        write_video(os.path.join(root, name), frames, fps, options={"crf": "18", "preset": "veryfast", "threads": "1"})
    _write_atomically(paths["all"], "".join(f"{name} 0\n" for name in names))  # pretraining ignores the label
    for column, task in enumerate(("appearance", "motion")):
        os.makedirs(os.path.join(root, task), exist_ok=True)
        for split, in_split in (("train", ~is_val), ("val", is_val)):
            _write_atomically(paths[f"{task}_{split}"],
                              "".join(f"{names[i]} {labels[i, column]}\n" for i in np.flatnonzero(in_split)))
    _write_atomically(marker, json.dumps(params))  # written last: its presence means the set is complete
    return paths


def use_synthetic_set(args, list_name):
    """A stage without --data_path: the demo runs on the synthetic set (made once in --synthetic_root), and says so."""
    print(f"no --data_path: demo run on the synthetic set ({list_name}) in {args.synthetic_root} ({args.epochs} "
          f"epochs, {args.num_frames}x{args.input_size}px); give --data_path for real training")
    make_synthetic_set(args.synthetic_root)
    args.data_path, args.data_root = os.path.join(args.synthetic_root, list_name), args.synthetic_root


# ---------------------------------------------------------------------------------------- writing files safely
_HELD = {}  # hold_folder's lock files -> their open handles, kept for the life of the process


def _write_atomically(path, text):
    """Write a small file whole or not at all: a temporary name unique to this process, synced, then renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def hold_folder(folder, flag="--output_dir"):
    """One run at a time writes `folder`: a POSIX record lock on folder/.lock, taken without waiting (again in this
    process: already held). The OS drops it when the process dies, however it dies (never a stale lock), and forked
    workers do not inherit it (unlike flock), so a killed run's orphaned workers never keep a rerun out."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder} is a file, not a folder: give a folder")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.path.realpath(folder), ".lock")
    if path in _HELD:
        return
    handle = open(path, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{folder} is being written by another run ({holder}): wait for it to end, or give "
                         f"another {flag}") from None
    handle.truncate(0)
    print(f"pid {os.getpid()}: {' '.join(sys.argv)}", file=handle, flush=True)
    _HELD[path] = handle


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Writes the synthetic set, the stages' demo data. Preparing a data "
                                     "set and the loader's benchmark: tools/prepare.py, tools/bench_loader.py.")
    parser.add_argument("--synthetic", metavar="ROOT", required=True, help="write the synthetic set to ROOT")
    parser.add_argument("--synthetic_seed", type=int, default=0, help="seed of the synthetic set's videos and split")
    parser.add_argument("--synthetic_videos", type=int, default=400, help="how many videos the synthetic set has")
    parser.add_argument("--synthetic_val", type=float, default=0.25, help="fraction of them held out in val.csv")
    args = parser.parse_args()
    print(json.dumps(make_synthetic_set(args.synthetic, args.synthetic_videos, seed=args.synthetic_seed,
                                        val_fraction=args.synthetic_val)))
