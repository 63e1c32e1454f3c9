"""Clips per second and core of the pretraining loader: `python tools/bench_loader.py [--data_path LIST --data_root
ROOT]`, one JSON line per configuration on stdout (SPEC.md, "Benchmark modes"). Cores per GPU = the GPU's clips/s /
clips_per_s_per_core (README, "Feeding a GPU"). Without --data_path it times generated videos (benchmark_set).
"""
import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: import data

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import (VideoDataset, _write_atomically, collate_samples, read_frames, read_list,  # noqa: E402
                  render_video, write_video)
from prepare import prepare  # noqa: E402  (tools/ is this script's folder, first on sys.path when it runs)


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
    """Clips per second and core of the pretraining loader (decode, sample, the distillation transform and mask,
    collate), one process, one thread, on the list's files and on copies that prepare() makes in a temporary folder,
    at num_sample 1 and at num_sample; the first also with the whole video decoded first (the slow reference).
    Each configuration times num_clips clips (rounded up to whole videos: num_clips / num_sample videos at num_sample),
    of the list's first num_clips existing files: only those are copied. The configurations take turns video by
    video, so that a busy machine slows all alike. -> a dict for each."""
    torch.set_num_threads(1)  # the decoder's threads follow torch's (data._video_stream)
    timed = [(path, label) for path, label in read_list(data_path)
             if os.path.exists(os.path.join(data_root, path))][:num_clips]
    with tempfile.TemporaryDirectory() as folder:
        timed_list = os.path.join(folder, "timed.csv")
        _write_atomically(timed_list, "".join(f"{path} {label}\n" for path, label in timed))
        prepared = os.path.join(folder, "prepared")
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            lists = {"original": (timed_list, data_root), "prepared": (prepare(timed_list, data_root, prepared),
                                                                      prepared)}
        lines = [dict(files=files, num_sample=r) for files in lists for r in (1, num_sample)]
        datasets = [VideoDataset(*lists[line["files"]], num_frames=16, sampling_rate=4, input_size=224,
                                 num_sample=line["num_sample"]) for line in lines + lines[:1]]
        datasets[-1].reader = functools.partial(read_frames, decode_all=True)
        seconds, clips = [0.0] * len(datasets), [0] * len(datasets)
        for i in range(-1, num_clips):  # -1: a warm-up round, not timed
            for k, dataset in enumerate(datasets):
                if clips[k] < num_clips:
                    begin = time.perf_counter()
                    batch = collate_samples([dataset[(max(i, 0) % len(dataset), max(i, 0) // len(dataset))]])
                    seconds[k] += (time.perf_counter() - begin) * (i >= 0)
                    clips[k] += len(batch["video"]) * (i >= 0)  # every clip of the video: num_sample of them
    rates = [round(n / t, 2) for n, t in zip(clips, seconds)]
    for line, rate in zip(lines, rates):
        line["clips_per_s_per_core"] = rate
    lines[0].update(clips_per_s=rates[0], decode_all_clips_per_s=rates[-1])
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print JSON lines of clips/s per core of the pretraining loader.")
    parser.add_argument("--data_path", help="video list to time (its first --num_clips files); default: generated "
                                            "10-s 340x256 videos")
    parser.add_argument("--data_root", default="", help="directory the list's paths are relative to")
    parser.add_argument("--bench_set", choices=["low", "high"], default="low",
                        help="without --data_path: low- or high-bitrate generated videos (benchmark_set)")
    parser.add_argument("--num_clips", type=int, default=40, help="clips timed per configuration")
    parser.add_argument("--num_sample", type=int, default=2, help="clips per decoded video timed beside 1")
    args = parser.parse_args()
    lists = (args.data_path, args.data_root) if args.data_path else benchmark_set(
        os.path.join(tempfile.gettempdir(), "mvd_bench_videos"), args.bench_set)
    try:
        for line in benchmark(*lists, args.num_clips, args.num_sample):
            print(json.dumps(line), flush=True)
    except ValueError as e:
        sys.exit(f"bench_loader.py: error: {e}")
