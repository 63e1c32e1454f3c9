"""Re-encode a list's videos for training: `python tools/prepare.py OUT_DIR --data_path LIST --data_root ROOT`.

Copies that decode fast (H.264 with a keyframe every 32 frames, short side 320, fast-decode settings: why, in
docs/speed.md), a list of them with the same labels, and a record of the files left out. The originals are not
touched. One run at a time per OUT_DIR; a run killed at any moment can simply run again: finished copies are kept.
"""
import argparse
import ctypes
import functools
import itertools
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: import data

import av  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from data import UNREADABLE, _video_stream, _write_atomically, hold_folder, read_list, write_video  # noqa: E402

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
    that a clip decodes from a keyframe just before it; num_workers processes (default: one per core).

    What a run may meet, and what it does:
    - an input that cannot be read (the same test as training's reader, data._video_stream and FFmpeg's errors) is
      skipped and listed with the reason in output_dir/unreadable-{list stem}.txt: one record per list, so that
      preparing train.csv and then val.csv into one folder keeps both;
    - two files of the list that would have one copy (a and a.mp4, ../x.mp4 and x.mp4): refused before any work;
    - an error of our own output (disk full, permissions, a copy that fails its check): never blamed on the input,
      the run stops with one line, finished copies kept;
    - another run into output_dir: refused (data.hold_folder, a lock the OS drops when its holder dies);
    - a kill: every copy is verified (it decodes to its original's frame count) and synced under a temporary name
      unique to its process before it takes its final name, and a worker whose parent died finishes no copy (it is
      killed with its parent on Linux, and checks its parent before the rename), so a rerun starts clean."""
    entries = read_list(list_path)
    copy = {path: os.path.normpath(path).lstrip(os.sep).replace(".." + os.sep, "").removesuffix(".mp4") + ".mp4"
            for path, _ in entries}  # the list's path -> the copy's, under output_dir: a.webm -> a.webm.mp4, a.mp4 too
    sources = {}  # copy -> the source it is made of: two sources for one copy would overwrite each other
    for path, name in copy.items():
        source = os.path.normpath(os.path.join(data_root, path))
        if sources.setdefault(name, (path, source))[1] != source:
            raise ValueError(f"{list_path}: {sources[name][0]} and {path} would both be copied to "
                             f"{os.path.join(output_dir, name)}: rename one of them")
    hold_folder(output_dir, "OUT_DIR")
    settings = dict(short_side=short_side, keyframe_interval=keyframe_interval, crf=crf, x264=PREPARE_X264)
    record = os.path.join(output_dir, "prepare.json")
    if _read_record(record) not in (None, settings):
        raise ValueError(f"{output_dir} holds copies prepared with other settings ({record}): prepare into "
                         "another folder, or give the same --short_side, --keyframe_interval and --crf")
    _write_atomically(record, json.dumps(settings))
    for folder, _, files in os.walk(output_dir):  # copies killed runs left half-written (we hold the folder: no
        for name in files:  # one else is writing)
            if name.endswith(".part") and ".mp4." in name:
                os.unlink(os.path.join(folder, name))
    jobs = sorted((source, os.path.join(output_dir, name), os.getpid()) for name, (_, source) in sources.items()
                  if not os.path.exists(os.path.join(output_dir, name)))  # one job a copy (a.mp4 and ./a.mp4: one)
    print(f"preparing {len(jobs)} of {len(sources)} videos into {output_dir} ({len(sources) - len(jobs)} done before)")
    results = DataLoader(jobs, batch_size=None, collate_fn=functools.partial(_prepare_video, **settings),
                         num_workers=os.cpu_count() if num_workers is None else num_workers,
                         worker_init_fn=_die_with_parent)  # without batching, collate_fn is applied to each job
    unreadable, begin = [], time.time()
    done_file = os.path.join(output_dir, f"unreadable-{os.path.splitext(os.path.basename(list_path))[0]}.txt")
    for done, (source, error, ours) in enumerate(results, 1):
        if ours:
            raise ValueError(f"{ours}; the {done - 1 - len(unreadable)} copies this run finished (and those before) "
                             "are kept: run again once that is fixed")
        if error:
            unreadable.append(f"{source}\t{error}")
            print(f"skipping unreadable file {source} ({error[:200]})", flush=True)
        if done % 100 == 0 or done == len(jobs):
            rate = done / (time.time() - begin)
            print(f"prepared {done}/{len(jobs)} ({len(unreadable)} unreadable), {rate:.1f} videos/s, "
                  f"{(len(jobs) - done) / rate:.0f} s left", flush=True)
    _write_atomically(done_file, "".join(line + "\n" for line in unreadable))
    new_list = os.path.join(output_dir, os.path.basename(list_path))
    kept = [f"{copy[p]} {label}\n" for p, label in entries if os.path.exists(os.path.join(output_dir, copy[p]))]
    _write_atomically(new_list, "".join(kept))
    left_out = (f", {len(entries) - len(kept)} left out: {os.path.basename(done_file)} says why"
                if len(kept) < len(entries) else "")
    print(f"{new_list}: {len(kept)} of {len(entries)} videos{left_out}; train with --data_path {new_list} "
          f"--data_root {output_dir}")
    return new_list


def _read_record(path):
    """The settings recorded in prepare.json, or None if there are none: a file left empty or cut short (a power cut
    before the sync of an older version) is no record, and is written again."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # ValueError: not JSON, or not text
        return None


def _die_with_parent(worker_id):
    """A worker is killed with the process that started it (Linux's PR_SET_PDEATHSIG; elsewhere _prepare_video's
    parent check alone), so that a killed run leaves no worker writing beside its rerun."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class _SourceError(Exception):
    """An error reading the source, raised through write_video: the input's, not the copy's."""


def _source_frames(container, stream, width, height):
    try:
        for frame in container.decode(stream):
            yield frame.reformat(width, height, "yuv420p", interpolation="AREA", dst_colorspace="ITU601",
                                 dst_color_range="MPEG", threads=1)
    except UNREADABLE as error:
        raise _SourceError(f"{type(error).__name__}: {error}") from error


def _prepare_video(job, short_side, keyframe_interval, crf, x264):
    """(source, target, pid of the run) -> (source, why the source is unreadable or None, why our copy could not be
    written or None). Writes source's frames to target as H.264 in mp4, resized (by swscale, area) to a short side of
    at most short_side with even sides (yuv420p), one frame for each decoded frame at the source's average rate (frame
    i of the copy is frame i of the source). The copy's colours are in the BT.601 matrix and limited range, what a
    reader assumes of an untagged stream: a source in BT.709 (most HD footage) or full range (JPEG, PNG, RGB) is
    converted from what its frames say, not copied number for number.

    Errors opening or decoding the source are the input's; once its first frame is decoded, every error but the
    source's (_SourceError) is of our output: writing, verifying, syncing or renaming the temporary copy."""
    source, target, parent = job
    partial, writing = f"{target}.{os.getpid()}.part", False
    try:
        with av.open(source) as container:
            stream = _video_stream(container, source)
            scale = min(1.0, short_side / min(stream.width, stream.height))
            width, height = (max(2, round(side * scale / 2) * 2) for side in (stream.width, stream.height))
            frames = _source_frames(container, stream, width, height)
            first = next(frames, None)
            if first is None:
                raise ValueError("no frames decoded")
            writing = True
            os.makedirs(os.path.dirname(target), exist_ok=True)
            count = write_video(partial, itertools.chain([first], frames),
                                stream.average_rate or stream.guessed_rate or 30, "libx264",
                                {**x264, "g": str(keyframe_interval), "crf": str(crf)}, format="mp4")
        with av.open(partial, format="mp4") as container:  # verify: every frame decodes
            if sum(1 for _ in container.decode(video=0)) != count:
                raise ValueError(f"the copy does not decode to the original's {count} frames")
        with open(partial, "rb") as f:
            os.fsync(f.fileno())  # on disk before it takes its final name
        if os.getpid() != parent and os.getppid() != parent:  # a worker whose run was killed: the rerun makes it
            raise ProcessLookupError(f"the run (pid {parent}) is gone")
        os.replace(partial, target)
        return source, None, None
    except Exception as error:
        if os.path.exists(partial):
            os.unlink(partial)
        if writing and not isinstance(error, _SourceError):
            return source, None, f"cannot write {target}: {type(error).__name__}: {error}"
        if isinstance(error, UNREADABLE):
            return source, f"{type(error).__name__}: {error}", None
        if isinstance(error, _SourceError):
            return source, str(error), None
        raise


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Re-encode every video of --data_path into OUT_DIR for training, "
                                     "with a list of the copies and the same labels there (the originals are not "
                                     "touched; run it again after an interruption: finished copies are kept).")
    parser.add_argument("output_dir", metavar="OUT_DIR", help="where the copies, their list and the record of the "
                        "files left out go (one run at a time)")
    parser.add_argument("--data_path", required=True, help="the list of videos to prepare")
    parser.add_argument("--data_root", default="", help="directory the list's paths are relative to")
    parser.add_argument("--short_side", type=int, default=320, help="the copies' short side at most (never "
                        "enlarged). The pretraining crop takes 0.66-1 of the short side and resizes it to 224 px, so "
                        "320 (VideoMAE's and MVD's Kinetics) keeps every crop at 211 px or more; more is decoded, not "
                        "seen")
    parser.add_argument("--keyframe_interval", type=int, default=32, help="frames from one keyframe to the next. A "
                        "clip decodes from the keyframe before it: at 32, a clip of 16 frames 4 apart (61 frames) "
                        "reads 16 frames before it on average, 4 of them references, where x264's default of 250 "
                        "makes it read ~125")
    parser.add_argument("--crf", type=int, default=18, help="x264's quality, lower is better and larger (18: 40-44 "
                        "dB PSNR against the original on smooth footage)")
    parser.add_argument("--num_workers", type=int, help="processes (default: one per core)")
    args = parser.parse_args()
    try:
        prepare(args.data_path, args.data_root, args.output_dir, args.short_side, args.keyframe_interval, args.crf,
                args.num_workers)
    except ValueError as e:
        sys.exit(f"prepare.py: error: {e}")
