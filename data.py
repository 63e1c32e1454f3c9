"""From video files to batches: PyAV decoding, frame sampling, augmentation, masks, loaders, a synthetic set, and
preparing a data set for training (--prepare).

Conventions (see SPEC.md):
  a clip is float (3, T, H, W), normalized with the ImageNet mean and std; a batch adds B in front. Pretraining
  samples hand it over as uint8 (3, T, H, W), and the stage normalizes the batch on its device (normalize());
  a mask is bool (N,) per sample, True = masked (hidden from the student), tokens flattened t-major, then row, column;
  frames straight from a file are uint8 (T, H, W, 3) RGB.

Every random choice of a sample (clip start, crop, RandAugment draw, mask, replacement of a bad file) comes from an
RNG seeded by (seed, epoch, index) alone, so a run resumes exactly and 2 ranks x batch b see exactly the
samples of 1 rank x batch 2b. The official code draws them from each worker's global RNG instead.
"""
import argparse
import contextlib
import fcntl
import fractions
import functools
import itertools
import json
import math
import os
import sys
import tempfile
import time

import av
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a missing, truncated, empty or non-video file raises while it is read (PIL raises OSError for images).
UNREADABLE = (av.error.FFmpegError, OSError, ValueError)


# ----------------------------------------------------------------------------------------------- reading and writing
def read_frames(path, indices, decode_all=False):
    """uint8 (len(indices), H, W, 3): the frames at 0-based `indices` in display order (repeats allowed; an index
    past the end gives the last frame).

    Decodes only what the clip needs (see _decode) and gives exactly what a full decode gives at those positions.
    `indices` may also be a function of the video's frame count returning them (one file open instead of two).
    `decode_all=True` is the slow reference (decode and convert everything, then index), for tests and the benchmark.
    """
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
    """The file opened for reading frames. FFmpeg's probe decodes a new file's first frames only to report their pixel
    format, which the decoder finds in the frames anyway: skipped (most of an open's time; the decoder itself is opened
    afterwards, without this option)."""
    return av.open(str(path), options={"skip_frame": "nonkey"})


def _video_stream(container, path):
    if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
    stream = container.streams.video[0]
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
    rate, time_base = stream.average_rate, stream.time_base
    if by_pts and not (rate and time_base):
        return None
    ticks_per_frame = 1 / float(rate * time_base) if by_pts else None
    # pts of frame 0 = the first frame a full decode gives; stream.start_time can be a frame off (AVI with B-frames).
    # Read off the first packets when they show it plainly (the stream opens on a keyframe shown before the next 15
    # packets), which decodes nothing; otherwise decode up to the first frame.
    origin = None
    if by_pts and first > 0:
        head = list(itertools.islice(container.demux(stream), 16))
        timed = [packet.pts for packet in head if packet.pts is not None]
        if head and head[0].is_keyframe and head[0].pts is not None and head[0].pts == min(timed):
            origin = head[0].pts
        else:
            origin = next((frame.pts for packet in itertools.chain(head, container.demux(stream))
                           for frame in packet.decode()), None)
        if origin is None:
            return None
        # A backward seek lands on the last keyframe at or before the target. Aim a few frames early: some
        # containers (AVI) index a keyframe at its decoding time, up to (B-frames + 1) frames before it is shown.
        container.seek(origin + int(max(first - 4, 0) * ticks_per_frame), stream=stream)
    out, previous, index, skipped, held, fed = {}, None, -1, set(), [], set()
    # One converter for the clip: frame.to_ndarray(format="rgb24") builds a new swscale context for every frame (5-10x
    # the decoding itself). On one thread: PyAV 17+ converts on every core, slower for frames this small, and a loader
    # worker per core must not start a thread per core.
    rgb = functools.partial(av.video.reformatter.VideoReformatter().reformat, format="rgb24", threads=1)
    for packet in container.demux(stream):
        n = None if origin is None or packet.pts is None else round((packet.pts - origin) / ticks_per_frame)
        needed = n is None or n in wanted
        skipped.update([] if needed else [n])
        if not needed and n < last:
            # A frame nobody needs before the last needed one is held back, undecoded, until a needed one may refer
            # to it. At a keyframe after every needed frame before it, decoding can start afresh: what is held is
            # dropped. So clips far apart in one video cost two short decodes, not the reference frames between.
            if packet.is_keyframe and all(w in fed for w in wanted if w < n):
                held = []
            held.append(packet)
            continue
        fed.add(n)
        for p in held + [packet]:
            # decided per packet, before the decoder's threads see it: frames no other frame refers to are skipped
            stream.codec_context.skip_frame = "DEFAULT" if p is packet and needed else "NONREF"
            for frame in p.decode():
                if by_pts:
                    if frame.pts is None:
                        return None
                    origin = frame.pts if origin is None else origin
                    i = round((frame.pts - origin) / ticks_per_frame)
                    # Gaps are expected before the first needed frame (the seek); from there on the only frames
                    # missing may be those skipped on purpose, or timestamps do not count frames (variable rate).
                    if i <= index or any(j not in skipped for j in range(max(index + 1, first), i)):
                        return None
                    index = i
                else:
                    index += 1
                if index in wanted or convert_all:
                    out[index] = rgb(frame).to_ndarray()
                if index >= last and not convert_all:
                    return out
                previous = frame
        held = []
    if previous is None:
        if by_pts:
            return None
        raise ValueError("no frames decoded")
    if by_pts and (index < first or max(skipped, default=-1) > index):  # the video ended among skipped frames:
        return None  # its last frame may be one of them
    tail = out[index] if index in out else rgb(previous).to_ndarray()
    return {i: out.get(i, tail) for i in wanted}  # indices past the end get the last frame


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
    """Write frames with PyAV as yuv420p, frame i at i / fps: uint8 (H, W, 3) RGB arrays or av.VideoFrames, all of
    one size (a decoded frame's display rotation is kept); `options` go to the encoder (e.g. {"crf": "18", "g": "12"}).
    -> the number of frames written."""
    count = 0
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if not isinstance(frame, av.VideoFrame):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            if not count:  # the size of the first frame, and the rotation a player applies (phone footage)
                stream.width, stream.height = frame.width, frame.height
                if frame.rotation:
                    stream.set_display_rotation(frame.rotation)
            frame.pts, frame.time_base = count, 1 / fractions.Fraction(fps)
            frame.pict_type = av.video.frame.PictureType.NONE  # the encoder chooses (x264 keeps a decoded frame's)
            container.mux(stream.encode(frame))
            count += 1
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return count


def read_list(list_path):
    """[(path as written, label)] from lines `path label` (space or comma)."""
    if not os.path.isfile(list_path):
        raise ValueError(f"video list {list_path} does not exist: check --data_path")
    videos = []
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{list_path} is not UTF-8 text ({e.reason} at byte {e.start}): give a video list") from None
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.strip().split("," if "," in line else None)
        if len(fields) != 2 or not fields[1].strip().isdigit():  # a label is 0 or more
            raise ValueError(f"{list_path}:{line_number}: expected 'path label' with a label 0 or more, got "
                             f"{line.strip()!r}")
        videos.append((fields[0].strip(), int(fields[1])))
    return videos


def load_video_list(list_path, data_root=""):
    """[(absolute path, label)] of a list (read_list); files listed but missing are skipped."""
    if data_root and not os.path.isdir(data_root):
        raise ValueError(f"--data_root {data_root} does not exist: give the folder the paths of {list_path} are "
                         "relative to")
    videos = [(os.path.abspath(os.path.join(data_root, path)), label) for path, label in read_list(list_path)]
    missing = dict.fromkeys(path for path, _ in videos if not os.path.exists(path))  # a set in list order
    if missing:
        print(f"warning: {len(missing)} of {len(videos)} files in {list_path} do not exist and are skipped, "
              f"e.g. {', '.join(list(missing)[:3])}", flush=True)
    return [(path, label) for path, label in videos if path not in missing]


class CachedReader:
    """read_frames, but each video decoded once, whole, and kept as uint8 (T, H, W, 3): for small sets of small videos
    whose decoding would set the pace of a tiny model. `paths` are decoded up front by `num_workers` processes, before
    the DataLoader's workers fork and share them; a file that fails is left out and read (and skipped) as usual."""

    def __init__(self, paths=(), num_workers=0):
        whole = in_parallel(_whole_video, sorted(set(paths)), num_workers)
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


def in_parallel(fn, items, num_workers):
    """fn(item) for every item, in order, computed by num_workers processes (DataLoader workers; 0: here). Without
    batching (batch_size=None) a DataLoader applies its collate_fn to each item of the list, in the worker."""
    return DataLoader(items, batch_size=None, num_workers=num_workers, collate_fn=fn)


# ----------------------------------------------------------------------------------------------- sampling and masks
def clip_indices(num_video_frames, num_frames, sampling_rate, sampling="dense", view=None, num_views=1, num_clips=1):
    """Frame indices of one clip. view=None: random (training); else view `view` of `num_views` (testing).

    dense: num_frames frames every sampling_rate frames; random start, or starts evenly spaced over the video
      (the official test loader takes every sampling_rate-th frame and spaces num_views windows over them).
      num_clips > 1 (training): that many clips one after the other in the list, the k-th starting in the k-th of
      num_clips equal parts of the possible starts (the official repeated sampling, TSN-style).
    segment (official SSv2): num_frames equal segments, one frame each, random in training; in testing view k takes
      fraction (1/2 + k/num_views) mod 1 of every segment (centres first; with 2 views the official centres + starts).
    A video shorter than the clip repeats its last frame. sampling_rate 0 repeats one frame: no motion left to see.
    """
    n = num_video_frames
    if sampling == "segment":
        if n < num_frames:
            return [min(i, n - 1) for i in range(num_frames)]
        bounds = [i * n // num_frames for i in range(num_frames + 1)]
        if view is None:
            return [int(torch.randint(lo, hi, ())) for lo, hi in zip(bounds, bounds[1:])]
        offset = (0.5 + view / num_views) % 1
        return [int(n / num_frames * (i + offset)) for i in range(num_frames)]
    if view is None:  # sampling_rate 0 repeats one frame: the single-frame baseline
        starts = max(n - (num_frames - 1) * sampling_rate, 1)  # possible starts: 0 .. starts - 1
        bounds = [k * starts // num_clips for k in range(num_clips + 1)]
        return [min(start + sampling_rate * i, n - 1) for lo, hi in zip(bounds, bounds[1:])
                for start in [int(torch.randint(lo, max(hi, lo + 1), ()))] for i in range(num_frames)]
    if sampling_rate == 0:  # the single-frame baseline's views, evenly spaced over the video
        return [int(view * (n - 1) / max(num_views - 1, 1))] * num_frames
    num_strided = -(-n // sampling_rate)  # frames 0, r, 2r, ... that exist
    start = sampling_rate * int(view * max(num_strided - num_frames, 0) / max(num_views - 1, 1))
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
    """uint8 -> float, ImageNet-normalized along `channel_dim`: (x / 255 - mean) / std, on x's device, in place.
    Pretraining batches come as uint8 (B, 3, [T,] H, W) and are normalized on the training device: on a GPU for free,
    and a quarter of the bytes travel from the loader's workers."""
    shape = (3,) + (1,) * (x.ndim - channel_dim % x.ndim - 1)
    mean, std = (v.view(shape) for v in _mean_std_255(x.device))
    return x.float().sub_(mean).div_(std)


@functools.cache
def _mean_std_255(device):  # made once per device: a new tensor on a GPU would wait for a copy at every step
    return tuple(255 * torch.tensor(v, device=device) for v in (IMAGENET_MEAN, IMAGENET_STD))


def multi_scale_crop_box(height, width, size, scales=(1, 0.875, 0.75, 0.66)):
    """(top, left, crop_h, crop_w) as the official GroupMultiScaleCrop (VideoMAE/MVD pretraining, fix_crop).

    Crop sides are fractions of the short side (snapped to `size` when within 2 px), height and width at most one
    scale step apart; the offset is one of 13 fixed points (corners, centre, edge centres, quarter points).
    """
    sides = [int(min(height, width) * s) for s in scales]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    crop_h, crop_w = pairs[int(torch.randint(len(pairs), ()))]
    points = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
    row, col = points[int(torch.randint(len(points), ()))]  # in quarters of the free space
    return row * ((height - crop_h) // 4), col * ((width - crop_w) // 4), crop_h, crop_w


def finetune_augmentation(input_size, flip=True, rand_augment=(4, 7), erase_prob=0.25, crop_scale=0.08):
    """The official fine-tuning recipe on a tv_tensors.Video uint8 (T, 3, H, W), one random draw for all frames.

    torchvision's RandAugment(num_ops, magnitude) = (4, 7) stands in for timm's "rand-m7-n4-mstd0.5-inc1" (no magnitude
    noise, slightly different op set). Random erasing fills its box with normal noise, the same box and noise in every
    frame. rand_augment=None and erase_prob=0 leave the crop and the flip: MAE's linear-probing augmentation.
    crop_scale is the smallest area fraction of the crop (official 0.08; larger keeps tiny frames recognisable).
    """
    return v2.Compose([
        *([v2.RandAugment(*rand_augment)] if rand_augment else []),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomResizedCrop(input_size, scale=(crop_scale, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        *([v2.RandomHorizontalFlip(p=0.5)] if flip else []),  # off for SSv2: left and right are in its labels
        *([v2.RandomErasing(p=erase_prob, value="random")] if erase_prob else []),
    ])


# ---------------------------------------------------------------------------------------------------- datasets
class TooManyBadVideos(RuntimeError):
    """Raised past --max_bad_videos. One string argument, so the DataLoader can re-raise it from a worker."""


class SeededDataset(Dataset):
    """Base of both datasets: items indexed by (index, epoch), each computed in a forked RNG seeded by (seed, epoch,
    index) only (the caller's RNG untouched, nothing depending on the worker or rank), and unreadable files: each is
    printed once, appended to output_dir/bad_videos.txt (the count the workers share) and replaced by another draw;
    past max_bad_videos, TooManyBadVideos stops the run."""

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
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: torch.manual_seed would also queue a
            # seed for every GPU backend, which formats a stack trace each time (0.2 ms, a quarter of a tiny clip)
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
                 input_size=224, teacher_input_size=None, mask_ratio=0.9, mask_type="tube", tubelet_size=2, patch_size=16,
                 num_sample=1, flip=True, rand_augment=(4, 7), erase_prob=0.25, crop_scale=0.08, test_num_segment=5,
                 test_num_crop=3, short_side_size=224, seed=0, output_dir=None, max_bad_videos=None,
                 cache_videos=False):
        assert mode in ("pretrain", "train", "test") and sampling in ("dense", "segment")
        super().__init__(load_video_list(list_path, data_root), seed, output_dir, max_bad_videos, cache_videos)
        self.mode, self.num_frames, self.sampling_rate, self.sampling = mode, num_frames, sampling_rate, sampling
        self.input_size, self.mask_ratio, self.num_sample = input_size, mask_ratio, num_sample
        self.teacher_input_size = teacher_input_size if teacher_input_size not in (None, input_size) else None
        self.grid = (num_frames // tubelet_size, input_size // patch_size, input_size // patch_size)
        self.mask_grid = mask_grid(self.grid, mask_type)
        self.test_num_segment, self.test_num_crop = test_num_segment, test_num_crop
        self.short_side_size = short_side_size
        self.augment = (finetune_augmentation(input_size, flip, rand_augment, erase_prob, crop_scale)
                        if mode == "train" else None)

    def __len__(self):
        return len(self.items) * (self.test_num_segment * self.test_num_crop if self.mode == "test" else 1)

    def read_clip(self, path, view=None):
        """uint8 (T, 3, H, W): the frames of one clip (random, or temporal view `view` in testing); in pretraining
        (num_clips * T, 3, H, W): num_sample clips at num_sample places of the video, decoded in one pass."""
        num_clips = self.num_sample if self.mode == "pretrain" else 1
        return self.reader(path, lambda n: clip_indices(n, self.num_frames, self.sampling_rate, self.sampling, view,
                                                        self.test_num_segment, num_clips)).permute(0, 3, 1, 2)

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
        s = self.short_side_size
        frames = v2.functional.resize(frames, [s], antialias=True)  # short side to s
        height, width = frames.shape[-2:]
        crops, crop = self.test_num_crop, view % self.test_num_crop  # spread along the long side
        start = int(crop * (max(height, width) - s) / (crops - 1)) if crops > 1 else (max(height, width) - s) // 2
        frames = frames[..., start:start + s, :] if height > width else frames[..., start:start + s]
        if s != self.input_size:  # the official code assumes short_side_size == input_size
            frames = v2.functional.resize(frames, [self.input_size] * 2, antialias=True)
        return {"video": normalize(frames).transpose(0, 1), **sample}


class ImageDataset(SeededDataset):
    """Image-MAE data: an ImageFolder root, or a video list (a random frame per item); RandomResizedCrop(0.2-1,
    bicubic) + flip as MAE; item {"image": uint8 (3, S, S), "mask": bool (L,), "index"}, normalized on the training
    device. num_sample > 1: a list of that many, frames from as many equal parts of a video (or crops of an image)."""

    def __init__(self, data_path, data_root="", input_size=224, patch_size=16, mask_ratio=0.75, num_sample=1, seed=0,
                 output_dir=None, max_bad_videos=None, cache_videos=False):
        self.from_videos = not os.path.isdir(data_path)
        folder = None if self.from_videos else torchvision.datasets.ImageFolder(data_path)
        super().__init__(load_video_list(data_path, data_root) if self.from_videos else folder.samples, seed,
                         output_dir, max_bad_videos, cache_videos and self.from_videos)
        self.load_image = None if self.from_videos else folder.loader  # PIL, as MAE
        self.num_patches, self.mask_ratio, self.num_sample = (input_size // patch_size) ** 2, mask_ratio, num_sample
        self.augment = v2.Compose([
            v2.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def __len__(self):
        return len(self.items)

    def read_images(self, path):
        """uint8 (num_sample, 3, H, W)."""
        if not self.from_videos:
            return v2.functional.pil_to_tensor(self.load_image(path)).expand(self.num_sample, -1, -1, -1)
        return self.reader(path, lambda n: clip_indices(n, 1, 1, num_clips=self.num_sample)).permute(0, 3, 1, 2)

    def get(self, index):
        index, images = self.read_good(index, self.read_images)
        samples = [{"image": self.augment(tv_tensors.Image(image)).as_subclass(torch.Tensor),  # uint8 (3, S, S)
                    "mask": random_mask(self.num_patches, self.mask_ratio), "index": index} for image in images]
        return samples if len(samples) > 1 else samples[0]


# ------------------------------------------------------------------------------------------- loaders and mixing
class EpochSampler(DistributedSampler):
    """DistributedSampler (order from seed + epoch, rank r takes every world_size-th index) yielding (index, epoch),
    so that a sample's augmentation can depend on the epoch. Call set_epoch(epoch) every epoch; set_epoch(epoch, skip)
    leaves out this rank's first `skip` indices, so that a run resumed mid-epoch never reads them (the DataLoader
    iterates the sampler in the main process, also with persistent workers: it takes effect at the next iter())."""
    skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return ((index, self.epoch) for index in itertools.islice(super().__iter__(), self.skip, None))


def make_loader(dataset, batch_size, *, seed=0, rank=0, world_size=1, shuffle=True, drop_last=True, num_workers=2,
                device_type="cpu"):
    """Batches of `dataset` for one rank: batch_size items, each a sample or a list of samples of one video (every
    one goes into the batch, video by video, as the official collate of repeated samples). Without drop_last,
    DistributedSampler pads the ranks to equal length by repeating a few items: evaluation should count each
    (index, view) once. Call loader.sampler.set_epoch(epoch)."""
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                           drop_last=drop_last)
    # The generator only seeds the workers' base seed; without it the DataLoader would draw from the global RNG.
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=device_type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate_samples)


def collate_samples(items):
    return default_collate([s for item in items for s in (item if isinstance(item, list) else [item])])


def mixup_cutmix(num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1):
    """timm's Mixup as the official code uses it: per batch, mixup or cutmix with probability 1/2 each, one lam ~
    Beta(alpha, alpha), each clip mixed with the batch reversed (torchvision's roll by one would mix every second clip
    with the other view of its own video at --num_sample 2), soft targets with label smoothing. CutMix: timm's box, lam
    corrected by its clipped area, the same in every frame (the official code hands timm (B, C, T, H, W) clips, so its
    box cuts T and H instead). Uses the global RNG (train_one_epoch seeds it per step)."""
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
TEXTURES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checker")  # appearance label = position
MOTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # motion label = position here


def render_video(rng, height, width, num_frames, appearance, motion, background_step=(0, 0), noise=0.0):
    """uint8 (T, H, W, 3): an object textured by `appearance` (0-3) moving by `motion` (0-3) over a smooth background.

    Everything lives on a torus: the object starts at a uniformly random position and wraps around at one speed,
    so any single frame has the same distribution whatever the motion; only frame-to-frame change reveals it.
    The object is a third of the frame, its stripes a tenth, and it stands out from a dim, low-contrast
    background (lighter or darker, at random): with random stripe colours (version 2 of the set) the stripes
    dominated the pixels, and masked reconstruction learnt the clip's mean colour rather than the motion.
    """
    texture, scale = appearance, min(height, width) / 64
    y, x = np.mgrid[:height, :width] - np.array([height // 2, width // 2])[:, None, None]
    # background: smooth noise (random low-res field, bicubic upsampled) blending two colours 40 apart
    field = F.interpolate(torch.from_numpy(rng.random((1, 1, height // 8 + 2, width // 8 + 2))),
                          size=(height, width), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1).numpy()
    dark_object = rng.random() < 0.5
    background_base = rng.integers(166, 216, 3) if dark_object else rng.integers(40, 90, 3)
    colours = background_base + np.array([[-20], [20]])
    background = field[..., None] * colours[0] + (1 - field[..., None]) * colours[1]
    # object: disk or square of equal area, striped or checkered with a random period and phase, its two
    # colours 100 apart around a base far from the background's
    radius = min(height, width) * rng.uniform(0.28, 0.36)
    is_disk = rng.random() < 0.5  # disk or square, drawn at random: a nuisance, not a label
    inside = (x ** 2 + y ** 2 <= radius ** 2) if is_disk else (np.maximum(abs(x), abs(y)) <= 0.886 * radius)
    period, phase = max(3, round(rng.integers(6, 9) * scale)), rng.integers(0, 9)
    bits = [(y + phase) // period, (x + phase) // period, (x + y + phase) // period,
            (y + phase) // period + (x + phase) // period][texture]
    object_base = rng.integers(25, 85, 3) if dark_object else rng.integers(170, 230, 3)
    colours = object_base + np.array([[-50], [50]])
    pattern = np.where((bits % 2 == 0)[..., None], colours[0], colours[1])
    start = rng.integers(0, [height, width])
    step, speed = np.array(list(MOTIONS.values())[motion]), max(1, round(min(height, width) / 32))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        dy, dx = start + t * speed * step
        by, bx = t * np.array(background_step)
        frame = np.where(np.roll(inside, (dy, dx), (0, 1))[..., None], np.roll(pattern, (dy, dx), (0, 1)),
                         np.roll(background, (by, bx), (0, 1)))
        if noise:
            frame = frame + rng.normal(0, noise, frame.shape)
        frames[t] = frame.clip(0, 255)
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
    is_val = np.zeros(num_videos, bool)
    is_val[rng.permutation(num_videos)[:round(val_fraction * num_videos)]] = True
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    names = [f"videos/{i:04d}.mp4" for i in range(num_videos)]
    for i, name in enumerate(names):
        frames = render_video(np.random.default_rng([seed, i]), size, size, num_frames, *labels[i])
        write_video(os.path.join(root, name), frames, fps, options={"crf": "18", "preset": "veryfast"})
    with open(paths["all"], "w") as f:
        f.writelines(f"{name} 0\n" for name in names)  # pretraining ignores the label
    for column, task in enumerate(("appearance", "motion")):
        os.makedirs(os.path.join(root, task), exist_ok=True)
        for split, in_split in (("train", ~is_val), ("val", is_val)):
            with open(paths[f"{task}_{split}"], "w") as f:
                f.writelines(f"{names[i]} {labels[i, column]}\n" for i in np.flatnonzero(in_split))
    _write_atomically(marker, json.dumps(params))  # written last: its presence means the set is complete
    return paths


def use_synthetic_set(args, list_name):
    """A stage without --data_path: the demo runs on the synthetic set (made once in --synthetic_root), and says so."""
    print(f"no --data_path: demo run on the synthetic set ({list_name}) in {args.synthetic_root} ({args.epochs} "
          f"epochs, {args.num_frames}x{args.input_size}px); give --data_path for real training")
    make_synthetic_set(args.synthetic_root)
    args.data_path, args.data_root = os.path.join(args.synthetic_root, list_name), args.synthetic_root


# ------------------------------------------------------------------------------------------------------- pictures
def first_clips(list_path, data_root, n, num_frames, sampling_rate, input_size, sampling="dense"):
    """The list's first n videos as the centred test view of each: what --visualize shows, the same frames in every
    stage's pictures. -> (paths, clips (n, 3, T, S, S))."""
    dataset = VideoDataset(list_path, data_root, mode="test", num_frames=num_frames, sampling_rate=sampling_rate,
                           sampling=sampling, input_size=input_size, short_side_size=input_size, test_num_segment=1,
                           test_num_crop=1)
    n = min(n, len(dataset))
    return [path for path, _ in dataset.items[:n]], torch.stack([dataset[(i, 0)]["video"] for i in range(n)])


# Capitals, digits and a few signs, 3x5 pixels each: 5 rows of 3 bits, one octal digit per row (4 = left column).
FONT = {g[0]: g[1:] for g in """A25755 B65656 C34443 D65556 E74647 F74644 G34553 H55755 I72227 J11152 K55655 L44447
    M57755 N65555 O25552 P65644 Q25563 R65655 S34216 T72222 U55557 V55552 W55775 X55255 Y55222 Z71247 075557 126227
    261247 361216 455711 574616 634757 771222 875757 975716 .00002 ,00024 -00700 _00007 :02020 %51245 (12221 )42224
    /11244 =07070 +02720""".split()}


def write_pictures(output_dir, videos, pictures, input_size):
    """--visualize's PNGs, OUTPUT_DIR/visualize/{i}_{video name}.png, one per video: pictures[i] = [(label, images
    float (K, 3, S, S) in 0-1)], a row each. A row is its label (FONT at twice its size, 14 px) over its K images side
    by side, enlarged by scale = max(1, 128 // input_size) (nearest: patches stay sharp), on white with 2 px gaps: the
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


# ------------------------------------------------------------------------------------------ preparing a data set
# x264 settings of prepared copies, each measured on the reader (docs/speed.md): the fast-decode tune (CAVLC instead of
# CABAC, no deblocking filter) decodes 2-3x faster for ~15% more bytes; 3 B-frames between P-frames always (b-adapt=0),
# none of them a reference (no B-pyramid), so that a clip that takes every 4th frame skips 3 frames in 4 between the
# ones it needs. One encoder thread: prepare() runs a process per core.
PREPARE_X264 = {"tune": "fastdecode", "preset": "fast", "threads": "1",
                "x264-params": "b-adapt=0:bframes=3:b-pyramid=none"}


def prepare(list_path, data_root, output_dir, short_side=320, keyframe_interval=32, crf=18, num_workers=None):
    """Re-encode every video of a list for training into output_dir, with a list of the copies there (same file name
    and labels; the originals are not touched). -> the new list's path. A copy is H.264 (PREPARE_X264) in mp4 with the
    same frames, its short side at most `short_side` (never enlarged), a keyframe every `keyframe_interval` frames so
    that a clip decodes from a keyframe just before it; num_workers processes (default: one per core). Unreadable
    inputs are listed in output_dir/unreadable.txt. Every copy is verified (it decodes to its original's frame count)
    before it takes its final name: a run killed at any moment can run again, finished copies are kept."""
    settings = dict(short_side=short_side, keyframe_interval=keyframe_interval, crf=crf, x264=PREPARE_X264)
    os.makedirs(output_dir, exist_ok=True)
    record = os.path.join(output_dir, "prepare.json")
    if os.path.exists(record):
        with open(record) as f:
            if json.load(f) != settings:
                raise ValueError(f"{output_dir} holds copies prepared with other settings ({record}): prepare into "
                                 "another folder, or give the same --short_side, --keyframe_interval and --crf")
    else:
        _write_atomically(record, json.dumps(settings))
    entries = read_list(list_path)
    copy = {path: os.path.normpath(path).lstrip(os.sep).replace(".." + os.sep, "").removesuffix(".mp4") + ".mp4"
            for path, _ in entries}  # the list's path -> the copy's, under output_dir: a.webm -> a.webm.mp4, a.mp4 too
    jobs = sorted({(os.path.join(data_root, path), os.path.join(output_dir, name)) for path, name in copy.items()
                   if not os.path.exists(os.path.join(output_dir, name))})
    print(f"preparing {len(jobs)} of {len(copy)} videos into {output_dir} ({len(copy) - len(jobs)} done before)")
    results = in_parallel(functools.partial(_prepare_video, **settings), jobs,
                          os.cpu_count() if num_workers is None else num_workers)
    unreadable, begin = [], time.time()
    for done, (source, error) in enumerate(results, 1):
        if error:
            unreadable.append(f"{source}\t{error}")
            print(f"skipping unreadable file {source} ({error[:200]})", flush=True)
        if done % 100 == 0 or done == len(jobs):
            rate = done / (time.time() - begin)
            print(f"prepared {done}/{len(jobs)} ({len(unreadable)} unreadable), {rate:.1f} videos/s, "
                  f"{(len(jobs) - done) / rate:.0f} s left", flush=True)
    _write_atomically(os.path.join(output_dir, "unreadable.txt"), "".join(line + "\n" for line in unreadable))
    new_list = os.path.join(output_dir, os.path.basename(list_path))
    kept = [f"{copy[p]} {label}\n" for p, label in entries if os.path.exists(os.path.join(output_dir, copy[p]))]
    _write_atomically(new_list, "".join(kept))
    left_out = f", {len(entries) - len(kept)} left out: unreadable.txt says why" if len(kept) < len(entries) else ""
    print(f"{new_list}: {len(kept)} of {len(entries)} videos{left_out}; train with --data_path {new_list} "
          f"--data_root {output_dir}")
    return new_list


def _prepare_video(job, short_side, keyframe_interval, crf, x264):
    """(source, target) -> (source, None or why it failed). Writes source's frames to target as H.264 in mp4, resized
    (by swscale, area) to a short side of at most short_side with even sides (yuv420p), one frame for each decoded
    frame at the source's average rate (frame i of the copy is frame i of the source). The copy's colours are in the
    BT.601 matrix and limited range, what a reader assumes of an untagged stream: a source in BT.709 (most HD
    footage) or full range (JPEG, PNG, RGB) is converted from what its frames say, not copied number for number."""
    source, target = job
    partial = target + ".part"
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with av.open(source) as container:
            stream = _video_stream(container, source)
            scale = min(1.0, short_side / min(stream.width, stream.height))
            width, height = (max(2, round(side * scale / 2) * 2) for side in (stream.width, stream.height))
            frames = (frame.reformat(width, height, "yuv420p", interpolation="AREA", dst_colorspace="ITU601",
                                     dst_color_range="MPEG", threads=1) for frame in container.decode(stream))
            count = write_video(partial, frames, stream.average_rate or stream.guessed_rate or 30, "libx264",
                                {**x264, "g": str(keyframe_interval), "crf": str(crf)}, format="mp4")
        if not count:
            raise ValueError("no frames decoded")
        with av.open(partial, format="mp4") as container:  # verify: every frame decodes
            if sum(1 for _ in container.decode(video=0)) != count:
                raise ValueError(f"the copy does not decode to the original's {count} frames")
        with open(partial, "rb") as f:
            os.fsync(f.fileno())  # on disk before it takes its final name
        os.replace(partial, target)
        return source, None
    except UNREADABLE as error:
        if os.path.exists(partial):
            os.unlink(partial)
        return source, f"{type(error).__name__}: {error}"


def _write_atomically(path, text):
    """Write a small file whole or not at all: a temporary name unique to this process, synced, then renamed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_HELD = {}  # lock file -> its open handle, kept for the life of the process


def hold_folder(folder, flag="--output_dir"):
    """One run at a time writes `folder`: a POSIX record lock on folder/.lock, taken without waiting. The OS drops it
    when the process dies, however it dies (never a stale lock), and forked workers do not inherit it (unlike flock),
    so a killed run's orphaned workers never keep a rerun out. Taken again in the same process, it is already held.
    One clear error where another live process holds it, or where `folder` is a file."""
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
    handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    handle.flush()
    _HELD[path] = handle


# ----------------------------------------------------------------------------------------------- benchmark
def benchmark_set(root, bitrate="low", num_videos=10):
    """10-second 340x256 30-fps H.264 videos at x264's defaults (keyframes 250 frames apart), made once. "low": the
    synthetic set's objects over a panning background with sensor noise (~135 kbit/s); "high": an image of random
    noise panning 3 px a frame (~570 kbit/s, 66 kB keyframes). -> (list path, root)."""
    root = os.path.join(root, bitrate)
    list_path = os.path.join(root, f"bench{num_videos}.csv")
    if not os.path.exists(list_path):  # written last: its presence means the set is complete
        os.makedirs(root, exist_ok=True)
        for i in range(num_videos):
            rng = np.random.default_rng(i)
            if bitrate == "low":
                frames = render_video(rng, 256, 340, 300, i % 4, i // 4 % 4, (0, 1), noise=4.0)
            else:
                noise = rng.integers(0, 256, (256, 340 + 3 * 300, 3), dtype=np.uint8)
                frames = np.stack([noise[:, 3 * t:3 * t + 340] for t in range(300)])
            write_video(os.path.join(root, f"{i}.mp4"), frames, fps=30)
        _write_atomically(list_path, "".join(f"{i}.mp4 0\n" for i in range(num_videos)))
    return list_path, root


def benchmark(data_path, data_root, num_clips=40, num_sample=2):
    """--bench: clips per second and core of the pretraining loader (decode, sample, the distillation transform and
    mask, collate), one process, one thread, on the list's files and on copies that prepare() makes in a temporary
    folder, at num_sample 1 and at num_sample; the first also with the whole video decoded first (the slow reference).
    The configurations take turns video by video, so that a busy machine slows all alike. -> a dict for each."""
    torch.set_num_threads(1)  # the decoder's threads follow torch's (_video_stream)
    with tempfile.TemporaryDirectory() as folder:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            lists = {"original": (data_path, data_root), "prepared": (prepare(data_path, data_root, folder), folder)}
        lines = [dict(files=files, num_sample=r) for files in lists for r in (1, num_sample)]
        datasets = [VideoDataset(*lists[line["files"]], num_frames=16, sampling_rate=4, input_size=224,
                                 num_sample=line["num_sample"]) for line in lines + lines[:1]]
        datasets[-1].reader = functools.partial(read_frames, decode_all=True)
        seconds, clips = [0.0] * len(datasets), [0] * len(datasets)
        for i in range(-1, num_clips):  # -1: a warm-up round, not timed
            for k, dataset in enumerate(datasets):
                if clips[k] < num_clips:
                    begin = time.perf_counter()
                    collate_samples([dataset[(max(i, 0) % len(dataset), max(i, 0) // len(dataset))]])
                    seconds[k] += (time.perf_counter() - begin) * (i >= 0)
                    clips[k] += dataset.num_sample * (i >= 0)
    rates = [round(n / t, 2) for n, t in zip(clips, seconds)]
    for line, rate in zip(lines, rates):
        line["clips_per_s_per_core"] = rate
    lines[0].update(clips_per_s=rates[0], decode_all_clips_per_s=rates[-1])
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Data pipeline of MVD-minimal: --prepare re-encodes a data set for "
                                     "training, --bench measures the loader, --synthetic writes the demo set.")
    parser.add_argument("--prepare", metavar="OUT_DIR", help="re-encode every video of --data_path into OUT_DIR for "
                        "training, with a list of the copies and the same labels there (the originals are not "
                        "touched; run it again after an interruption: finished copies are kept)")
    parser.add_argument("--short_side", type=int, default=320, help="--prepare: the copies' short side at most "
                        "(never enlarged). The pretraining crop takes 0.66-1 of the short side and resizes it to 224 "
                        "px, so 320 (VideoMAE's and MVD's Kinetics) keeps every crop at 211 px or more; more is "
                        "decoded, not seen")
    parser.add_argument("--keyframe_interval", type=int, default=32, help="--prepare: frames from one keyframe to "
                        "the next. A clip decodes from the keyframe before it: at 32, a clip of 16 frames 4 apart (61 "
                        "frames) reads 16 frames before it on average, 4 of them references, where x264's default of "
                        "250 makes it read ~125")
    parser.add_argument("--crf", type=int, default=18, help="--prepare: x264's quality, lower is better and larger "
                        "(18: 40-44 dB PSNR against the original on smooth footage)")
    parser.add_argument("--num_workers", type=int, help="--prepare: processes (default: one per core)")
    parser.add_argument("--bench", action="store_true", help="print JSON lines of clips/s per core of the loader")
    parser.add_argument("--data_path", help="video list to prepare or benchmark on; --bench's default: generated "
                                            "10-s 340x256 videos")
    parser.add_argument("--data_root", default="", help="directory the list's paths are relative to")
    parser.add_argument("--bench_set", choices=["low", "high"], default="low",
                        help="without --data_path: low- or high-bitrate generated videos (data.benchmark_set)")
    parser.add_argument("--num_clips", type=int, default=40, help="clips timed per configuration")
    parser.add_argument("--num_sample", type=int, default=2, help="clips per decoded video timed beside 1")
    parser.add_argument("--synthetic", metavar="ROOT", help="write the synthetic set (the stages' default) to ROOT")
    parser.add_argument("--synthetic_seed", type=int, default=0, help="seed of the synthetic set's videos and split")
    parser.add_argument("--synthetic_videos", type=int, default=400, help="how many videos the synthetic set has")
    parser.add_argument("--synthetic_val", type=float, default=0.25, help="fraction of them held out in val.csv")
    args = parser.parse_args()
    if not (args.bench or args.synthetic or args.prepare):
        parser.error("nothing to do: pass --prepare OUT_DIR, --bench or --synthetic ROOT")
    if args.prepare and not args.data_path:
        parser.error("--prepare needs --data_path: the list of videos to prepare (and --data_root if it is relative)")
    if args.prepare:
        try:
            prepare(args.data_path, args.data_root, args.prepare, args.short_side, args.keyframe_interval, args.crf,
                    args.num_workers)
        except ValueError as e:
            sys.exit(f"data.py: error: {e}")
    if args.synthetic:
        print(json.dumps(make_synthetic_set(args.synthetic, args.synthetic_videos, seed=args.synthetic_seed,
                                            val_fraction=args.synthetic_val)))
    if args.bench:
        lists = (args.data_path, args.data_root) if args.data_path else benchmark_set(
            os.path.join(tempfile.gettempdir(), "mvd_bench_videos"), args.bench_set)
        for line in benchmark(*lists, args.num_clips, args.num_sample):
            print(json.dumps(line), flush=True)
