"""Every network of MVD, plus the plumbing the three stages share (checkpoints, optimizer groups, schedule, devices).

Shape legend used in the comments:
    B batch, C=3 colour channels, T frames, H x W pixels, p patch size, tubelet frames per tube (2)
    t, h, w = T/tubelet, H/p, W/p the token grid; N = t*h*w tokens of a clip, L = h*w tokens of an image
    N_vis visible tokens, N_mask masked tokens, D encoder width, Dd decoder width
Conventions, said once here:
    mask: bool (B, N), True = masked (hidden from the encoder). Every sample of a batch hides the same number of tokens,
    so x[~mask].reshape(B, -1, D) is valid.
    Teacher features are the output of the last block *before* the final norm, as in the official code.
    Parameter names are the official MAE / VideoMAE / MVD ones, so checkpoints interchange in both directions.
"""
import argparse
import atexit
import contextlib
import errno
import functools
import itertools
import json
import math
import os
import re
import shutil
import time
import timeit
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision

VIT_SIZES = {
    "vit_tiny": dict(dim=192, depth=12, heads=3),
    "vit_small": dict(dim=384, depth=12, heads=6),
    "vit_base": dict(dim=768, depth=12, heads=12),
    "vit_large": dict(dim=1024, depth=24, heads=16),
    "vit_huge": dict(dim=1280, depth=32, heads=16),
}
# VideoMAE's pixel decoder per encoder size (width, depth, heads), as the official pretraining scripts.
VIDEOMAE_DECODER = {"vit_tiny": (96, 4, 3), "vit_small": (192, 4, 3), "vit_base": (384, 4, 6),
                    "vit_large": (512, 12, 8), "vit_huge": (640, 12, 8)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- Command-line flags the three stages share
NUM_SAMPLE_HELP = ("clips per decoded video, as the official --num_sample: R clips at R places (the image MAE: R "
                   "frames, or crops of an image), each its own crop and mask. A step sees batch_size x R clips per "
                   "process, the lr scales with clips; an epoch still reads each video once (python data.py --bench: "
                   "R=2 is 1.3-1.4x the clips a core on unprepared videos)")


def clips_per_video(args):
    """' x R clips per video' for the total batch's line where --num_sample R > 1, else ''."""
    return f" x {args.num_sample} clips per video" if args.num_sample > 1 else ""


def add_training_flags(p, output_dir, blr=1.5e-4, min_lr=1e-5, weight_decay=0.05, drop_path=0.0, lr_note="",
                       absolute_min_lr=False):
    """The flags every stage has, under the official names. The stage gives its own defaults; None means 'filled in
    after parsing' (the official recipe with --data_path, a demo without) by fill_defaults."""
    p.add_argument("--model", choices=list(VIT_SIZES), default="vit_base", help="size of the model this stage trains")
    p.add_argument("--depth", type=int, help="override the size's depth (small test configs)")
    p.add_argument("--data_root", default="", help="folder the list's paths are relative to")
    p.add_argument("--synthetic_root", default="output/synthetic", help="where the demo set is written once")
    p.add_argument("--num_frames", type=int)
    p.add_argument("--sampling_rate", type=int, help="frames between sampled frames; 0 repeats one frame (a "
                                                     "single-frame baseline: no motion left to see)")
    p.add_argument("--input_size", type=int), p.add_argument("--batch_size", type=int, help="videos per process")
    p.add_argument("--patch_size", type=int, default=16, help="pixels per side of a patch (a tube spans 2 frames); "
                   "8 at 64 px gives an 8x8 grid")
    p.add_argument("--epochs", type=int), p.add_argument("--warmup_epochs", type=int)
    p.add_argument("--update_freq", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--blr", type=float, default=blr, help=f"base lr: lr = blr * total batch / 256{lr_note}")
    p.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    p.add_argument("--min_lr", type=float, default=min_lr, help="end of the cosine" + (
        ", absolute (as the official)" if absolute_min_lr else ", scaled by total batch / 256 too (official 400-epoch "
                                                                 "distillation scripts: 1e-4)"))
    p.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW's, not on biases, norms, tokens")
    p.add_argument("--clip_grad", type=float, help="max gradient norm (off by default, as the official runs)")
    p.add_argument("--drop_path", type=float, default=drop_path, help="stochastic depth rate of the trained model")
    p.add_argument("--use_checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing of the trained blocks: less memory, more time")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto: bf16 on GPUs that have it (else fp16 with loss scaling, as the official "
                        "runs) and on CPUs where bf16 products run faster than fp32 (timed), else fp32 (fp16 on a CPU "
                        "only with fp16 units)")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--cache_videos", action=argparse.BooleanOptionalAction, default=False,
                   help="decode each video once, before the loader's workers start, and keep it in memory (the "
                        "workers share it): small sets of small videos, like the synthetic set, then load at the "
                        "model's pace")
    p.add_argument("--max_bad_videos", type=int, help="stop after this many unreadable videos (default 1%%, >= 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=output_dir, help="checkpoints, log.txt, bad_videos.txt" + (
        "" if output_dir else "; default output/{mode}_mae, where distill.py looks for teachers"))
    p.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUTPUT_DIR/checkpoint-last.pth when it exists")
    p.add_argument("--resume", default="", help="a training checkpoint of this stage to continue from")
    p.add_argument("--save_ckpt_freq", type=int, default=20, help="keep checkpoint-{epoch}.pth every N epochs")
    p.add_argument("--save_every_steps", type=int, default=0, help="also write checkpoint-last.pth every N optimizer "
                   "steps inside an epoch, for an exact resume there (0: off)")
    p.add_argument("--save_every_minutes", type=float, default=15, help="... and every M minutes (0: off): a "
                   "ViT-B student's takes 1.5-6.4 s on a 2-core CPU (README), under 1%% of 15 minutes")
    p.add_argument("--log_every", type=int, default=10, help="print a line every N steps")
    p.add_argument("--bench", type=int, default=0, metavar="N", help="time N steps on random clips and exit")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="write a PNG for each of the list's first N videos into OUTPUT_DIR/visualize from a trained "
                        "checkpoint (what the model sees and predicts) and exit; never trains")


# (flag, valid, what a valid value is) of the shared flags; a stage checks its own flags the same way (check_flags)
FLAG_RULES = (*((f, lambda v: v >= 1, "at least 1") for f in ("num_sample", "batch_size", "epochs", "update_freq")),
              ("warmup_epochs", lambda v: v >= 0, "0 or more"),
              ("sampling_rate", lambda v: v >= 0, "0 or more (0 repeats one frame: the single-frame baseline)"))


def check_flags(p, args, rules):
    """Refuse, before any work, the first flag that breaks its rule: an argparse error (one line, exit 2) naming it."""
    for flag, valid, what in rules:
        if getattr(args, flag) is not None and not valid(getattr(args, flag)):
            p.error(f"--{flag} {getattr(args, flag)}: must be {what}")


def mask_ratio_rule(cells, kept=False):
    """--mask_ratio's rule for a mask drawn over `cells`: it hides at least one and shows at least one. tube_mask hides
    int(ratio * cells); random_mask (kept=True) keeps int(cells * (1 - ratio))."""
    hidden = (lambda r: cells - int(cells * (1 - r))) if kept else (lambda r: int(r * cells))
    what = f"a ratio hiding 1 to {cells - 1} of the {cells} cells its mask draws over"
    return "mask_ratio", lambda r: 0 < hidden(r) < cells, what


def fill_defaults(p, args, *tables):
    """Flags left at None take the first table's value that has them; FLAG_RULES and the tube grid are checked (an
    argparse error); --precision auto becomes what this device computes fastest (auto_precision), said in one line."""
    for table in tables:
        for key, value in table.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    check_flags(p, args, FLAG_RULES)
    if args.input_size % args.patch_size or args.num_frames % 2:
        p.error(f"--input_size ({args.input_size}) must be a multiple of --patch_size ({args.patch_size}) and "
                f"--num_frames ({args.num_frames}) even (tubes span 2 frames)")
    if args.precision == "auto":
        cuda = torch.cuda.is_available()
        args.precision, why = auto_precision(cuda)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"--precision auto: {args.precision} ({why})" + ("" if cuda else "; CPU fast paths against plain "
                  "PyTorch: " + ", ".join(f"{k} {v}" for k, v in cpu_kernels().summary.items())), flush=True)
    return args


# ---- Fixed sin-cos position tables (pure torch, computed in float64 like the official numpy code, returned as float32)
def sincos_1d(dim, pos):
    """(L,) positions -> (L, dim): [sin(pos * omega), cos(pos * omega)], omega_i = 1 / 10000^(i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim, h, w):
    """(h*w, dim), row-major tokens; the column half comes first, as MAE's table."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


def sincos_3d(dim, t, h, w):
    """(t*h*w, dim), t-major tokens: a quarter of the width for time, the rest a 2D table of width 3*dim/4."""
    time = sincos_1d(dim // 4, torch.arange(t)).repeat_interleave(h * w, dim=0)  # (t*h*w, dim/4)
    space = sincos_2d(dim - dim // 4, h, w).repeat(t, 1)  # (t*h*w, 3*dim/4)
    return torch.cat([time, space], dim=1)


def sinusoid_1d(dim, n):
    """VideoMAE's table over the flat token index: angle(n, j) = n / 10000^(2*(j//2)/dim), sin at even j, cos at odd."""
    j = torch.arange(dim, dtype=torch.float64)
    angles = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (2 * (j // 2) / dim)  # (n, dim)
    return torch.where(j % 2 == 0, angles.sin(), angles.cos()).float()


# ------------------------------------------------------------------- What this CPU computes fast, probed once a process
BF16_MARGIN = 1.25  # bf16 is picked when its products are this much faster: autocast's casts cost some of the gain
FAST_MARGIN = 1.2  # a fast path replaces plain PyTorch, the simpler path, only when timed this much faster
FAST_PATHS = ("onednn_linear", "product_attention")  # what each replaces: F.linear (+ F.gelu), SDPA


def speedup(plain, fast, rounds=8):
    """How many times faster fast() runs than plain(): the fastest of `rounds` calls of each, the two taken in turn so
    that a busy machine slows both alike. The first call of each, untimed, builds its kernel."""
    for f in (plain, fast):
        f()
    times = [[timeit.timeit(f, number=1) for f in (plain, fast)] for _ in range(rounds)]
    return min(t[0] for t in times) / min(t[1] for t in times)


def time_fast_paths(dtype, g):
    """Each fast path's speedup over the plain PyTorch it replaces, in this dtype, on shapes of a ViT-B: oneDNN's fused
    linear + GELU against F.linear then F.gelu (64 tokens), plain-product attention against SDPA (one head of 392
    tokens). A kernel missing in this dtype ("could not create a primitive descriptor") or another result: 0x."""
    x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((64, 768), (3072, 768), (3072,)))
    w, (q, k, v) = w / 768 ** 0.5, torch.randn(3, 1, 1, 392, 64, generator=g).to(dtype)  # outputs of about 1
    pairs = {"onednn_linear": (lambda: F.gelu(F.linear(x, w, b)),
                               lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")),
             "product_attention": (lambda: F.scaled_dot_product_attention(q, k, v), lambda: product_attention(q, k, v))}
    speedups = dict.fromkeys(pairs, 0.0)
    for path, (plain, fast) in pairs.items():
        with torch.no_grad(), contextlib.suppress(RuntimeError, AttributeError):
            if torch.allclose(plain().float(), fast().float(), rtol=0.05, atol=0.05):
                speedups[path] = speedup(plain, fast)
    return speedups


def measure_cpu(fast):
    """What this CPU does (about 0.15 s): bf16, fp16: oneDNN's own check for matrix units in that dtype (the one
    PyTorch's matmul goes by); bf16_speedup: a bf16 (512, 512) product against fp32 (20 rounds: it is small); with
    `fast` the fast paths' speedups in each dtype with units, on one thread (a probe this short cannot load many cores
    as the real work does; docs/speed.md). Its own generator: the run's random stream stays where it was."""
    begin, g, threads = time.perf_counter(), torch.Generator().manual_seed(0), torch.get_num_threads()
    onednn = torch.backends.mkldnn.is_available()
    bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    found = dict(bf16=bf16, fp16=onednn and torch.ops.mkldnn._is_mkldnn_fp16_supported(), bf16_speedup=0.0,
                 **{path: {} for path in FAST_PATHS})
    if bf16:
        a, a16 = (torch.randn(512, 512, generator=g).to(dtype) for dtype in (torch.float32, torch.bfloat16))
        found["bf16_speedup"] = speedup(lambda: a @ a, lambda: a16 @ a16, rounds=20)
    torch.set_num_threads(1)
    for dtype in ((torch.float32, torch.bfloat16) if bf16 else (torch.float32,)) if fast else ():
        for path, times_faster in time_fast_paths(dtype, g).items():
            found[path][str(dtype).removeprefix("torch.")] = times_faster
    torch.set_num_threads(threads)
    return {**found, "probe_ms": round(1000 * (time.perf_counter() - begin))}


@functools.cache
def cpu_kernels():
    """The CPU's fast paths, found out from what it does rather than assumed, once a process. CPUs differ (bf16 products
    3x faster than fp32 on one, 2x slower on another; oneDNN's fp32 linear 2x the default BLAS or 1.4x slower:
    docs/speed.md), so each fast path is timed against the plain PyTorch it replaces and used where at least
    FAST_MARGIN faster: onednn_linear, product_attention: the dtypes where it is; bf16_faster: bf16 products BF16_MARGIN
    faster than fp32 (what --precision auto goes by); summary: what --bench and auto's line print.
    MVD_FAST_KERNELS=0 turns every fast path off: plain PyTorch, the fallback that always works (tested)."""
    fast = os.environ.get("MVD_FAST_KERNELS", "1") != "0"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        found = measure_cpu(fast)
    else:  # under torchrun rank 0 measures for all, through torchrun's store (the process group does not exist yet
        # when --precision auto is decided): all ranks take the same decisions, whatever their own timings would say
        store, rank, _ = torchrun_store()
        if rank == 0:
            store.set("cpu_kernels", json.dumps(measure_cpu(fast)))
        found = json.loads(store.get("cpu_kernels"))
    used = {path: tuple(getattr(torch, name) for name, s in found[path].items() if s >= FAST_MARGIN)
            for path in FAST_PATHS}
    summary = {f"{path} {name}": f"{s:.2f}x " + ("used" if s >= FAST_MARGIN else "off")
               for path in FAST_PATHS for name, s in found[path].items()}
    summary = {**summary, "probe_ms": found["probe_ms"]} if fast else {"fast_paths": "off (MVD_FAST_KERNELS=0)"}
    return SimpleNamespace(bf16=found["bf16"], fp16=found["fp16"], measured=found, **used, summary=summary,
                           bf16_faster=found["bf16"] and found["bf16_speedup"] >= BF16_MARGIN)


def auto_precision(cuda):
    """--precision auto -> what this device computes fastest: on CUDA bf16 where the GPU has it, else fp16 (with the
    loss scaler); on a CPU bf16 where its bf16 products run faster than fp32 (timed), else fp32. -> (precision, why)."""
    if cuda:
        return ("bf16", "this GPU supports it") if torch.cuda.is_bf16_supported() else ("fp16", "no bf16 on this GPU")
    k = cpu_kernels()
    return ("bf16", "bf16 products run faster than fp32 on this CPU") if k.bf16_faster else (
        "fp32", "bf16 products run slower than fp32 on this CPU (measured)" if k.bf16 else
        "no bf16 units on this CPU: bf16 is emulated, 50-100x slower than fp32")


# --------------------------------------------------------------------------------- Building blocks shared by all models
def linear(x, weight, bias=None, gelu=False):
    """F.linear, then the exact GELU if gelu. On the CPU without autograd, through oneDNN where it was timed faster in
    this dtype (cpu_kernels): it fuses the GELU but has no backward, so it serves the frozen teachers and evaluation.
    The dtype is what F.linear would compute in (autocast's, else the input's). Without autograd the GELU overwrites
    the product: a fresh 38 MB tensor a block (ViT-B teacher, 2 clips) would be page-faulted in at every step."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if x.device.type == "cpu" and not torch.is_grad_enabled() and dtype in cpu_kernels().onednn_linear:
        x, weight, bias = (t if t is None else t.to(dtype) for t in (x, weight, bias))
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    x = F.linear(x, weight, bias)
    if not gelu:
        return x
    return F.gelu(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)  # in place: no backward needs the product


# FLOP formulas (on shapes) for torch.utils.flop_counter, which knows neither the CPU attention kernel nor oneDNN's
# product: attention is 2 products of 2*N*M*d per head forward, 5 backward (grads of q, k, v, probabilities, recompute)
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, *_, **__: 4 * math.prod(q) * k[-2],
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, *_, **__: 10 * math.prod(q) * k[-2],
    **({torch.ops.mkldnn._linear_pointwise: lambda x, w, *_, **__: 2 * math.prod(x[:-1]) * w[0] * w[1]}
       if hasattr(torch.ops.mkldnn, "_linear_pointwise") else {})}


def product_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with plain products, for (B, heads, N, d). Where the CPU has bf16 units, SDPA's fused
    kernel reaches a fraction of them in bf16 and plain products run 2-4x faster (docs/speed.md). For long sequences
    one head and a block of queries at a time, so that the block's probabilities (about 2 MB in bf16) stay in the
    core's cache (half the time of whole heads); each query's softmax is the same."""
    B, heads, N, d = q.shape
    if N < 256:
        return torch.softmax((q * d ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
    rows = 2 ** 20 // N  # queries per block: (rows, N) probabilities of 2**20 values
    out = [torch.softmax((q[b, h, start:start + rows] * d ** -0.5) @ k[b, h].T, dim=-1) @ v[b, h]  # (rows, d)
           for b, h in itertools.product(range(B), range(heads)) for start in range(0, N, rows)]
    return torch.cat(out).view(B, heads, N, d)


def attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d): scaled_dot_product_attention (its fused kernels on GPUs), or
    plain products on a CPU where they were timed faster in this dtype (cpu_kernels; in fp32 SDPA is the faster)."""
    if q.device.type == "cpu" and not dropout_p and q.dtype in cpu_kernels().product_attention:
        return product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head self-attention with the official parameters: qkv weight without bias plus learned q_bias and v_bias.
    The key bias is fixed at zero: it adds the same term to every logit of a query, so the softmax ignores it."""

    def __init__(self, dim, heads, attn_drop=0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads: pick a width that is (e.g. --decoder_dim)")
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, D/heads)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return linear(x.transpose(1, 2).reshape(B, N, D), self.proj.weight, self.proj.bias)


def DropPath(p):
    """Stochastic depth (timm's DropPath in the official code): in training, drop the residual branch of whole samples
    with probability p and scale the kept ones by 1/(1-p)."""
    return torchvision.ops.StochasticDepth(p, mode="row")


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):  # fc1, exact GELU, fc2
        return linear(linear(x, self.fc1.weight, self.fc1.bias, gelu=True), self.fc2.weight, self.fc2.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch under DropPath."""

    def __init__(self, dim, heads, drop_path=0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, 4 * dim)  # MLP ratio 4
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(blocks, x, use_checkpoint=False):
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():  # recompute activations in backward: memory for time
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class PatchEmbed(nn.Module):
    """Images (B, 3, H, W) -> (B, L, D) with a Conv2d, or clips (B, 3, T, H, W) -> (B, N, D) with a Conv3d over tubes."""

    def __init__(self, dim, patch_size, tubelet_size=None):
        super().__init__()
        if tubelet_size is None:
            self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        else:
            kernel = (tubelet_size, patch_size, patch_size)
            self.proj = nn.Conv3d(3, dim, kernel, stride=kernel)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, [t,] h, w) -> (B, N, D), t-major then row, column


class Encoder(nn.Module):
    """Patch/tube embedding + fixed position table + blocks + final norm: the backbone of all four models.

    pos="3d" (MVD student and classifier), "2d" (image MAE, with MAE's zero row for the cls token) or "1d" (VideoMAE).
    The table is a buffer recomputed for this model's own input size and frame count; it is saved in the state dict
    only where the official module saves it (persistent_pos), and load_checkpoint never reads it from a checkpoint.
    """

    def __init__(self, size="vit_base", img_size=224, patch_size=16, num_frames=16, tubelet_size=2, pos="3d",
                 cls_token=False, final_norm=True, persistent_pos=True, drop_path=0.0, use_checkpoint=False,
                 **overrides):
        super().__init__()
        if size not in VIT_SIZES:
            raise ValueError(f"unknown model size {size!r}: choose one of {', '.join(VIT_SIZES)}")
        cfg = {**VIT_SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}  # depth=2: a test config
        self.dim, self.depth, self.heads = cfg["dim"], cfg["depth"], cfg["heads"]
        self.patch_size, self.tubelet_size, self.use_checkpoint = patch_size, tubelet_size, use_checkpoint
        image = pos == "2d"
        self.grid = (img_size // patch_size,) * 2 if image else (num_frames // tubelet_size,) + (img_size // patch_size,) * 2
        self.patch_embed = PatchEmbed(self.dim, patch_size, None if image else tubelet_size)
        table = {"3d": lambda: sincos_3d(self.dim, *self.grid), "2d": lambda: sincos_2d(self.dim, *self.grid),
                 "1d": lambda: sinusoid_1d(self.dim, math.prod(self.grid))}[pos]()
        if image and cls_token:
            table = torch.cat([torch.zeros(1, self.dim), table])  # MAE's table has a zero row for the cls token
        self.register_buffer("pos_embed", table[None], persistent=persistent_pos)  # (1, [1+]N, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim)) if cls_token else None
        self.blocks = nn.ModuleList(Block(self.dim, self.heads, dp)  # drop path rising from 0
                                    for dp in torch.linspace(0, drop_path, self.depth).tolist())
        self.norm = nn.LayerNorm(self.dim, eps=1e-6) if final_norm else nn.Identity()

    def embed(self, x, mask=None):  # (B, 3, [T,] H, W) -> (B, [1+]N_vis, D)
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, -x.shape[1]:].to(x.dtype)  # MAE's cls row is zero: the cls token gets nothing
        if mask is not None:
            x = x[~mask].reshape(x.shape[0], -1, self.dim)  # keep the visible tokens, in token order
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def forward_features(self, x, mask=None, final_norm=True):
        x = run_blocks(self.blocks, self.embed(x, mask), self.use_checkpoint)
        return self.norm(x) if final_norm else x


def init_weights(module):
    """The official pretraining init: xavier-uniform linear layers (patch embeddings as flattened linears), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if "token" in name:
            nn.init.trunc_normal_(p, std=0.02)


class Decoder(nn.Module):
    """Shallow transformer over [visible, mask tokens]; predicts only at the last num_masked (masked) positions."""

    def __init__(self, dim, depth, heads, out_dim, drop_path=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, dp) for dp in torch.linspace(0, drop_path, depth).tolist())
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x, num_masked, use_checkpoint=False):  # (B, N, Dd) -> (B, N_mask, out_dim)
        x = run_blocks(self.blocks, x, use_checkpoint)
        return self.head(self.norm(x[:, -num_masked:]))


def visible_then_masked(x_vis, mask, mask_token, pos):
    """Decoder input: cat([x_vis + pos[visible], mask_token + pos[masked]]); (B, N_vis, Dd) -> (B, N, Dd)."""
    B, _, Dd = x_vis.shape
    pos = pos.to(x_vis.dtype).expand(B, -1, -1)
    pos_vis, pos_mask = pos[~mask].reshape(B, -1, Dd), pos[mask].reshape(B, -1, Dd)
    return torch.cat([x_vis + pos_vis, mask_token.to(x_vis.dtype) + pos_mask], dim=1)


# ------------------- Patches and pixels: the normalized-pixel targets of the teachers' pretraining, and pictures
def patchify(x, p, tubelet=1):
    """(B, C, T, H, W) -> (B, N, tubelet*p*p*C): the values of each tube (of each patch if tubelet 1) in (p0 p1 p2 c)
    order, tokens t-major; images go in as (B, C, 1, H, W). The pixel order of MAE's and VideoMAE's targets."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // tubelet, tubelet, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, -1, tubelet * p * p * C)  # (B, t, h, w, tubelet, p, p, C) -> (B, N, tubelet*p*p*C)


def unpatchify(x, grid, p, tubelet=1):
    """The inverse of patchify: (B, N, tubelet*p*p*C) on the token grid (t, h, w) -> (B, C, t*tubelet, h*p, w*p)."""
    (t, h, w), B = grid, x.shape[0]
    x = x.reshape(B, t, h, w, tubelet, p, p, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, t, tubelet, h, p, w, p)
    return x.reshape(B, -1, t * tubelet, h * p, w * p)


def paint_tokens(values, grid, p, tubelet):
    """For pictures: (B, N, C) one value per token -> (B, t, C, h*p, w*p), each token's values over its patch, one
    picture per time step (tubes span `tubelet` frames: it is drawn on the first)."""
    return unpatchify(values.repeat(1, 1, tubelet * p * p), grid, p, tubelet)[:, :, ::tubelet].transpose(1, 2)


def to_pixels(x):
    """Undo the ImageNet normalization: (B, 3, [T,] H, W) -> 0-1 pixels, float32."""
    shape = (1, 3) + (1,) * (x.ndim - 2)
    return x.float() * x.new_tensor(IMAGENET_STD).view(shape) + x.new_tensor(IMAGENET_MEAN).view(shape)


def image_mae_targets(images, p):
    """MAE: each patch normalized by the mean and (unbiased) variance of all its p*p*3 values."""
    x = patchify(images[:, :, None], p).float()  # (B, L, p*p*3)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def video_mae_targets(video, p, tubelet, normalize=True):
    """VideoMAE: undo the ImageNet normalization, then each tube normalized per channel over its tubelet*p*p positions
    ((x - mean) / (unbiased std + 1e-6); normalize=False keeps the 0-1 pixels, as the official --normlize_target
    False), flattened in (p0 p1 p2 c) order. (B, 3, T, H, W) -> (B, N, tubelet*p*p*3)."""
    x = patchify(to_pixels(video), p, tubelet)
    x = x.view(*x.shape[:2], -1, 3)  # (B, N, positions, C)
    if normalize:
        x = (x - x.mean(-2, keepdim=True)) / (x.var(-2, keepdim=True).sqrt() + 1e-6)
    return x.flatten(2)


def pca_colours(tokens):
    """A colour map fitted on feature tokens (M, D), for pictures: centre them, project on their top 3 principal
    directions (right singular vectors) and map each component's +-2 std to 0-1. Returns the map (..., D) -> (..., 3),
    one fixed basis and scaling, so that a teacher's features and a student's predictions share the colours."""
    mean = tokens.mean(0)
    _, s, vh = torch.linalg.svd(tokens - mean, full_matrices=False)  # tokens - mean = U diag(s) Vh
    four_std = (4 * s[:3] / (len(tokens) - 1) ** 0.5).clamp_min(1e-12)  # a component's std is s / sqrt(M - 1)
    return lambda x: (0.5 + (x - mean) @ vh[:3].T / four_std).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------ The four models
class ImageMAE(Encoder):
    """Image MAE (He et al.) = the image teacher. Encoder keys at the top level, decoder under MAE's own names.
    decoder_depth=0 builds the encoder alone (a frozen teacher needs no pixel decoder)."""

    def __init__(self, size="vit_base", img_size=224, patch_size=16, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                 drop_path=0.0, **overrides):
        super().__init__(size, img_size, patch_size, pos="2d", cls_token=True, drop_path=drop_path, **overrides)
        if decoder_depth:  # else a teacher only: the encoder, as in MAE's released encoder-only checkpoints
            self.decoder_embed = nn.Linear(self.dim, decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            table = torch.cat([torch.zeros(1, decoder_dim), sincos_2d(decoder_dim, *self.grid)])
            self.register_buffer("decoder_pos_embed", table[None])  # (1, 1+L, Dd)
            self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
            self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
            self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        init_weights(self)

    def teacher_features(self, images):  # (B, 3, H, W) -> (B, L, D)
        return self.forward_features(images, final_norm=False)[:, 1:]  # cls token dropped

    def official_state_dict(self):  # what checkpoints hold: timm's qkv.bias, read by the official MAE and MVD code
        return to_timm_layout(self.state_dict())

    def video_features(self, video, frame_stride=2):
        """Teacher features of every frame_stride-th frame of a clip, in the student's tube order.
        (B, 3, T, H, W) -> (B, T/frame_stride * L, D). The 2D patch embedding runs as a Conv3d of temporal size 1 and
        stride frame_stride over the clip itself, so the frames are never gathered into an image batch (no copy)."""
        w = self.patch_embed.proj.weight.unsqueeze(2)  # (D, 3, p, p) -> (D, 3, 1, p, p)
        p = self.patch_size
        x = F.conv3d(video, w, self.patch_embed.proj.bias, stride=(frame_stride, p, p))  # (B, D, t, h, w)
        B, _, t = x.shape[:3]
        x = x.flatten(3).permute(0, 2, 3, 1).reshape(B * t, -1, self.dim)  # (B, D, t, L) -> (B*t, L, D)
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        x = torch.cat([self.cls_token.expand(B * t, -1, -1).to(x.dtype), x], dim=1)
        x = run_blocks(self.blocks, x)[:, 1:]  # (B*t, L, D)
        return x.reshape(B, -1, self.dim)  # (B, t*L, D): frame-major, then row, column = the student's tube order

    def forward(self, images, mask_ratio=0.75, mask=None):
        """MAE pretraining step: -> (loss, pred (B, L, p*p*3) for every patch, mask (B, L)). A mask may be given."""
        B, L = images.shape[0], math.prod(self.grid)
        if mask is None:  # MAE's per-sample random masking of L - int(L * (1 - ratio)) tokens
            keep = int(L * (1 - mask_ratio))
            ranks = torch.rand(B, L, device=images.device).argsort(1).argsort(1)
            mask = ranks >= keep
        x = self.decoder_embed(self.forward_features(images, mask))  # (B, 1+N_vis, Dd)
        tokens = self.mask_token.to(x.dtype).expand(B, L, -1).clone()  # (B, L, Dd) in patch order
        tokens[~mask] = x[:, 1:].reshape(-1, x.shape[-1])
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = run_blocks(self.decoder_blocks, x, self.use_checkpoint)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, p*p*3)
        loss = ((pred.float() - image_mae_targets(images, self.patch_size)) ** 2).mean(-1)  # (B, L)
        return (loss * mask).sum() / mask.sum(), pred, mask


class VideoMAE(nn.Module):
    """VideoMAE (Tong et al.) = the video teacher: encoder on visible tubes, a pixel decoder over all tubes.
    decoder_depth=0 builds the encoder alone (a frozen teacher needs no pixel decoder)."""

    def __init__(self, size="vit_base", num_frames=16, img_size=224, patch_size=16, tubelet_size=2, decoder_dim=None,
                 decoder_depth=None, decoder_heads=None, drop_path=0.0, use_checkpoint=False, normalize_target=True,
                 pos="1d", **overrides):
        super().__init__()
        self.normalize_target = normalize_target
        self.encoder = Encoder(size, img_size, patch_size, num_frames, tubelet_size, pos=pos, persistent_pos=False,
                               drop_path=drop_path, use_checkpoint=use_checkpoint, **overrides)
        dd, depth, heads = VIDEOMAE_DECODER[size]
        dd, depth, heads = decoder_dim or dd, depth if decoder_depth is None else decoder_depth, decoder_heads or heads
        if depth:  # else a teacher only: the encoder
            self.encoder_to_decoder = nn.Linear(self.encoder.dim, dd, bias=False)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            table = sinusoid_1d(dd, math.prod(self.encoder.grid)) if pos == "1d" else sincos_3d(dd, *self.encoder.grid)
            self.register_buffer("pos_embed", table[None], persistent=False)
            self.decoder = Decoder(dd, depth, heads, tubelet_size * patch_size * patch_size * 3, drop_path)
        init_weights(self)

    def teacher_features(self, video):  # (B, 3, T, H, W) -> (B, N, D) on the whole, unmasked clip
        return self.encoder.forward_features(video, final_norm=False)

    def forward(self, video, mask):  # -> (loss, pred (B, N_mask, tubelet*p*p*3))
        x = self.encoder_to_decoder(self.encoder.forward_features(video, mask))  # (B, N_vis, Dd)
        num_masked = int(mask[0].sum())
        pred = self.decoder(visible_then_masked(x, mask, self.mask_token, self.pos_embed), num_masked,
                            self.encoder.use_checkpoint)
        target = video_mae_targets(video, self.encoder.patch_size, self.encoder.tubelet_size, self.normalize_target)
        target = target[mask].reshape(video.shape[0], num_masked, -1)
        return F.mse_loss(pred.float(), target), pred


class MVDStudent(Encoder):
    """The MVD student: encoder on the visible 10% of tubes, and one feature decoder per teacher (the same class twice:
    `down_img`, `mask_token_img`, `pos_embed_img`, `decoder_img`, and the same with `_vid`). A teacher dimension of 0
    builds no decoder for that teacher (single-teacher ablations)."""

    def __init__(self, size="vit_small", num_frames=16, img_size=224, decoder_depth=2, img_teacher_dim=768,
                 vid_teacher_dim=768, patch_size=16, tubelet_size=2, decoder_dim=None, decoder_heads=None,
                 drop_path=0.0, use_cls_token=False, use_checkpoint=False, **overrides):
        super().__init__(size, img_size, patch_size, num_frames, tubelet_size, pos="3d", cls_token=use_cls_token,
                         drop_path=drop_path, use_checkpoint=use_checkpoint, **overrides)
        dd, heads = decoder_dim or self.dim, decoder_heads or self.heads
        self.teachers = [name for name, dim in (("img", img_teacher_dim), ("vid", vid_teacher_dim)) if dim]
        for name, out_dim in (("img", img_teacher_dim), ("vid", vid_teacher_dim)):
            if out_dim:
                setattr(self, f"mask_token_{name}", nn.Parameter(torch.zeros(1, 1, dd)))
                setattr(self, f"down_{name}", nn.Linear(self.dim, dd))
                setattr(self, f"decoder_{name}", Decoder(dd, decoder_depth, heads, out_dim, drop_path))
                self.register_buffer(f"pos_embed_{name}", sincos_3d(dd, *self.grid)[None])
        init_weights(self)

    def forward(self, video, mask):
        """(B, 3, T, H, W), mask (B, N) -> (pred_img, pred_vid), each (B, N_mask, teacher dim) or None if not built."""
        x = self.forward_features(video, mask)  # (B, [1+]N_vis, D)
        if self.cls_token is not None:  # a cls token goes first into each decoder, without a position
            cls, x = x[:, :1], x[:, 1:]
        num_masked = int(mask[0].sum())
        preds = {}
        for name in self.teachers:
            down = getattr(self, f"down_{name}")
            tokens = visible_then_masked(down(x), mask, getattr(self, f"mask_token_{name}"),
                                         getattr(self, f"pos_embed_{name}"))
            if self.cls_token is not None:
                tokens = torch.cat([down(cls), tokens], dim=1)
            preds[name] = getattr(self, f"decoder_{name}")(tokens, num_masked, self.use_checkpoint)
        return preds.get("img"), preds.get("vid")


class VideoClassifier(Encoder):
    """Fine-tuning model: encoder on the whole clip, mean over tokens, fc_norm, dropout, linear head (official layout:
    no final `norm`). pos="1d" fine-tunes VideoMAE checkpoints with the table they were trained with."""

    def __init__(self, size="vit_base", num_classes=400, num_frames=16, img_size=224, patch_size=16, tubelet_size=2,
                 drop_path=0.0, head_drop=0.0, init_scale=0.001, pos="3d", use_checkpoint=False, **overrides):
        super().__init__(size, img_size, patch_size, num_frames, tubelet_size, pos=pos, final_norm=False,
                         persistent_pos=False, drop_path=drop_path, use_checkpoint=use_checkpoint, **overrides)
        self.fc_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.fc_dropout = nn.Dropout(head_drop)
        self.head = nn.Linear(self.dim, num_classes)
        for m in self.modules():  # the official fine-tuning init: truncated normal 0.02, head scaled down
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)

    def features(self, video):  # (B, 3, T, H, W) -> (B, D) pooled features
        return self.fc_norm(self.forward_features(video).mean(1))

    def forward(self, video):  # -> logits (B, num_classes)
        return self.head(self.fc_dropout(self.features(video)))


# ---------------------------------------------------------------------------------------------------------- Checkpoints
PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, some released checkpoints


def is_position_table(key):
    return key.rsplit(".", 1)[-1] in ("pos_embed", "pos_embed_img", "pos_embed_vid", "decoder_pos_embed")


def to_timm_layout(state_dict):
    """Our q_bias/v_bias -> timm's qkv.bias with a zero key part: the layout the official MAE/MVD code reads."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.q_bias"):
            out[key[:-len("q_bias")] + "qkv.bias"] = torch.cat(
                [value, torch.zeros_like(value), state_dict[key[:-len("q_bias")] + "v_bias"]])
        elif not key.endswith("attn.v_bias"):
            out[key] = value
    return out


def read_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint is data, never code. One clear error line on failure."""
    try:  # the official training scripts also pickle their argparse.Namespace: that much is allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist: check the path") from None
    except Exception as e:  # truncated files, pickles that would run code, non-checkpoint files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch's message carries terminal colour codes
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the cause, inside torch's long advice
        first = unpickler[1].strip() if unpickler else text.splitlines()[0] if text else type(e).__name__
        raise ValueError(f"cannot read checkpoint {path} as plain weights ({first}); it is damaged or not a PyTorch "
                         "checkpoint: re-download or re-save it with torch.save(state_dict)") from None


def saved_args(state):
    """The training flags a checkpoint records, as a dict: ours store a dict, the official scripts an argparse.Namespace
    (MAE, VideoMAE, MVD), weight-only files none ({})."""
    args = state.get("args") if isinstance(state, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})


def check_trained_with(what, recorded, key, value, default, flag=None):
    """One clear error where a checkpoint's recorded flags (saved_args) hold another `key` than this run's value;
    `default`: what a checkpoint that records none is taken to have (an official VideoMAE: the 1d table)."""
    trained = recorded.get(key, default)
    if trained != value:
        raise ValueError(f"{what} was trained with --{key} {trained}, this run has {value}: pass --{flag or key} "
                         f"{trained}")


def trained_checkpoint(args):
    """The checkpoint --visualize shows: --resume, else OUTPUT_DIR/checkpoint-last.pth; one clear error without one."""
    path = args.resume or os.path.join(args.output_dir, "checkpoint-last.pth")
    if not os.path.exists(path):
        raise ValueError(f"--visualize shows a trained model, but {path} does not exist: train this stage first (the "
                         "same --output_dir) or give --resume PATH")
    return path


def load_checkpoint(model, path_or_state_dict, verbose=True, fresh=()):
    """Load weights in any layout of SPEC into model; returns (missing, unexpected) key lists and prints one report.
    Nesting under 'model'/'module'/'state_dict', prefixes module./_orig_mod./backbone., encoder. (added or removed to fit
    the model) and timm's qkv.bias are handled; position tables are never read (the model's own are kept). A tensor
    named in `fresh` whose shape differs from the model's is dropped, said in a line: that one starts fresh."""
    state = read_checkpoint(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else path_or_state_dict
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in ("model", "module", "state_dict")):
        state = next(state[k] for k in ("model", "module", "state_dict") if isinstance(state.get(k), dict))
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("checkpoint holds no state dict of tensors (looked under 'model', 'module', 'state_dict')")
    own = model.state_dict()
    wants_encoder_prefix = any(k.startswith("encoder.") for k in own)
    clean = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        if is_position_table(key):
            continue
        if key.endswith("attn.qkv.bias"):  # timm layout: split into q and v parts, the key part cannot matter
            q, _, v = value.chunk(3)
            pieces = {key[:-len("qkv.bias")] + "q_bias": q, key[:-len("qkv.bias")] + "v_bias": v}
        else:
            pieces = {key: value}
        for key, value in pieces.items():
            if key.startswith("encoder.") and not wants_encoder_prefix:
                key = key[len("encoder."):]
            elif wants_encoder_prefix and "encoder." + key in own:
                key = "encoder." + key
            clean[key] = value
    for key, value in list(clean.items()):
        if key in own and own[key].shape != value.shape and key in fresh:
            print(f"dropping the checkpoint's {key} {tuple(clean.pop(key).shape)}: this model's is "
                  f"{tuple(own[key].shape)}, it starts fresh")
        elif key in own and own[key].shape != value.shape:
            raise ValueError(f"checkpoint tensor '{key}' has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(own[key].shape)}: check --model, --input_size, --num_frames and --patch_size")
    fill = {k: v for k, v in own.items() if is_position_table(k)}  # keep the model's own tables
    missing, unexpected = model.load_state_dict({**clean, **fill}, strict=False)
    if verbose:
        loaded = len([k for k in clean if k in own])
        print(f"load_checkpoint: {loaded} tensors loaded; missing {len(missing)}: {summarize(missing)}; "
              f"unexpected {len(unexpected)}: {summarize(unexpected)}")
    return missing, unexpected


def summarize(keys):
    """'decoder.blocks.0.norm1.weight', ... -> 'decoder.* (57)': one entry per top-level module."""
    groups = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(v[0] if len(v) == 1 else f"{k}.* ({len(v)})" for k, v in groups.items()) or "-"


def save_checkpoint(path, **state):
    """Atomic save: write a temporary file in the same folder, flush and fsync it, then rename it over `path`. A run
    killed at any moment leaves either the old or the new checkpoint, never half of one. Weights go under 'model'."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"  # one name: the file a process killed mid-write leaves is overwritten by the next save
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # disk full, killed mid-write: leave no half file behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        # a full disk: OSError ENOSPC, or torch's writer failing ("unexpected pos", "file write failed")
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or isinstance(e, RuntimeError) and re.search(
                "unexpected pos|write failed|inline_container", str(e)):
            raise ValueError(disk_full(folder, os.path.basename(path))) from None
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def disk_full(folder, what):
    """The line for a full disk: `folder`, its free space, what was not written, the last good checkpoint (the newest
    whole one there: a failed save leaves no temporary)."""
    good = max((entry.path for entry in os.scandir(folder) if entry.name.endswith(".pth")), key=os.path.getmtime,
               default="none")
    return (f"{folder} is full ({shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free): {what} was not written; "
            f"the last good checkpoint is {good}: free space, then resume")


def one_line(error, output_dir):
    """What a stage's command line prints for an error it expects: its message, or for a full disk while a log,
    features or pictures were written (OSError ENOSPC) disk_full's line. Any other OSError goes on as a traceback."""
    if isinstance(error, OSError) and error.errno != errno.ENOSPC:
        raise error
    return disk_full(output_dir, error.filename or "a file") if isinstance(error, OSError) else str(error)


# ---------------------------------------------------------------- Optimizer parameter groups and learning-rate schedule
def layer_id(name, depth):
    """Layer of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, everything after -> depth + 1."""
    name = name.removeprefix("encoder.")
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=None, depth=None):
    """AdamW groups: no weight decay on 1-D tensors (biases, norms, q/v biases) and tokens; optional layer-wise lr decay,
    where layer i gets lr_scale = layer_decay ** (depth + 1 - i) (as the official fine-tuning)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim < 2 or "token" in name else weight_decay
        layer = layer_id(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        groups.setdefault((decay, layer), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def cosine_schedule(step, total_steps, warmup_steps, base_lr, min_lr):
    """Per-iteration learning rate as the official code: 1) linear warmup from 0; 2) cosine from base_lr to min_lr."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------ Training plumbing shared by the three stages: devices and DDP, resume, one epoch of optimizer steps
@functools.cache
def torchrun_store():
    """torchrun's store (env://), keys under this attempt's number: --max-restarts keeps one store for all attempts, and
    a restarted rank could read the address a killed rank had published, and hang (pytorch/pytorch#135712). One per
    process, kept. -> (store, rank, world_size)"""
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"attempt{attempt}/", store), rank, world_size


def setup_distributed(precision):
    """One device path: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (gloo on CPU, nccl on CUDA); plain python runs one
    process. Returns a namespace with ddp, rank, world_size, device, is_main, the autocast dtype and a GradScaler
    (enabled for fp16 only: bf16 and fp32 need no loss scaling)."""
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    rank, world, device = 0, 1, torch.device("cuda" if cuda else "cpu")
    if ddp:
        store, rank, world = torchrun_store()
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())  # gloo's threads left
        # running at exit can abort the process
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
    kernels = None if cuda else cpu_kernels()  # every rank, now: under torchrun rank 0 measures for all
    if kernels and precision == "fp16" and not kernels.fp16:
        raise ValueError("--precision fp16: this CPU has no fp16 matrix units, so every product would be emulated "
                         "(~50x slower than fp32): use --precision auto, bf16 or fp32")
    if not cuda and precision == "bf16" and rank == 0 and auto_precision(cuda=False)[0] != "bf16":
        print(f"WARNING: --precision bf16: {auto_precision(cuda=False)[1]}; --precision auto picks fp32 here", flush=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return SimpleNamespace(ddp=ddp, rank=rank, world_size=world, device=device, is_main=rank == 0, dtype=dtype,
                           scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"))


def resume(args, env, model, optimizer):
    """--resume PATH, or with --auto_resume OUTPUT_DIR/checkpoint-last.pth when it exists: restore model, optimizer and
    scaler. -> where to continue, SimpleNamespace(epoch, step, sums, count): the optimizer steps already done in that
    epoch and the running sums of its log line (from a checkpoint written mid-epoch), else step 0 of the next epoch."""
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    path = args.resume or (last if args.auto_resume and os.path.exists(last) else None)
    if path is None:  # a fresh run
        return SimpleNamespace(epoch=0, step=0, sums={}, count=0)
    state = read_checkpoint(path)
    if not all(k in state for k in ("model", "optimizer", "epoch")):
        raise ValueError(f"{path} is not a training checkpoint of this stage (no optimizer/epoch): to start from its "
                         "weights use the stage's weight flag instead of --resume, or pass --no-auto_resume")
    mid_epoch = "step" in state  # written inside an epoch, else at its end
    # One rule, inside an epoch and at its end: the checkpoint's --num_sample and total batch of videos. Together they
    # set the lr (it follows the total batch of clips in pretraining and distillation, of videos in fine-tuning, as the
    # official) and its schedule, and which samples each step sees.
    check_trained_with(path, saved_args(state), "num_sample", args.num_sample, 1)
    total_batch = args.batch_size * args.update_freq * env.world_size
    if state.get("total_batch", total_batch) != total_batch:  # end-of-epoch checkpoints of older runs record none
        raise ValueError(f"{path} was trained with a total batch of {state['total_batch']} videos, this run's is "
                         f"{total_batch} ({env.world_size} x {args.batch_size} x {args.update_freq}): another lr and "
                         f"other steps; restart with processes x --batch_size x --update_freq = {state['total_batch']}")
    start = SimpleNamespace(epoch=state["epoch"] if mid_epoch else state["epoch"] + 1, step=state.get("step", 0),
                            sums=state.get("sums", {}), count=state.get("count", 0))
    load_checkpoint(model, state["model"], verbose=False)
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        env.scaler.load_state_dict(state["scaler"])
    log = os.path.join(args.output_dir, "log.txt")
    if os.path.exists(log) and env.is_main:  # drop lines of an epoch logged, then killed before its checkpoint:
        with open(log) as f:  # that epoch runs again and logs again (lines without an epoch are kept)
            lines = [line for line in f if int((re.search(r'"epoch": (\d+)', line) or [0, -1])[1]) < start.epoch]
        with open(log, "w") as f:
            f.writelines(lines)
    print(f"resumed from {path}: epoch {state['epoch']} {f'at optimizer step {start.step}' if mid_epoch else 'done'}")
    return start


def save_training_state(args, model, optimizer, scaler, epoch, progress=None):
    """checkpoint-last.pth every epoch, checkpoint-{epoch}.pth every --save_ckpt_freq; weights in the official layout,
    the total batch of videos (resume() holds a resumed run to it). progress: dict(step, sums, count) for a
    checkpoint-last.pth written inside the epoch."""
    weights = model.official_state_dict() if hasattr(model, "official_state_dict") else model.state_dict()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    state = dict(model=weights, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                 total_batch=args.batch_size * args.update_freq * world_size, **(progress or {}),
                 args={k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in vars(args).items()})
    # checkpoint-{epoch}.pth first: a run killed between the two writes redoes the epoch and writes both
    if progress is None and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):
        save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"), **state)
    save_checkpoint(os.path.join(args.output_dir, "checkpoint-last.pth"), **state)


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(args, env, model, loader, optimizer, epoch, loss_fn, start, evaluate=None):
    """One epoch of optimizer steps, loss_fn(batch) -> (loss, {name: float}) under autocast, then evaluate(epoch) ->
    {name: value} if given (every rank), then rank 0's log.txt line (train_ + each mean, and evaluate's) and checkpoint.
    Gradients accumulate over --update_freq micro-batches (DDP syncs on the last); the lr follows cosine_schedule per
    optimizer step; a non-finite loss stops the run before its step. Exact continuation: every --save_every_steps /
    --save_every_minutes rank 0 writes checkpoint-last.pth with the steps done and the log's sums, which resume() gives
    back as `start`: those steps' samples are left out, unread. No RNG state is saved: a step's randomness (drop path,
    dropout, mixup) is seeded from (seed, step, rank), a sample's from (seed, epoch, index) (data.py)."""
    raw = model.module if env.ddp else model  # what checkpoints hold
    steps_per_epoch = len(loader) // args.update_freq
    micro_batches = steps_per_epoch * args.update_freq
    done, sums, count = (start.step, dict(start.sums), start.count) if epoch == start.epoch else (0, {}, 0)
    first = done * args.update_freq  # micro-batches already done in this epoch
    loader.sampler.set_epoch(epoch, skip=first * args.batch_size)
    model.train()
    begin = last_save = ready = time.time()
    waited = 0.0  # seconds spent waiting for the loader: an epoch at the model's pace waits little
    for i, batch in enumerate(itertools.islice(loader, micro_batches - first), start=first):
        waited += time.time() - ready
        step = epoch * steps_per_epoch + i // args.update_freq  # global optimizer step
        if i % args.update_freq == 0:
            torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + env.rank)
            for group in optimizer.param_groups:
                group["lr"] = group.get("lr_scale", 1.0) * cosine_schedule(
                    step, args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch, args.lr, args.min_lr)
        last_micro = (i + 1) % args.update_freq == 0
        sync = model.no_sync if env.ddp and not last_micro else contextlib.nullcontext  # a new context at each use
        with sync(), torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32):
            loss, logs = loss_fn(batch)
        check = loss.detach().float().reshape(1).clone()  # all_reduce works in place: a copy, not a view of the loss
        if env.ddp:  # every rank must stop together, or the others would hang in the next all-reduce
            dist.all_reduce(check)
        if not torch.isfinite(check).all():
            raise NonFiniteLoss(f"loss is {check.item()} at epoch {epoch}, step {i} (global step {step}): stopping; "
                                f"the last good checkpoint in {args.output_dir} is untouched. Try a lower --lr, "
                                "--clip_grad 1.0 or --precision fp32")
        with sync():
            env.scaler.scale(loss / args.update_freq).backward()
        logs = {"loss": loss.item(), **logs}
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if last_micro:
            if args.clip_grad:
                env.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            env.scaler.step(optimizer)
            env.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = (i + 1) // args.update_freq
            due = (args.save_every_steps and done % args.save_every_steps == 0 or
                   args.save_every_minutes and time.time() - last_save >= 60 * args.save_every_minutes)
            if env.is_main and due and done < steps_per_epoch:  # the epoch's end has its own checkpoint
                save_training_state(args, raw, optimizer, env.scaler, epoch, dict(step=done, sums=sums, count=count))
                last_save = time.time()
        if env.is_main and (i + 1) % args.log_every == 0:
            elapsed, this_run = time.time() - begin, i + 1 - first
            clips_s = this_run * args.batch_size * args.num_sample * env.world_size / elapsed  # R clips a video
            eta = elapsed / this_run * (micro_batches - i - 1)
            print(f"epoch {epoch} step {i + 1}/{micro_batches} "
                  + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                  + f" lr {optimizer.param_groups[0]['lr']:.2e} clips/s {clips_s:.2f} eta {eta:.0f}s", flush=True)
        ready = time.time()
    if env.is_main:
        print(f"epoch {epoch}: {micro_batches - first} steps in {time.time() - begin:.1f} s, {waited:.1f} s of them "
              "waiting for data", flush=True)
    stats = {**{f"train_{k}": v / max(1, count) for k, v in sums.items()}, **(evaluate(epoch) if evaluate else {})}
    if env.is_main:  # killed after the line, before the checkpoint: the epoch runs again, resume() drops the line
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps({"epoch": epoch, **stats}) + "\n")
        save_training_state(args, raw, optimizer, env.scaler, epoch)
    return stats


def training_step(env, loss_fn, optimizer):
    """One optimizer step as train_one_epoch takes it (autocast, grad scaler), on whatever loss_fn() computes: the
    unit that --bench times."""
    def step():
        with torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32):
            loss = loss_fn()
        env.scaler.scale(loss).backward()
        env.scaler.step(optimizer)
        env.scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def bench_steps(step_fn, steps, clips_per_step):
    """--bench: one warm-up call, then `steps` timed calls. -> dict(step_s (median), clips_per_s, peak_rss_mb and, on
    CUDA, peak_gpu_mb, on a CPU its fast paths' timings). CUDA runs asynchronously: each timed call ends when the GPU
    is done."""
    import resource
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
                **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)} if cuda else
                   {"cpu_fast_paths": cpu_kernels().summary}))
