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
import datetime
import errno
import functools
import itertools
import json
import math
import mmap
import os
import re
import shutil
import socket
import time
import warnings
import zipfile
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


# --------------------------------------------------------------------------------- Building blocks shared by all models
class Attention(nn.Module):
    """Multi-head self-attention with the official parameters: qkv weight without bias plus learned q_bias and v_bias.
    The key bias is fixed at zero: it adds the same term to every logit of a query, so the softmax ignores it."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads: pick a width that is (e.g. --decoder_dim)")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


# Stochastic depth (timm's DropPath in the official code): in training, drop the residual branch of whole samples with
# probability p and scale the kept ones by 1/(1-p). DropPath(p) -> a module.
DropPath = functools.partial(torchvision.ops.StochasticDepth, mode="row")


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # the exact GELU


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch under DropPath."""

    def __init__(self, dim, heads, drop_path=0.0, eps=1e-6):  # eps: the original code's; transformers' VideoMAE 1e-12
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
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
        kernel = patch_size if tubelet_size is None else (tubelet_size, patch_size, patch_size)
        self.proj = (nn.Conv2d if tubelet_size is None else nn.Conv3d)(3, dim, kernel, stride=kernel)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, [t,] h, w) -> (B, N, D), t-major then row, column


class Encoder(nn.Module):
    """Patch/tube embedding + fixed position table + blocks + final norm: the backbone of all four models.

    pos="3d" (MVD student and classifier), "2d" (image MAE, with MAE's zero row for the cls token) or "1d" (VideoMAE).
    The table is a buffer recomputed for this model's own input size and frame count; it is saved in the state dict
    only where the official module saves it (persistent_pos), and load_checkpoint never reads it from a checkpoint.
    """

    def __init__(self, size="vit_base", img_size=224, patch_size=16, num_frames=16, tubelet_size=2, pos="3d",
                 cls_token=False, final_norm=True, persistent_pos=True, drop_path=0.0, use_checkpoint=False, eps=1e-6,
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
        self.blocks = nn.ModuleList(Block(self.dim, self.heads, dp, eps)  # drop path rising from 0
                                    for dp in torch.linspace(0, drop_path, self.depth).tolist())
        self.norm = nn.LayerNorm(self.dim, eps=eps) if final_norm else nn.Identity()

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
        """Teacher features of every frame_stride-th frame of a clip (0, 2, 4, ...), each frame an image, in the
        student's tube order: (B, 3, T, H, W) -> (B, T/frame_stride * L, D)."""
        frames = video[:, :, ::frame_stride].transpose(1, 2).flatten(0, 1)  # (B*t, 3, H, W), clip by clip
        return self.teacher_features(frames).reshape(video.shape[0], -1, self.dim)  # frame-major, then row, column

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


# ---------------------------------- The teachers' targets: normalized pixels of each patch (MAE) or tube (VideoMAE)
def patchify(x, p, tubelet=1):
    """(B, C, T, H, W) -> (B, N, tubelet*p*p*C): the values of each tube (of each patch if tubelet 1) in (p0 p1 p2 c)
    order, tokens t-major; images go in as (B, C, 1, H, W). The pixel order of MAE's and VideoMAE's targets."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // tubelet, tubelet, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, -1, tubelet * p * p * C)  # (B, t, h, w, tubelet, p, p, C) -> (B, N, tubelet*p*p*C)


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


# ---------------------------------------------------------------------------------------------------------- Checkpoints
PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, some released checkpoints
POSITION_TABLES = ("pos_embed", "pos_embed_img", "pos_embed_vid", "decoder_pos_embed")  # never read: the model's own
SAFETENSORS_DTYPES = dict(F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, I64=torch.int64,
                          I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8, BOOL=torch.bool)
# transformers' ViTMAE / VideoMAE names -> ours, applied in order (docs/details.md has the table)
HUB_RENAMES = [(r"^(vit|videomae)\.", ""), (r"embeddings\.patch_embeddings\.projection", "patch_embed.proj"),
               (r"^embeddings\.cls_token", "cls_token"), (r"^embeddings\.position_embeddings", "pos_embed"),
               (r"^encoder\.layer\.", "blocks."), (r"layernorm_before", "norm1"), (r"layernorm_after", "norm2"),
               (r"attention\.output\.dense", "attn.proj"), (r"attention\.attention\.", "attn."),
               (r"attn\.query\.bias", "attn.q_bias"), (r"attn\.value\.bias", "attn.v_bias"),
               (r"intermediate\.dense", "mlp.fc1"), (r"output\.dense", "mlp.fc2"), (r"^layernorm\.", "norm."),
               (r"^classifier\.", "head.")]
HUB_DECODER = {"vit_mae": [(r"^decoder\.decoder_layers\.", "decoder_blocks."), (r"^decoder\.", "")],  # MAE's names
               "videomae": [(r"^decoder\.decoder_layers\.", "decoder.blocks."),  # VideoMAE's: encoder under encoder.
                            (r"^(patch_embed|blocks|norm)\.", r"encoder.\1.")]}


def to_timm_layout(state_dict):
    """Our q_bias/v_bias -> timm's qkv.bias with a zero key part: the layout the official MAE/MVD code reads."""
    out = {}
    for key, value in state_dict.items():
        pre = key.removesuffix("q_bias")
        if key.endswith("attn.q_bias"):
            out[pre + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), state_dict[pre + "v_bias"]])
        elif not key.endswith("attn.v_bias"):
            out[key] = value
    return out


def read_safetensors(path):
    """{name: tensor} of a .safetensors file (8-byte header length, JSON header, raw bytes) as views of one private
    memory map of the file: pages are read as used, never copied twice."""
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(start - 8)), mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return {name: (torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[t["dtype"]], count=math.prod(t["shape"]),
                                    offset=start + t["data_offsets"][0]) if math.prod(t["shape"]) else  # frombuffer
                   torch.empty(0, dtype=SAFETENSORS_DTYPES[t["dtype"]])).view(t["shape"])  # makes no empty tensor
            for name, t in header.items() if name != "__metadata__"}


def read_hub_folder(path):
    """A transformers folder (config.json + model.safetensors or pytorch_model.bin), or its weights file beside its
    config.json, of ViTMAE (-Model, -ForPreTraining) or VideoMAE (-Model, -ForPreTraining, -ForVideoClassification)
    -> {"model": our state dict, "args": the config as our flags}, as read_checkpoint returns ours. The key bias is
    dropped (the softmax ignores it); what we cannot build exactly is refused in one line."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    names = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")] if folder == path else [path]
    weights = next((n for n in names if os.path.exists(n)), None)
    if not (weights and os.path.exists(os.path.join(folder, "config.json"))):
        raise ValueError(f"{path}: a transformers folder holds config.json and model.safetensors or pytorch_model.bin "
                         "(download both)")
    with open(os.path.join(folder, "config.json")) as f:  # transformers' defaults where a config leaves one out
        c = {**dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                    hidden_act="gelu", patch_size=16, image_size=224, num_frames=16, tubelet_size=2, num_channels=3,
                    layer_norm_eps=1e-12, use_mean_pooling=True), **json.load(f)}
    size = {(v["dim"], v["heads"]): k for k, v in VIT_SIZES.items()}.get((c["hidden_size"], c["num_attention_heads"]))
    state = read_safetensors(weights) if weights.endswith(".safetensors") else read_checkpoint(weights, hub=False)
    differs = [text for bad, text in [
        (c.get("model_type") not in HUB_DECODER, f"model_type {c.get('model_type')!r} (ViTMAE and VideoMAE are read)"),
        (not size, f"hidden_size {c['hidden_size']} with {c['num_attention_heads']} heads (not in VIT_SIZES)"),
        *((c[k] != v, f"{k} {c[k]!r} (ours: {note})") for k, v, note in (
            ("intermediate_size", 4 * c["hidden_size"], "4x"), ("hidden_act", "gelu", "the exact 'gelu'"),
            ("tubelet_size", 2, "2"), ("num_channels", 3, "3"))),
        ("classifier.weight" in state and not c["use_mean_pooling"], "a classifier on token 0 (use_mean_pooling "
                                                                      "false; ours mean-pools the tokens)")] if bad]
    if differs:
        raise ValueError(f"{path} cannot be built exactly here: {'; '.join(differs)}")
    out = {}
    for key, value in state.items():
        for pattern, new in HUB_RENAMES + HUB_DECODER[c["model_type"]]:
            key = re.sub(pattern, new, key)
        out[key] = value
    for pre in [k.removesuffix("query.weight") for k in out if k.endswith("attn.query.weight")]:
        out[pre + "qkv.weight"] = torch.cat([out.pop(f"{pre}{n}.weight") for n in ("query", "key", "value")])
        out.pop(pre + "key.bias", None)
        for bias in ("q_bias", "v_bias"):  # qkv_bias false: zero biases
            out.setdefault(pre + bias, torch.zeros(len(out[pre + "qkv.weight"]) // 3))
    video = dict(num_frames=c["num_frames"], pos_embed="1d") if c["model_type"] == "videomae" else {}
    return {"model": out, "args": dict(model=size, depth=c["num_hidden_layers"], patch_size=c["patch_size"],
                                       input_size=c["image_size"], layer_norm_eps=c["layer_norm_eps"], **video)}


def read_checkpoint(path, hub=True):
    """torch.load with weights_only=True: a checkpoint is data, never code. Memory-mapped: pages are read as used, so
    reading a checkpoint's recorded flags costs nothing (files of torch before 1.6 cannot be mapped). One clear error
    line on failure. A transformers folder, or a weights file with a config.json beside it, goes to read_hub_folder."""
    if hub and (os.path.isdir(path) or str(path).endswith(".safetensors") or str(path).endswith(".bin") and
                os.path.exists(os.path.join(os.path.dirname(path), "config.json"))):
        return read_hub_folder(path)
    try:  # the official training scripts also pickle their argparse.Namespace: that much is allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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


def load_checkpoint(model, path_or_state_dict, verbose=True, fresh=()):
    """Load weights in any layout of SPEC into model (nested, prefixed, timm's qkv.bias, with or without encoder.),
    print one report, return (missing, unexpected). Position tables are never read (the model's own are kept). A tensor
    named in `fresh` whose shape differs from the model's is dropped, said in a line: that one starts fresh."""
    state, own, nests = path_or_state_dict, model.state_dict(), ("model", "module", "state_dict")
    if isinstance(state, (str, os.PathLike)):
        state = read_checkpoint(state)
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in nests):
        state = next(state[k] for k in nests if isinstance(state.get(k), dict))
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("checkpoint holds no state dict of tensors (looked under 'model', 'module', 'state_dict')")
    clean = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        if key.endswith("attn.qkv.bias"):  # timm layout: split into q and v parts, the key part cannot matter
            pre, (q, _, v) = key.removesuffix("qkv.bias"), value.chunk(3)
            clean[pre + "q_bias"], clean[pre + "v_bias"] = q, v
        elif key.rsplit(".", 1)[-1] not in POSITION_TABLES:
            clean[key] = value
    if any(k.startswith("encoder.") for k in own):  # encoder. added or removed to fit the model
        clean = {f"encoder.{k}" if f"encoder.{k}" in own else k: v for k, v in clean.items()}
    else:
        clean = {k.removeprefix("encoder."): v for k, v in clean.items()}
    for key in [k for k, v in clean.items() if k in own and own[k].shape != v.shape]:
        if key not in fresh:
            raise ValueError(f"checkpoint tensor '{key}' has shape {tuple(clean[key].shape)} but the model expects "
                             f"{tuple(own[key].shape)}: check --model, --input_size, --num_frames and --patch_size")
        print(f"dropping the checkpoint's {key} {tuple(clean.pop(key).shape)}: this model's is "
              f"{tuple(own[key].shape)}, it starts fresh")
    tables = {k: v for k, v in own.items() if k.rsplit(".", 1)[-1] in POSITION_TABLES}
    missing, unexpected = model.load_state_dict({**clean, **tables}, strict=False)
    if verbose:
        print(f"load_checkpoint: {len(clean.keys() & own.keys())} tensors loaded; missing {len(missing)}: "
              f"{summarize(missing)}; unexpected {len(unexpected)}: {summarize(unexpected)}")
    return missing, unexpected


def summarize(keys):
    """'decoder.blocks.0.norm1.weight', ... -> 'decoder.* (57)': one entry per top-level module."""
    tops = [key.split(".")[0] for key in keys]
    return ", ".join(key if tops.count(top) == 1 else f"{top}.* ({tops.count(top)})"
                     for top, key in dict(zip(tops, keys)).items()) or "-"


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
            raise ValueError(one_line(OSError(errno.ENOSPC, str(e), os.path.basename(path)), folder)) from None
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def one_line(error, output_dir):
    """What a stage's command line prints for an error it expects: its message; for a full disk (OSError ENOSPC while a
    checkpoint, log, features or pictures were written) the folder, its free space, what was not written and the last
    good checkpoint (the newest whole one there: a failed save leaves no temporary). Other OSErrors stay tracebacks."""
    if not isinstance(error, OSError):
        return str(error)
    if error.errno != errno.ENOSPC:
        raise error
    good = max((entry.path for entry in os.scandir(output_dir) if entry.name.endswith(".pth")), key=os.path.getmtime,
               default="none")
    free = shutil.disk_usage(output_dir).free / 2 ** 20
    return (f"{output_dir} is full ({free:.0f} MiB free): {error.filename or 'a file'} was not written; the last good "
            f"checkpoint is {good}: free space, then resume")


# ---------------------------------------------------------------- Optimizer parameter groups and learning-rate schedule
def param_groups(model, weight_decay, layer_decay=None, depth=None, skip=("pos_embed", "cls_token", "mask_token")):
    """AdamW groups as the official: no weight decay on 1-D tensors, biases and the names in `skip`, matched whole (the
    official models' no_weight_decay(): VideoMAE's mask_token is exempt, the MVD student's mask_token_img/_vid are not;
    MAE passes none, skip=()); optional layer-wise lr decay: layer i gets lr_scale = layer_decay ** (depth + 1 - i),
    where the embeddings are layer 0, block i layer i + 1, everything after layer depth + 1."""
    groups = {}
    for name, p in [(name, p) for name, p in model.named_parameters() if p.requires_grad]:
        decay = 0.0 if p.ndim < 2 or name.endswith(".bias") or name in skip else weight_decay
        block = re.match(r"(encoder\.)?blocks\.(\d+)\.", name)
        layer = (0 if layer_decay is None or re.match(r"(encoder\.)?(patch_embed|cls_token|pos_embed|mask_token)", name)
                 else int(block[2]) + 1 if block else depth + 1)
        scale = 1.0 if layer_decay is None else layer_decay ** (depth + 1 - layer)
        groups.setdefault((decay, layer), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def cosine_schedule(step, total_steps, warmup_steps, base_lr, min_lr):
    """Per-iteration learning rate as the official code: 1) linear warmup from 0; 2) cosine from base_lr to min_lr."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------- The loop the three stages share: resume, epochs of optimizer steps, checkpoints
def total_batch(args, env, clips=True):
    """Samples an optimizer step takes over every process, as the official code counts them for the lr: clips (batch
    x --num_sample) in pretraining and distillation, videos in fine-tuning (clips=False)."""
    return args.batch_size * (args.num_sample if clips else 1) * args.update_freq * env.world_size


def scale_lr(args, env, clips=True):
    """--lr (else --blr) and --min_lr as the official scripts: x total batch / 256. -> the total batch in words."""
    total, split = total_batch(args, env, clips), f"{env.world_size} x {args.batch_size} x {args.update_freq}"
    args.lr, args.min_lr = args.lr or args.blr * total / 256, args.min_lr * total / 256
    return f"total batch {total} " + (f"({split}{clips_per_video(args)})" if clips else
                                      f"({split}) x {args.num_sample} clips")


def train_epochs(args, env, raw, optimizer, loader, loss_fn, what, saved, evaluate=None):
    """Epochs of train_one_epoch from where resume() says to --epochs, `raw` wrapped in DDP under torchrun."""
    start = resume(args, env, raw, optimizer)  # where to continue: an epoch and the steps done in it
    # broadcast_buffers=False: each step would send every rank the fixed position tables (share_buffers sends rank 0's
    # buffers when they matter). torch 2.14 warns of its successor, forward_sync_buffers, which older torch lacks
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
    model = torch.nn.parallel.DistributedDataParallel(raw, broadcast_buffers=False) if env.ddp else raw
    if env.is_main:  # flushed before the loader's workers fork, or they print it again
        print(f"{what}, lr {args.lr:.3g}, min_lr {args.min_lr:.3g}, {len(loader)} steps per epoch", flush=True)
    for epoch in range(start.epoch, args.epochs):
        train_one_epoch(args, env, model, loader, optimizer, epoch, loss_fn, start, evaluate)
    if env.is_main:
        print(f"done: {saved} in {os.path.join(args.output_dir, 'checkpoint-last.pth')}")
    return raw


def resume(args, env, model, optimizer):
    """Model, optimizer and scaler from checkpoint_to_resume(args). -> where to continue, SimpleNamespace(epoch, step,
    sums, count): the steps done in that epoch and its log line's running sums (from a checkpoint written inside it)."""
    path = checkpoint_to_resume(args)
    try:  # each node's local rank 0 writes its copy: read here, agreed on below
        state, damaged = (read_checkpoint(path) if path and os.path.exists(path) else {}), ""
    except ValueError as error:  # damaged on this node: every rank stops below, not this one alone
        state, damaged = {}, f" ({error})"
    agree("where to resume", (f"{path}: epoch {state.get('epoch')}, step {state.get('step', 'end')}" if state else
                              f"{path or 'no checkpoint'}: none") + damaged,
          "give every node the same checkpoint, or pass --no-auto_resume")
    if path is None:  # a fresh run
        return SimpleNamespace(epoch=0, step=0, sums={}, count=0)
    state = state or read_checkpoint(path)  # a missing --resume file: its error
    if not all(k in state for k in ("model", "optimizer", "epoch")):
        raise ValueError(f"{path} is not a training checkpoint of this stage (no optimizer/epoch): to start from its "
                         "weights use the stage's weight flag instead of --resume, or pass --no-auto_resume")
    # One rule, inside an epoch and at its end: the checkpoint's --num_sample and total batch of videos, which set the
    # lr (as the official: of clips in pretraining and distillation, of videos in fine-tuning), its schedule, samples.
    check_trained_with(path, saved_args(state), "num_sample", args.num_sample, 1)
    videos = total_batch(args, env, clips=False)
    if state.get("total_batch", videos) != videos:  # end-of-epoch checkpoints of older runs record none
        raise ValueError(f"{path} was trained with a total batch of {state['total_batch']} videos, this run's is "
                         f"{videos} ({env.world_size} x {args.batch_size} x {args.update_freq}): another lr and other "
                         f"steps; restart with processes x --batch_size x --update_freq = {state['total_batch']}")
    mid_epoch = "step" in state  # written inside an epoch, else at its end
    start = SimpleNamespace(epoch=state["epoch"] + (not mid_epoch), step=state.get("step", 0),
                            sums=state.get("sums", {}), count=state.get("count", 0))
    load_checkpoint(model, state["model"], verbose=False)
    optimizer.load_state_dict(state["optimizer"])
    if saved_args(state).get("precision", args.precision) != args.precision and env.is_main:
        print(f"{path} was trained in {saved_args(state)['precision']}; this run continues in {args.precision} "
              "(--precision)", flush=True)
    if state.get("scaler") and env.scaler.is_enabled():  # fp16's loss scale; other precisions save an empty state
        env.scaler.load_state_dict(state["scaler"])
    log = os.path.join(args.output_dir, "log.txt")
    if os.path.exists(log) and env.is_main:  # drop lines of an epoch logged, then killed before its checkpoint:
        with open(log) as f:  # that epoch runs again and logs again (lines without an epoch are kept)
            lines = [line for line in f if int((re.search(r'"epoch": (\d+)', line) or [0, -1])[1]) < start.epoch]
        with open(log, "w") as f:
            f.writelines(lines)
    print(f"resumed from {path}: epoch {state['epoch']} {f'at optimizer step {start.step}' if mid_epoch else 'done'}")
    return start


def save_training_state(args, env, model, optimizer, epoch, progress=None):
    """checkpoint-last.pth, and checkpoint-{epoch}.pth every --save_ckpt_freq, by each node's first process (nodes need
    not share a disk; every rank holds rank 0's state): weights in the official layout, the total batch of videos
    (resume() holds a resumed run to it). progress: dict(step, sums, count) inside the epoch."""
    share_buffers(env, model)
    if not env.local_main:
        return
    weights = model.official_state_dict() if hasattr(model, "official_state_dict") else model.state_dict()
    state = dict(model=weights, optimizer=optimizer.state_dict(), scaler=env.scaler.state_dict(), epoch=epoch,
                 total_batch=total_batch(args, env, clips=False), **(progress or {}),
                 args={k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in vars(args).items()})
    # checkpoint-{epoch}.pth first: a run killed between the two writes redoes the epoch and writes both
    if progress is None and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):
        save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"), **state)
    save_checkpoint(os.path.join(args.output_dir, "checkpoint-last.pth"), **state)


def share_buffers(env, raw):
    """Rank 0's buffers on every rank (a linear probe's BatchNorm statistics, which DDP no longer broadcasts): before
    an evaluation and every node's checkpoint."""
    for buffer in raw.buffers() if env.ddp else ():
        dist.broadcast(buffer, 0)


def train_one_epoch(args, env, model, loader, optimizer, epoch, loss_fn, start, evaluate=None):
    """One epoch of optimizer steps on loss_fn(model, batch) -> (loss, {name: float}), then evaluate(epoch) -> {name:
    value} if given, rank 0's log.txt line (each mean over every rank's micro-batches) and the checkpoint. Exact
    continuation: every --save_every_steps / --save_every_minutes (any rank's clock) checkpoint-last.pth gets the steps
    done and the log's sums, which resume() gives back as `start`: those steps' samples are left out, unread. No RNG
    state is saved: a step's randomness (drop path, dropout, mixup) is seeded from (seed, step, rank), a sample's from
    (seed, epoch, index) (data.py)."""
    raw = model.module if env.ddp else model  # what checkpoints hold
    steps, micro = len(loader) // args.update_freq, len(loader) // args.update_freq * args.update_freq
    done, sums, count = (start.step, dict(start.sums), start.count) if epoch == start.epoch else (0, {}, 0)
    first = done * args.update_freq  # micro-batches already done in this epoch
    loader.sampler.set_epoch(epoch, skip=first * args.batch_size)
    model.train()
    begin = last_save = ready = time.time()
    waited = 0.0  # seconds spent waiting for the loader: an epoch at the model's pace waits little
    for i, batch in enumerate(itertools.islice(loader, micro - first), start=first):
        waited += time.time() - ready
        step = epoch * steps + i // args.update_freq  # global optimizer step
        if i % args.update_freq == 0:  # 1. a new optimizer step: its random stream and its lr
            torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + env.rank)
            for group in optimizer.param_groups:
                group["lr"] = group.get("lr_scale", 1.0) * cosine_schedule(
                    step, args.epochs * steps, args.warmup_epochs * steps, args.lr, args.min_lr)
        last_micro = (i + 1) % args.update_freq == 0
        sync = model.no_sync if env.ddp and not last_micro else contextlib.nullcontext  # a new context at each use
        with sync(), env.autocast():  # 2. the loss, its means over the ranks, backward
            loss, logs = loss_fn(model, batch)
        late = bool(args.save_every_minutes) and time.time() - last_save >= 60 * args.save_every_minutes
        logs, late = mean_over_ranks(env, {"loss": loss.detach(), **logs}, late, f"epoch {epoch}, step {i} (global "
                                     f"step {step}): stopping; the last good checkpoint in {args.output_dir} is untouched")
        with sync():
            env.scaler.scale(loss / args.update_freq).backward()
        sums, count = {k: sums.get(k, 0.0) + v for k, v in logs.items()}, count + 1
        if last_micro:  # 3. the optimizer step (unscaled, clipped to --clip_grad if given), a checkpoint when due
            if args.clip_grad:
                env.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            env.scaler.step(optimizer)
            env.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = (i + 1) // args.update_freq
            if (args.save_every_steps and done % args.save_every_steps == 0 or late) and done < steps:
                save_training_state(args, env, raw, optimizer, epoch, dict(step=done, sums=sums, count=count))
                last_save = time.time()
        if env.is_main and (i + 1) % args.log_every == 0:  # 4. a line every --log_every micro-batches
            elapsed, this_run = time.time() - begin, i + 1 - first
            clips_s = this_run * args.batch_size * args.num_sample * env.world_size / elapsed  # R clips a video
            print(f"epoch {epoch} step {i + 1}/{micro} " + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                  + f" lr {optimizer.param_groups[0]['lr']:.2e} clips/s {clips_s:.2f} "
                  f"eta {elapsed / this_run * (micro - i - 1):.0f}s", flush=True)
        ready = time.time()
    if env.is_main:  # 5. the epoch's end: its evaluation, log line and checkpoint
        print(f"epoch {epoch}: {micro - first} steps in {time.time() - begin:.1f} s, {waited:.1f} s of them "
              "waiting for data", flush=True)
    share_buffers(env, raw)
    stats = {**{f"train_{k}": v / max(1, count) for k, v in sums.items()}, **(evaluate(epoch) if evaluate else {})}
    if env.is_main:  # killed after the line, before the checkpoint: the epoch runs again, resume() drops the line
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps({"epoch": epoch, **stats}) + "\n")
    save_training_state(args, env, raw, optimizer, epoch)
    return stats


def mean_over_ranks(env, logs, late, where):
    """{name: this rank's value} -> {name: the mean over the ranks}, and whether any rank's clock says a checkpoint is
    due, in one all_reduce: the ranks stop together on a non-finite loss (the others would hang), save together."""
    values = torch.tensor([float(v) for v in logs.values()] + [late], dtype=torch.float64)
    if env.ddp:
        values = values.to(env.device)
        dist.all_reduce(values)
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"loss is {values[0].item()} at {where}. Try a lower --lr, --clip_grad 1.0 or "
                                 "--precision fp32")
    return dict(zip(logs, (values[:-1] / env.world_size).tolist())), bool(values[-1] > 0)


# ---------------------------------------------------------------------- Devices: one path for a CPU, a GPU, torchrun
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.cache
def torchrun_store():
    """torchrun's store (env://), keys under this attempt's number: --max-restarts keeps one store for all attempts, and
    a restarted rank could read the address a killed rank had published, and hang (pytorch/pytorch#135712). One per
    process, kept. -> (store, rank, world_size)"""
    store, rank, world_size = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store), rank, world_size


def setup_distributed(args):
    """One device path: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (gloo on CPU, nccl on CUDA); plain python runs one
    process. --precision auto is taken from what the hardware reports, never from a timing: bf16 on a GPU that computes
    it natively, else fp16 with loss scaling; fp32 on a CPU (bf16 is faster than fp32 on some CPUs with bf16 units and
    slower on others: --precision bf16 is the user's choice, docs/speed.md). A resumed run keeps the precision its
    checkpoint records; rank 0's choice holds on every rank and becomes args.precision, which checkpoints record."""
    ddp, cuda, local = "RANK" in os.environ, torch.cuda.is_available(), int(os.environ.get("LOCAL_RANK", 0))
    store, rank, world = torchrun_store() if ddp else (None, 0, 1)
    device = torch.device(f"cuda:{local}" if ddp and cuda else "cuda" if cuda else "cpu")
    if ddp:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(hours=2))  # others wait while a rank saves or evaluates
        # gloo's threads still running at exit can abort the process
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if args.precision == "auto":
        path, recorded = checkpoint_to_resume(args), None
        with contextlib.suppress(ValueError):  # a damaged one: resume() stops every rank with its error, not here
            recorded = saved_args(read_checkpoint(path)).get("precision") if path and os.path.exists(path) else None
        native = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
        choice, why = ((recorded, f"the precision {path} was trained in") if recorded in DTYPES else
                       ("bf16", "a GPU with native bf16") if native else
                       ("fp16", "a GPU without native bf16: fp16 with loss scaling") if cuda else
                       ("fp32", "a CPU: fp32, whatever its units"))
        box = [choice]
        if ddp:  # rank 0's choice for all, whatever each rank's disk holds
            dist.broadcast_object_list(box, src=0)
        args.precision = box[0]
        if rank == 0:
            print(f"--precision auto: {choice} ({why})", flush=True)
    if not cuda and args.precision == "fp16" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        raise ValueError("--precision fp16: this CPU has no fp16 matrix units, so every product would be emulated "
                         "(~50x slower than fp32): use --precision fp32 (or bf16)")
    if not cuda and args.precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported() and rank == 0:
        print("WARNING: --precision bf16: this CPU has no bf16 units, every product is emulated (50-100x slower than "
              "fp32): --precision fp32 is faster here", flush=True)
    dtype = DTYPES[args.precision]
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    return SimpleNamespace(ddp=ddp, rank=rank, world_size=world, device=device, is_main=rank == 0, dtype=dtype,
                           local_main=local == 0, autocast=autocast,  # local_main writes its node's checkpoints
                           scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"))


def agree(what, value, fix):
    """`value`, the same on every rank (under torchrun: an all_gather), or a ValueError on every rank naming the ranks
    whose value differs from rank 0's: ranks that went on apart would hang in a collective or drift apart silently."""
    if not dist.is_initialized():
        return value
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (value, f"{socket.gethostname()}, node {os.environ.get('GROUP_RANK', 0)}"))
    odd = [f"rank {r} ({node}) {v}" for r, (v, node) in enumerate(seen) if r == 0 or v != seen[0][0]]
    if len(odd) > 1:
        raise ValueError(f"the ranks disagree on {what}: {'; '.join(odd[:4])}: {fix}")
    return value


def checkpoint_to_resume(args):
    """--resume, else with --auto_resume OUTPUT_DIR/checkpoint-last.pth when it exists, else None."""
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    return args.resume or (last if args.auto_resume and os.path.exists(last) else None)


# ---------------------------------------------------------------------------- Command-line flags the three stages share
NUM_SAMPLE_HELP = ("clips per decoded video, as the official --num_sample: R clips at R places (the image MAE: R "
                   "frames, or crops of an image), each its own crop and mask. A step sees batch_size x R clips per "
                   "process, the lr scales with clips; an epoch reads each video once, faster per clip (docs/speed.md)")
FLAG_RULES = (*((f, lambda v: v >= 1, "at least 1") for f in ("num_sample", "batch_size", "epochs", "update_freq")),
              ("warmup_epochs", lambda v: v >= 0, "0 or more"),
              ("sampling_rate", lambda v: v >= 0, "0 or more (0 repeats one frame: the single-frame baseline)"))


def clips_per_video(args):  # for the total batch's line
    return f" x {args.num_sample} clips per video" if args.num_sample > 1 else ""


def add_training_flags(p, output_dir, blr=1.5e-4, min_lr=None, weight_decay=0.05, drop_path=0.0, lr_note="",
                       min_lr_note=""):
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
    p.add_argument("--patch_size", type=int, default=16, help="pixels per side of a patch (a tube spans 2 frames)")
    p.add_argument("--epochs", type=int), p.add_argument("--warmup_epochs", type=int)
    p.add_argument("--update_freq", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--blr", type=float, default=blr, help=f"base lr: lr = blr * total batch / 256{lr_note}")
    p.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    p.add_argument("--min_lr", type=float, default=min_lr, help="end of the cosine, scaled by total batch / 256 like "
                   "the lr" + min_lr_note)
    p.add_argument("--weight_decay", type=float, default=weight_decay, help="AdamW's, not on biases and norms "
                   "(and the tokens each official stage exempts: model.param_groups)")
    p.add_argument("--clip_grad", type=float, help="max gradient norm (off by default, as the official runs)")
    p.add_argument("--drop_path", type=float, default=drop_path, help="stochastic depth rate of the trained model")
    p.add_argument("--use_checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing of the trained blocks: less memory, more time")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto: bf16 on GPUs that compute it natively, else fp16 with loss scaling (as "
                        "the official runs); fp32 on a CPU; a resumed run keeps its checkpoint's")
    p.add_argument("--cache_videos", action=argparse.BooleanOptionalAction, default=False,
                   help="decode each video once, before the loader's workers start, and keep it in memory (the "
                        "workers share it): small sets of small videos then load at the model's pace")
    p.add_argument("--max_bad_videos", type=int, help="stop after this many unreadable videos (default 1%%, >= 10)")
    p.add_argument("--num_workers", type=int, default=2), p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default=output_dir, help="checkpoints, log.txt, bad_videos.txt" + (
        "" if output_dir else "; default output/{mode}_mae, where distill.py looks for teachers"))
    p.add_argument("--auto_resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUTPUT_DIR/checkpoint-last.pth when it exists")
    p.add_argument("--resume", default="", help="a training checkpoint of this stage to continue from")
    p.add_argument("--save_ckpt_freq", type=int, default=20, help="keep checkpoint-{epoch}.pth every N epochs")
    p.add_argument("--save_every_steps", type=int, default=0, help="also write checkpoint-last.pth every N optimizer "
                   "steps inside an epoch, for an exact resume there (0: off)")
    p.add_argument("--save_every_minutes", type=float, default=15, help="... and every M minutes (0: off): a save "
                   "costs under 1%% of 15 minutes (docs/speed.md)")
    p.add_argument("--log_every", type=int, default=10, help="print a line every N steps")


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
    """Flags left at None take the first table's value that has them; then FLAG_RULES and the tube grid are checked."""
    for table in tables:
        for key, value in table.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    check_flags(p, args, FLAG_RULES)
    if args.input_size % args.patch_size or args.num_frames % 2:
        p.error(f"--input_size ({args.input_size}) must be a multiple of --patch_size ({args.patch_size}) and "
                f"--num_frames ({args.num_frames}) even (tubes span 2 frames)")
    return args
