"""MVD-minimal test suite: `python test_mvd.py` (or pytest). Tiny configs (a few layers, 32-64 px, 4-8 frames), CPU
only. Tests make their own videos (PyAV writes real files) and their own checkpoints in the official layouts, and
check numbers against independent computations. The run ends with one line `N passed, N failed`."""
import contextlib
import io
import math
import os
import pickle
import sys
import tempfile
import unittest
import warnings
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import model as M  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: independent numpy position tables (SPEC "Position tables")
# ---------------------------------------------------------------------------------------------------------------------
def _m_np_sincos_1d(D, pos):
    """omega_i = 1 / 10000^(i / (D/2)), i = 0..D/2-1; row = [sin(pos*omega), cos(pos*omega)]."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1)
    half = D // 2
    out = np.zeros((len(pos), D), dtype=np.float64)
    for i in range(half):
        omega = 1.0 / 10000 ** (i / (D / 2))
        out[:, i] = np.sin(pos * omega)
        out[:, half + i] = np.cos(pos * omega)
    return out


def _m_np_sincos_2d(D, h, w):
    """token n = r*w + c -> [sincos_1d(D/2, c), sincos_1d(D/2, r)] (column half first)."""
    out = np.zeros((h * w, D), dtype=np.float64)
    for r in range(h):
        for c in range(w):
            out[r * w + c, :D // 2] = _m_np_sincos_1d(D // 2, [c])[0]
            out[r * w + c, D // 2:] = _m_np_sincos_1d(D // 2, [r])[0]
    return out


def _m_np_sincos_3d(D, t, h, w):
    """token n = ti*h*w + r*w + c -> [sincos_1d(D/4, ti), 2D(3D/4, r, c)]."""
    space = _m_np_sincos_2d(3 * D // 4, h, w)
    time = _m_np_sincos_1d(D // 4, np.arange(t))
    out = np.zeros((t * h * w, D), dtype=np.float64)
    for ti in range(t):
        out[ti * h * w:(ti + 1) * h * w, :D // 4] = time[ti]
        out[ti * h * w:(ti + 1) * h * w, D // 4:] = space
    return out


def _m_np_sinusoid_1d(D, n):
    """angle(n, j) = n / 10000^(2*(j//2)/D); sin at even j, cos at odd j."""
    nn_ = np.arange(n, dtype=np.float64)[:, None]
    j = np.arange(D)[None, :]
    angle = nn_ / np.power(10000.0, 2 * (j // 2) / D)
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle))


def _m_t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: a reference ViT written directly from a state dict with plain torch ops
# ---------------------------------------------------------------------------------------------------------------------
def _m_naive_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """softmax(Q K^T / sqrt(d)) V by hand. qkv_b is the full (3D,) bias [q, k, v]."""
    B, N, D = x.shape
    d = D // heads
    q = x @ qkv_w[:D].T + qkv_b[:D]
    k = x @ qkv_w[D:2 * D].T + qkv_b[D:2 * D]
    v = x @ qkv_w[2 * D:].T + qkv_b[2 * D:]
    q, k, v = (z.reshape(B, N, heads, d).transpose(1, 2) for z in (q, k, v))  # (B, heads, N, d)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    logits = logits - logits.max(-1, keepdim=True).values
    attn = logits.exp() / logits.exp().sum(-1, keepdim=True)
    out = (attn @ v).transpose(1, 2).reshape(B, N, D)
    return out @ proj_w.T + proj_b


def _m_layernorm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _m_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _m_ref_blocks(x, sd, prefix, depth, heads):
    """Pre-norm blocks from the state dict. Accepts timm's qkv.bias or q_bias/v_bias (key bias = 0)."""
    for i in range(depth):
        p = f"{prefix}blocks.{i}."
        D = x.shape[-1]
        if p + "attn.qkv.bias" in sd:
            qkv_b = sd[p + "attn.qkv.bias"]
        else:
            qkv_b = torch.cat([sd[p + "attn.q_bias"], torch.zeros(D), sd[p + "attn.v_bias"]])
        h = _m_layernorm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        x = x + _m_naive_attention(h, sd[p + "attn.qkv.weight"], qkv_b, sd[p + "attn.proj.weight"],
                                   sd[p + "attn.proj.bias"], heads)
        h = _m_layernorm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = _m_gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    return x


def _m_rand(gen, *shape, scale=0.05, offset=0.0):
    return torch.randn(*shape, generator=gen) * scale + offset


def _m_block_sd(gen, prefix, dim, depth, timm):
    """Random weights for `depth` blocks under the official names, typed out here (not read from model.py)."""
    sd = {}
    for i in range(depth):
        p = f"{prefix}blocks.{i}."
        sd[p + "norm1.weight"] = _m_rand(gen, dim, scale=0.1, offset=1.0)
        sd[p + "norm1.bias"] = _m_rand(gen, dim, scale=0.1)
        sd[p + "attn.qkv.weight"] = _m_rand(gen, 3 * dim, dim, scale=0.08)
        if timm:
            sd[p + "attn.qkv.bias"] = _m_rand(gen, 3 * dim, scale=0.3)  # the key part is NONZERO on purpose
        else:
            sd[p + "attn.q_bias"] = _m_rand(gen, dim, scale=0.3)
            sd[p + "attn.v_bias"] = _m_rand(gen, dim, scale=0.3)
        sd[p + "attn.proj.weight"] = _m_rand(gen, dim, dim)
        sd[p + "attn.proj.bias"] = _m_rand(gen, dim, scale=0.1)
        sd[p + "norm2.weight"] = _m_rand(gen, dim, scale=0.1, offset=1.0)
        sd[p + "norm2.bias"] = _m_rand(gen, dim, scale=0.1)
        sd[p + "mlp.fc1.weight"] = _m_rand(gen, 4 * dim, dim)
        sd[p + "mlp.fc1.bias"] = _m_rand(gen, 4 * dim, scale=0.1)
        sd[p + "mlp.fc2.weight"] = _m_rand(gen, dim, 4 * dim)
        sd[p + "mlp.fc2.bias"] = _m_rand(gen, dim, scale=0.1)
    return sd


def _m_tube_mask(gen, B, t, h, w, ratio):
    """One random spatial mask of int(ratio*h*w) cells per clip, repeated over time; True = masked."""
    masks = []
    for _ in range(B):
        cells = torch.zeros(h * w, dtype=torch.bool)
        cells[torch.randperm(h * w, generator=gen)[:int(ratio * h * w)]] = True
        masks.append(cells.repeat(t))
    return torch.stack(masks)


def _m_load(model, src):
    """load_checkpoint with stdout captured -> (missing, unexpected, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        missing, unexpected = M.load_checkpoint(model, src)
    return missing, unexpected, buf.getvalue()


# Tiny configs shared by the tests: 32 px, patch 8 (4x4 grid), 4 frames (2 tube steps), vit_tiny width 192.
def _m_image_mae(seed, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, depth=1, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    return M.ImageMAE("vit_tiny", **{**args, **kw}).eval()


def _m_video_mae(seed, **kw):
    torch.manual_seed(seed)
    args = dict(num_frames=4, img_size=32, patch_size=8, depth=1, decoder_depth=1)
    return M.VideoMAE("vit_tiny", **{**args, **kw}).eval()


def _m_student(seed, **kw):
    torch.manual_seed(seed)
    args = dict(num_frames=4, img_size=32, patch_size=8, depth=1, decoder_depth=1, img_teacher_dim=40,
                vid_teacher_dim=24)
    return M.MVDStudent("vit_tiny", **{**args, **kw}).eval()


def _m_classifier(seed, **kw):
    torch.manual_seed(seed)
    args = dict(num_classes=5, num_frames=4, img_size=32, patch_size=8, depth=1, init_scale=1.0)
    return M.VideoClassifier("vit_tiny", **{**args, **kw}).eval()


def _m_video(seed, B=2, T=4, S=32):
    return torch.randn(B, 3, T, S, S, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# 1. Attention
# ---------------------------------------------------------------------------------------------------------------------
class TestModelAttention(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.attn = M.Attention(48, 4).eval()
        with torch.no_grad():
            self.attn.q_bias.normal_(0, 0.5)
            self.attn.v_bias.normal_(0, 0.5)
            self.attn.proj.bias.normal_(0, 0.1)
            self.attn.qkv.weight.mul_(3)  # make the attention far from uniform
        self.x = torch.randn(2, 7, 48)

    def _naive(self, key_bias):
        a = self.attn
        bias = torch.cat([a.q_bias, key_bias, a.v_bias])
        return _m_naive_attention(self.x, a.qkv.weight, bias, a.proj.weight, a.proj.bias, heads=4)

    def test_sdpa_equals_naive_softmax_attention(self):
        with torch.no_grad():
            out = self.attn(self.x)
            ref = self._naive(torch.zeros(48))
        self.assertEqual(tuple(out.shape), (2, 7, 48))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # the attention is far from uniform: a wrong head split or scale would show
        with torch.no_grad():
            a = self.attn
            one_head = _m_naive_attention(self.x, a.qkv.weight, torch.cat([a.q_bias, torch.zeros(48), a.v_bias]),
                                          a.proj.weight, a.proj.bias, heads=1)
        self.assertGreater((one_head - out).abs().max().item(), 1e-3)

    def test_key_bias_cannot_change_the_output(self):
        with torch.no_grad():
            out = self.attn(self.x)
            ref = self._naive(torch.randn(48, generator=torch.Generator().manual_seed(5)) * 3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    def test_attention_dropout_only_in_training(self):
        torch.manual_seed(1)
        attn = M.Attention(48, 4, attn_drop=0.5)
        attn.load_state_dict(self.attn.state_dict())
        attn.train()
        with torch.no_grad():
            a, b = attn(self.x), attn(self.x)
        self.assertGreater((a - b).abs().max().item(), 1e-3)
        attn.eval()
        with torch.no_grad():
            c, d = attn(self.x), attn(self.x)
            ref = self._naive(torch.zeros(48))
        self.assertTrue(torch.equal(c, d))
        torch.testing.assert_close(c, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Position tables
# ---------------------------------------------------------------------------------------------------------------------
class TestModelPositionTables(unittest.TestCase):
    def assertTable(self, got, ref):
        ref = np.asarray(ref)
        self.assertEqual(tuple(got.shape), ref.shape)
        np.testing.assert_allclose(got.detach().double().numpy(), ref, atol=1e-6, rtol=0)

    def test_sincos_1d(self):
        for D, pos in ((16, np.arange(5)), (64, np.arange(50)), (192, np.array([0.0, 1.5, 7.0, 13.25, 1000.0]))):
            self.assertTable(M.sincos_1d(D, torch.as_tensor(pos)), _m_np_sincos_1d(D, pos))

    def test_sincos_2d(self):
        for D, (h, w) in ((16, (2, 3)), (64, (4, 4)), (192, (14, 14)), (32, (3, 5))):
            self.assertTable(M.sincos_2d(D, h, w), _m_np_sincos_2d(D, h, w))

    def test_sincos_3d(self):
        for D, grid in ((16, (2, 3, 4)), (64, (4, 4, 4)), (192, (8, 14, 14))):
            self.assertTable(M.sincos_3d(D, *grid), _m_np_sincos_3d(D, *grid))

    def test_sinusoid_1d(self):
        for D, n in ((16, 24), (64, 64), (192, 1568)):
            self.assertTable(M.sinusoid_1d(D, n), _m_np_sinusoid_1d(D, n))

    def test_image_mae_tables(self):
        m = _m_image_mae(0, decoder_dim=64)
        self.assertTable(m.pos_embed[0], np.concatenate([np.zeros((1, 192)), _m_np_sincos_2d(192, 4, 4)]))
        self.assertTable(m.decoder_pos_embed[0], np.concatenate([np.zeros((1, 64)), _m_np_sincos_2d(64, 4, 4)]))
        m = M.ImageMAE("vit_tiny", img_size=48, patch_size=8, depth=1, decoder_depth=1)  # MAE default decoder: 512
        self.assertTable(m.decoder_pos_embed[0], np.concatenate([np.zeros((1, 512)), _m_np_sincos_2d(512, 6, 6)]))
        self.assertTable(m.pos_embed[0], np.concatenate([np.zeros((1, 192)), _m_np_sincos_2d(192, 6, 6)]))

    def test_student_tables(self):
        m = _m_student(0)
        ref = _m_np_sincos_3d(192, 2, 4, 4)
        for name in ("pos_embed", "pos_embed_img", "pos_embed_vid"):
            self.assertTable(getattr(m, name)[0], ref)
        m = _m_student(0, decoder_dim=64, decoder_heads=4)
        self.assertTable(m.pos_embed[0], ref)
        self.assertTable(m.pos_embed_img[0], _m_np_sincos_3d(64, 2, 4, 4))
        self.assertTable(m.pos_embed_vid[0], _m_np_sincos_3d(64, 2, 4, 4))

    def test_video_mae_and_classifier_tables(self):
        m = _m_video_mae(0)  # 2x4x4 = 32 tubes; vit_tiny's pixel decoder is 96 wide
        self.assertTable(m.encoder.pos_embed[0], _m_np_sinusoid_1d(192, 32))
        self.assertTable(m.pos_embed[0], _m_np_sinusoid_1d(m.pos_embed.shape[-1], 32))
        m = _m_video_mae(0, decoder_dim=48, decoder_heads=4)
        self.assertTable(m.pos_embed[0], _m_np_sinusoid_1d(48, 32))
        self.assertTable(_m_classifier(0, pos="1d").pos_embed[0], _m_np_sinusoid_1d(192, 32))
        self.assertTable(_m_classifier(0).pos_embed[0], _m_np_sincos_3d(192, 2, 4, 4))


# ---------------------------------------------------------------------------------------------------------------------
# 3. Output shapes, losses, image-teacher features of a clip
# ---------------------------------------------------------------------------------------------------------------------
class TestModelShapes(unittest.TestCase):
    def test_image_mae_forward_and_loss(self):
        m = _m_image_mae(0)
        torch.manual_seed(3)
        images = torch.randn(8, 3, 32, 32)
        images[::2] *= 1e-3  # low-contrast images: the 1e-6 in sqrt(var + 1e-6) matters for them
        with torch.no_grad():
            loss, pred, mask = m(images, mask_ratio=0.75)
        L = 16
        self.assertEqual(loss.shape, torch.Size([]))
        self.assertEqual(tuple(pred.shape), (8, L, 8 * 8 * 3))
        self.assertEqual(tuple(mask.shape), (8, L))
        self.assertEqual(mask.dtype, torch.bool)
        self.assertEqual((~mask).sum(1).tolist(), [int(L * (1 - 0.75))] * 8)
        self.assertGreater(len({tuple(r) for r in mask.tolist()}), 1)  # per-sample random masks
        # the loss: MSE on masked patches of per-patch normalized pixels, patches flattened (p, q, c)
        x = images.numpy().astype(np.float64)
        target = np.zeros((8, L, 192))
        for b in range(8):
            for r in range(4):
                for c in range(4):
                    patch = x[b, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].transpose(1, 2, 0).reshape(-1)
                    target[b, r * 4 + c] = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
        per_patch = ((pred.double().numpy() - target) ** 2).mean(-1)
        ref = (per_patch * mask.numpy()).sum() / mask.numpy().sum()
        self.assertAlmostEqual(loss.item(), ref, places=4)
        with torch.no_grad():
            self.assertEqual(tuple(m.teacher_features(images[:3]).shape), (3, L, 192))

    def test_video_mae_forward_and_loss(self):
        m = _m_video_mae(0)
        video = _m_video(1)
        video[1] = video[1] * 4e-3 + 0.1  # a low-contrast clip: the 1e-6 added to the std matters for it
        mask = _m_tube_mask(torch.Generator().manual_seed(0), 2, 2, 4, 4, 0.9)  # 14 of 16 cells -> 28 of 32 tubes
        with torch.no_grad():
            loss, pred = m(video, mask)
            feats = m.teacher_features(video)
        self.assertEqual(loss.shape, torch.Size([]))
        self.assertEqual(tuple(pred.shape), (2, 28, 2 * 8 * 8 * 3))
        self.assertEqual(tuple(feats.shape), (2, 32, 192))
        # the loss: undo ImageNet normalization, per-tube per-channel normalization over 2*p*p positions,
        # (p0 p1 p2 c) order, MSE over the masked tubes in token order
        mean = np.array([0.485, 0.456, 0.406])[:, None, None, None]
        std = np.array([0.229, 0.224, 0.225])[:, None, None, None]
        raw = video.double().numpy() * std + mean
        sq = []
        for b in range(2):
            rows = []
            for n in np.flatnonzero(mask[b].numpy()):
                t, r, c = n // 16, (n // 4) % 4, n % 4
                tube = raw[b, :, 2 * t:2 * t + 2, 8 * r:8 * r + 8, 8 * c:8 * c + 8]  # (3, 2, 8, 8)
                tube = tube.transpose(1, 2, 3, 0).reshape(-1, 3)  # (2*8*8, 3) in (p0 p1 p2) x c
                tube = (tube - tube.mean(0)) / (tube.std(0, ddof=1) + 1e-6)
                rows.append(tube.reshape(-1))
            sq.append(np.stack(rows))
        ref = ((pred.double().numpy() - np.stack(sq)) ** 2).mean()
        self.assertAlmostEqual(loss.item(), ref, places=4)

    def test_student_predicts_exactly_the_masked_tubes(self):
        m = _m_student(0)
        video = _m_video(2)
        for ratio, n_mask in ((0.9, 28), (0.5, 16)):
            mask = _m_tube_mask(torch.Generator().manual_seed(1), 2, 2, 4, 4, ratio)
            with torch.no_grad():
                p_img, p_vid = m(video, mask)
            self.assertEqual(tuple(p_img.shape), (2, n_mask, 40))
            self.assertEqual(tuple(p_vid.shape), (2, n_mask, 24))

    def test_single_teacher_student_builds_one_decoder(self):
        m = _m_student(0, img_teacher_dim=0)
        self.assertFalse([k for k in m.state_dict() if "_img" in k])
        self.assertTrue([k for k in m.state_dict() if "_vid" in k])
        mask = _m_tube_mask(torch.Generator().manual_seed(1), 2, 2, 4, 4, 0.9)
        with torch.no_grad():
            p_img, p_vid = m(_m_video(2), mask)
        self.assertIsNone(p_img)
        self.assertEqual(tuple(p_vid.shape), (2, 28, 24))
        m = _m_student(0, vid_teacher_dim=0)
        self.assertFalse([k for k in m.state_dict() if "_vid" in k])
        with torch.no_grad():
            p_img, p_vid = m(_m_video(2), mask)
        self.assertIsNone(p_vid)
        self.assertEqual(tuple(p_img.shape), (2, 28, 40))

    def test_classifier_logits(self):
        with torch.no_grad():
            self.assertEqual(tuple(_m_classifier(0)(_m_video(3, B=3)).shape), (3, 5))
            self.assertEqual(tuple(_m_classifier(0, pos="1d", num_classes=7)(_m_video(3, B=2)).shape), (2, 7))

    def test_image_teacher_video_features_in_tube_order(self):
        m = _m_image_mae(0, decoder_depth=0, depth=2)
        B, T, L = 2, 6, 16
        video = _m_video(4, B=B, T=T)
        with torch.no_grad():
            out = m.video_features(video)
            frames = video[:, :, ::2].permute(0, 2, 1, 3, 4).reshape(B * T // 2, 3, 32, 32)  # frames 0, 2, 4
            per_frame = m.teacher_features(frames)  # (B*T/2, L, D)
        self.assertEqual(tuple(out.shape), (B, T // 2 * L, 192))
        torch.testing.assert_close(out, per_frame.reshape(B, T // 2 * L, 192), atol=1e-4, rtol=1e-4)
        for b, f, r, c in ((0, 0, 0, 0), (1, 2, 3, 1), (0, 1, 2, 3)):  # token = frame_pair*L + row*w + col
            torch.testing.assert_close(out[b, f * L + r * 4 + c], per_frame[b * T // 2 + f, r * 4 + c],
                                       atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Official layouts against a reference forward
# ---------------------------------------------------------------------------------------------------------------------
class TestModelOfficialLayouts(unittest.TestCase):
    def test_mae_timm_layout_matches_reference_vit(self):
        gen = torch.Generator().manual_seed(0)
        D, depth, heads, p = 192, 2, 3, 8
        sd = {"cls_token": _m_rand(gen, 1, 1, D, scale=0.5),
              "pos_embed": torch.cat([torch.zeros(1, D), _m_t(_m_np_sincos_2d(D, 4, 4))])[None],
              "patch_embed.proj.weight": _m_rand(gen, D, 3, p, p),
              "patch_embed.proj.bias": _m_rand(gen, D, scale=0.1),
              **_m_block_sd(gen, "", D, depth, timm=True),
              "norm.weight": _m_rand(gen, D, scale=0.1, offset=1.0), "norm.bias": _m_rand(gen, D, scale=0.1)}
        m = _m_image_mae(7, depth=depth, decoder_depth=0)
        missing, unexpected, _ = _m_load(m, {"model": sd})
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        images = torch.randn(2, 3, 32, 32, generator=gen)
        with torch.no_grad():
            got = m.teacher_features(images)
        x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)  # (B, D, 4, 4)
        x = x.flatten(2).transpose(1, 2) + _m_t(_m_np_sincos_2d(D, 4, 4))
        x = torch.cat([sd["cls_token"].expand(2, -1, -1), x], dim=1)
        ref = _m_ref_blocks(x, sd, "", depth, heads)[:, 1:]
        self.assertEqual(tuple(got.shape), (2, 16, D))
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    def _videomae_pretrain_sd(self, gen, D=192, depth=2, Dd=96, dec_depth=1, p=8):
        return {"encoder.patch_embed.proj.weight": _m_rand(gen, D, 3, 2, p, p),
                "encoder.patch_embed.proj.bias": _m_rand(gen, D, scale=0.1),
                **_m_block_sd(gen, "encoder.", D, depth, timm=False),
                "encoder.norm.weight": _m_rand(gen, D, scale=0.1, offset=1.0),
                "encoder.norm.bias": _m_rand(gen, D, scale=0.1),
                "encoder_to_decoder.weight": _m_rand(gen, Dd, D),
                "mask_token": _m_rand(gen, 1, 1, Dd),
                **_m_block_sd(gen, "decoder.", Dd, dec_depth, timm=False),
                "decoder.norm.weight": _m_rand(gen, Dd, scale=0.1, offset=1.0),
                "decoder.norm.bias": _m_rand(gen, Dd, scale=0.1),
                "decoder.head.weight": _m_rand(gen, 2 * p * p * 3, Dd),
                "decoder.head.bias": _m_rand(gen, 2 * p * p * 3, scale=0.1)}

    def _videomae_reference(self, sd, video, prefix="encoder.", depth=2, heads=3, p=8, mask=None):
        x = F.conv3d(video, sd[prefix + "patch_embed.proj.weight"], sd[prefix + "patch_embed.proj.bias"],
                     stride=(2, p, p))  # (B, D, t, h, w)
        x = x.flatten(2).transpose(1, 2)
        x = x + _m_t(_m_np_sinusoid_1d(x.shape[-1], x.shape[1]))
        if mask is not None:  # pretraining: the encoder sees the visible tubes only
            x = x[~mask].reshape(x.shape[0], -1, x.shape[-1])
        return _m_ref_blocks(x, sd, prefix, depth, heads)

    def test_videomae_pretraining_layout_matches_reference(self):
        gen = torch.Generator().manual_seed(1)
        sd = self._videomae_pretrain_sd(gen)
        m = _m_video_mae(5, depth=2, decoder_depth=1)
        missing, unexpected, _ = _m_load(m, {"model": sd})
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        video = _m_video(6)
        with torch.no_grad():
            got = m.teacher_features(video)
        ref = self._videomae_reference(sd, video)
        self.assertEqual(tuple(got.shape), (2, 32, 192))
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        # the pretraining decoder reads the loaded weights too: pred = head(norm(blocks(...)))[masked]
        mask = _m_tube_mask(gen, 2, 2, 4, 4, 0.75)  # 12 of 16 cells -> 24 masked tubes
        with torch.no_grad():
            _, pred = m(video, mask)
        vis = self._videomae_reference(sd, video, mask=mask)  # (B, N_vis, D)
        self.assertEqual(tuple(vis.shape), (2, 8, 192))
        vis = _m_layernorm(vis, sd["encoder.norm.weight"], sd["encoder.norm.bias"])
        vis = vis @ sd["encoder_to_decoder.weight"].T
        pos = _m_t(_m_np_sinusoid_1d(96, 32))[None].expand(2, -1, -1)
        x = torch.cat([vis + pos[~mask].reshape(2, -1, 96),
                       sd["mask_token"] + pos[mask].reshape(2, -1, 96)], dim=1)
        x = _m_ref_blocks(x, sd, "decoder.", 1, 3)[:, -24:]
        x = _m_layernorm(x, sd["decoder.norm.weight"], sd["decoder.norm.bias"])
        ref_pred = x @ sd["decoder.head.weight"].T + sd["decoder.head.bias"]
        torch.testing.assert_close(pred, ref_pred, atol=1e-4, rtol=1e-4)

    def test_videomae_checkpoint_into_classifier(self):
        gen = torch.Generator().manual_seed(2)
        sd = self._videomae_pretrain_sd(gen)
        c = _m_classifier(9, depth=2, pos="1d")
        missing, unexpected, _ = _m_load(c, {"model": sd})
        self.assertEqual(sorted(missing), ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"])
        decoder_keys = {k for k in sd if k.startswith(("decoder.", "encoder_to_decoder", "mask_token"))}
        self.assertTrue(decoder_keys <= set(unexpected))
        self.assertTrue(set(unexpected) <= decoder_keys | {"norm.weight", "norm.bias"})
        for k, v in sd.items():  # every encoder tensor went into the classifier
            if k.startswith("encoder.") and not k.startswith("encoder.norm."):
                self.assertTrue(torch.equal(c.state_dict()[k[len("encoder."):]], v), k)
        video = _m_video(8)
        with torch.no_grad():
            logits = c(video)
        pooled = self._videomae_reference(sd, video).mean(1)
        ref = _m_layernorm(pooled, c.fc_norm.weight, c.fc_norm.bias) @ c.head.weight.T + c.head.bias
        torch.testing.assert_close(logits, ref.detach(), atol=1e-4, rtol=1e-4)

    def test_student_and_classifier_load_their_own_state_dicts(self):
        video = _m_video(9)
        mask = _m_tube_mask(torch.Generator().manual_seed(3), 2, 2, 4, 4, 0.9)
        a, b = _m_student(0), _m_student(1)
        missing, unexpected, _ = _m_load(b, a.state_dict())
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        with torch.no_grad():
            for pa, pb in zip(a(video, mask), b(video, mask)):
                self.assertTrue(torch.equal(pa, pb))
        a, b = _m_classifier(0), _m_classifier(1)
        missing, unexpected, _ = _m_load(b, a.state_dict())
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        with torch.no_grad():
            self.assertTrue(torch.equal(a(video), b(video)))


# ---------------------------------------------------------------------------------------------------------------------
# 5. Round trips, prefixes, wrong sizes, the printed report
# ---------------------------------------------------------------------------------------------------------------------
class TestModelCheckpointRoundTrips(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.tmp.name, "ckpt.pth")
        self.video = _m_video(10)
        self.mask = _m_tube_mask(torch.Generator().manual_seed(4), 2, 2, 4, 4, 0.9)
        self.images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
        self.img_mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(12)).argsort(1) >= 4

    def tearDown(self):
        self.tmp.cleanup()

    def outputs(self, m):
        with torch.no_grad():
            if isinstance(m, M.ImageMAE):
                loss, pred, _ = m(self.images, mask=self.img_mask)
                return [loss, pred, m.teacher_features(self.images)]
            if isinstance(m, M.VideoMAE):
                return [*m(self.video, self.mask), m.teacher_features(self.video)]
            if isinstance(m, M.MVDStudent):
                return list(m(self.video, self.mask))
            return [m(self.video)]

    def assertSameOutputs(self, a, b, same=True):
        oa, ob = self.outputs(a), self.outputs(b)
        equal = all(torch.equal(x, y) for x, y in zip(oa, ob))
        self.assertEqual(equal, same)

    def test_every_model_round_trips_through_save_checkpoint(self):
        for make in (_m_image_mae, _m_video_mae, _m_student, _m_classifier):
            with self.subTest(model=make.__name__):
                a, b = make(0), make(1)
                self.assertSameOutputs(a, b, same=False)  # differently seeded: the test can fail
                M.save_checkpoint(self.path, model=a.state_dict(), epoch=1)
                missing, unexpected, printed = _m_load(b, self.path)
                self.assertEqual((list(missing), list(unexpected)), ([], []))
                self.assertEqual(len(printed.strip().splitlines()), 1)
                self.assertSameOutputs(a, b)

    def test_image_mae_timm_layout_round_trip(self):
        a, b = _m_image_mae(0, decoder_depth=0), _m_image_mae(1, decoder_depth=0)
        sd = M.to_timm_layout(a.state_dict())
        self.assertFalse([k for k in sd if k.endswith(("q_bias", "v_bias"))])
        qkv_b = sd["blocks.0.attn.qkv.bias"]
        self.assertEqual(tuple(qkv_b.shape), (3 * 192,))
        self.assertTrue(torch.equal(qkv_b[:192], a.blocks[0].attn.q_bias.detach()))
        self.assertTrue(torch.equal(qkv_b[192:384], torch.zeros(192)))
        self.assertTrue(torch.equal(qkv_b[384:], a.blocks[0].attn.v_bias.detach()))
        M.save_checkpoint(self.path, model=sd, epoch=1)
        missing, unexpected, _ = _m_load(b, self.path)
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        with torch.no_grad():
            self.assertTrue(torch.equal(a.teacher_features(self.images), b.teacher_features(self.images)))
        self.assertEqual(sorted(a.official_state_dict()), sorted(sd))

    def test_prefixes_and_nesting(self):
        a = _m_classifier(0)
        sd = a.state_dict()
        variants = {"module.": {"module." + k: v for k, v in sd.items()},
                    "_orig_mod.": {"_orig_mod." + k: v for k, v in sd.items()},
                    "backbone.": {"backbone." + k: v for k, v in sd.items()},
                    "module._orig_mod.": {"module._orig_mod." + k: v for k, v in sd.items()},
                    "{'module'}": {"module": sd},
                    "{'model'}": {"model": sd, "epoch": 3},
                    "{'model'} + module.": {"model": {"module." + k: v for k, v in sd.items()}}}
        for name, ckpt in variants.items():
            with self.subTest(layout=name):
                b = _m_classifier(1)
                missing, unexpected, _ = _m_load(b, ckpt)
                self.assertEqual((list(missing), list(unexpected)), ([], []))
                self.assertSameOutputs(a, b)

    def test_video_mae_encoder_prefix_added(self):
        a = _m_video_mae(0, decoder_depth=0)
        bare = {k[len("encoder."):]: v for k, v in a.state_dict().items()}
        self.assertTrue(all(not k.startswith("encoder.") for k in bare))
        for name, ckpt in (("bare", bare), ("module.", {"module." + k: v for k, v in bare.items()}),
                           ("module.encoder.", {"module." + k: v for k, v in a.state_dict().items()})):
            with self.subTest(layout=name):
                b = _m_video_mae(1, decoder_depth=0)
                missing, unexpected, _ = _m_load(b, {"model": ckpt})
                self.assertEqual((list(missing), list(unexpected)), ([], []))
                with torch.no_grad():
                    self.assertTrue(torch.equal(a.teacher_features(self.video), b.teacher_features(self.video)))

    def test_video_mae_bare_timm_layout_keeps_q_and_v_bias(self):
        """Encoder keys without `encoder.` in timm's qkv.bias layout must land on encoder.blocks.*.q_bias/v_bias."""
        a = _m_video_mae(0, decoder_depth=0)
        with torch.no_grad():
            for blk in a.encoder.blocks:
                blk.attn.q_bias.normal_()
                blk.attn.v_bias.normal_()
        bare = M.to_timm_layout({k[len("encoder."):]: v for k, v in a.state_dict().items()})
        b = _m_video_mae(1, decoder_depth=0)
        missing, unexpected, _ = _m_load(b, bare)
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        with torch.no_grad():
            self.assertTrue(torch.equal(a.teacher_features(self.video), b.teacher_features(self.video)))

    def test_wrong_size_checkpoint_names_the_key(self):
        sd = _m_classifier(0).state_dict()
        cases = (("width 64", _m_classifier(1, dim=64, heads=2), sd),
                 ("patch 16", _m_classifier(1, patch_size=16), sd),
                 ("image mae patch 4", _m_image_mae(1, patch_size=4, decoder_depth=0),
                  _m_image_mae(0, decoder_depth=0).state_dict()))
        for name, target, ckpt in cases:
            with self.subTest(case=name):
                own = target.state_dict()
                bad = [k for k in ckpt if k in own and own[k].shape != ckpt[k].shape and "pos_embed" not in k]
                self.assertTrue(bad)
                with self.assertRaises(ValueError) as cm:
                    _m_load(target, ckpt)
                msg = str(cm.exception)
                named = [k for k in bad if k in msg]
                self.assertTrue(named, msg)
                self.assertIn(str(tuple(ckpt[named[0]].shape)), msg)
                self.assertIn(str(tuple(own[named[0]].shape)), msg)
        with self.assertRaises(ValueError) as cm:  # a patch-size mismatch names the patch embedding
            _m_load(_m_classifier(1, patch_size=16), {"model": sd})
        self.assertIn("patch_embed.proj.weight", str(cm.exception))

    def test_report_is_one_line_and_lists_are_returned(self):
        sd = _m_video_mae(0, decoder_depth=0).state_dict()
        c = _m_classifier(1, pos="1d")
        missing, unexpected, printed = _m_load(c, {"model": {**sd, "extra.weight": torch.zeros(3)}})
        self.assertIsInstance(missing, list)
        self.assertIsInstance(unexpected, list)
        self.assertEqual(len(printed.strip().splitlines()), 1)
        self.assertEqual(sorted(missing), ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"])
        self.assertEqual(sorted(unexpected), ["extra.weight", "norm.bias", "norm.weight"])
        self.assertRegex(printed, r"\b4\b")  # the counts are in the report
        self.assertRegex(printed, r"\b3\b")


# ---------------------------------------------------------------------------------------------------------------------
# 6. Another input size / frame count; position tables never read from a checkpoint
# ---------------------------------------------------------------------------------------------------------------------
class TestModelInputSizeChange(unittest.TestCase):
    def test_student_32px_4f_into_64px_8f(self):
        sd = _m_student(0).state_dict()
        b = _m_student(1, img_size=64, num_frames=8)
        missing, unexpected, _ = _m_load(b, {"model": sd})
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        ref = _m_np_sincos_3d(192, 4, 8, 8)
        for name in ("pos_embed", "pos_embed_img", "pos_embed_vid"):
            np.testing.assert_allclose(getattr(b, name)[0].double().numpy(), ref, atol=1e-6)
        self.assertTrue(torch.equal(b.blocks[0].mlp.fc1.weight, sd["blocks.0.mlp.fc1.weight"]))
        mask = _m_tube_mask(torch.Generator().manual_seed(0), 1, 4, 8, 8, 0.9)  # 57 of 64 cells -> 228 tubes
        with torch.no_grad():
            p_img, p_vid = b(_m_video(0, B=1, T=8, S=64), mask)
        self.assertEqual((tuple(p_img.shape), tuple(p_vid.shape)), ((1, 228, 40), (1, 228, 24)))

    def test_other_models_change_size(self):
        cases = ((_m_image_mae(0).state_dict(), _m_image_mae(1, img_size=64),
                  {"pos_embed": np.concatenate([np.zeros((1, 192)), _m_np_sincos_2d(192, 8, 8)]),
                   "decoder_pos_embed": np.concatenate([np.zeros((1, 64)), _m_np_sincos_2d(64, 8, 8)])}),
                 (_m_video_mae(0).state_dict(), _m_video_mae(1, img_size=64, num_frames=8),
                  {"encoder.pos_embed": _m_np_sinusoid_1d(192, 256), "pos_embed": _m_np_sinusoid_1d(96, 256)}),
                 (_m_classifier(0).state_dict(), _m_classifier(1, img_size=64, num_frames=8),
                  {"pos_embed": _m_np_sincos_3d(192, 4, 8, 8)}))
        for sd, model, tables in cases:
            with self.subTest(model=type(model).__name__):
                missing, unexpected, _ = _m_load(model, sd)
                self.assertEqual((list(missing), list(unexpected)), ([], []))
                for name, ref in tables.items():
                    got = model.get_buffer(name)[0].double().numpy()
                    np.testing.assert_allclose(got, ref, atol=1e-6)

    def test_position_tables_in_a_checkpoint_are_ignored(self):
        gen = torch.Generator().manual_seed(0)
        sd = dict(_m_student(0).state_dict())
        for name in ("pos_embed", "pos_embed_img", "pos_embed_vid"):
            sd[name] = torch.randn(1, 7, 5, generator=gen) * 100  # garbage, wrong shape
        b = _m_student(1)
        missing, unexpected, _ = _m_load(b, sd)
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        ref = _m_np_sincos_3d(192, 2, 4, 4)
        for name in ("pos_embed", "pos_embed_img", "pos_embed_vid"):
            np.testing.assert_allclose(getattr(b, name)[0].double().numpy(), ref, atol=1e-6)
        sd = dict(_m_image_mae(0).state_dict())
        sd["pos_embed"] = torch.full_like(sd["pos_embed"], 7.0)  # right shape, garbage values
        sd["decoder_pos_embed"] = torch.full_like(sd["decoder_pos_embed"], -3.0)
        b = _m_image_mae(1)
        missing, unexpected, _ = _m_load(b, {"model": sd})
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        np.testing.assert_allclose(b.pos_embed[0, 1:].double().numpy(), _m_np_sincos_2d(192, 4, 4), atol=1e-6)
        np.testing.assert_allclose(b.decoder_pos_embed[0, 1:].double().numpy(), _m_np_sincos_2d(64, 4, 4), atol=1e-6)
        self.assertTrue(torch.equal(b.pos_embed[0, 0], torch.zeros(192)))
        sd = {**_m_video_mae(0).state_dict(), "encoder.pos_embed": torch.ones(1, 3, 3), "pos_embed": torch.ones(2)}
        b = _m_video_mae(1)
        missing, unexpected, _ = _m_load(b, sd)
        self.assertEqual((list(missing), list(unexpected)), ([], []))
        np.testing.assert_allclose(b.encoder.pos_embed[0].double().numpy(), _m_np_sinusoid_1d(192, 32), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Unsafe and damaged checkpoints
# ---------------------------------------------------------------------------------------------------------------------
class TestModelUnsafeCheckpoints(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.model = _m_classifier(0)

    def tearDown(self):
        self.tmp.cleanup()

    def assertOneLineValueError(self, path):
        with self.assertRaises(ValueError) as cm, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol before refusing
            _m_load(self.model, path)
        self.assertEqual(len(str(cm.exception).strip().splitlines()), 1, str(cm.exception))
        return str(cm.exception)

    def test_code_running_pickle_is_refused(self):
        class OpensAFile:  # unpickling this runs open(marker, "w"): the pickle stores the call, not the class
            def __init__(self, marker):
                self.marker = marker

            def __reduce__(self):
                return (open, (self.marker, "w"))

        for how in ("torch.save", "pickle.dump"):
            with self.subTest(how=how):
                marker = os.path.join(self.dir, f"pwned_{how}")
                path = os.path.join(self.dir, f"evil_{how}.pth")
                payload = {"model": dict(self.model.state_dict()), "extra": OpensAFile(marker)}
                if how == "torch.save":
                    torch.save(payload, path)
                else:
                    with open(path, "wb") as f:
                        pickle.dump(payload, f)
                self.assertOneLineValueError(path)
                self.assertFalse(os.path.exists(marker))
                if how == "pickle.dump":  # the payload is live: an unrestricted unpickler would run it
                    with open(path, "rb") as f:
                        pickle.load(f)["extra"].close()
                    self.assertTrue(os.path.exists(marker))

    def test_truncated_text_and_missing_files(self):
        good = os.path.join(self.dir, "good.pth")
        torch.save({"model": self.model.state_dict()}, good)
        with open(good, "rb") as f:
            data = f.read()
        truncated = os.path.join(self.dir, "truncated.pth")
        with open(truncated, "wb") as f:
            f.write(data[:len(data) // 2])
        text = os.path.join(self.dir, "notes.txt")
        with open(text, "w") as f:
            f.write("this is not a checkpoint\nsecond line\n")
        for path in (truncated, text, os.path.join(self.dir, "missing.pth")):
            with self.subTest(path=os.path.basename(path)):
                self.assertIn(os.path.basename(path), self.assertOneLineValueError(path))
        _m_load(self.model, good)  # the intact file loads


# ---------------------------------------------------------------------------------------------------------------------
# 8. Atomic save
# ---------------------------------------------------------------------------------------------------------------------
class TestModelAtomicSave(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = os.path.join(self.tmp.name, "out")  # not created yet: save_checkpoint makes it
        self.path = os.path.join(self.dir, "checkpoint-last.pth")

    def tearDown(self):
        self.tmp.cleanup()

    def _failing_save(self, obj, f, *args, **kwargs):
        f.write(b"half a checkpoint" * 1000)
        raise RuntimeError("disk full (simulated)")

    def test_save_leaves_only_the_checkpoint(self):
        M.save_checkpoint(self.path, model={"w": torch.arange(3.0)}, epoch=1)
        self.assertEqual(os.listdir(self.dir), ["checkpoint-last.pth"])
        state = torch.load(self.path, weights_only=True)
        self.assertEqual(state["epoch"], 1)
        self.assertTrue(torch.equal(state["model"]["w"], torch.arange(3.0)))
        M.save_checkpoint(self.path, model={"w": torch.arange(4.0)}, epoch=2)
        self.assertEqual(os.listdir(self.dir), ["checkpoint-last.pth"])
        self.assertEqual(torch.load(self.path, weights_only=True)["epoch"], 2)

    def test_failed_save_keeps_the_previous_checkpoint(self):
        M.save_checkpoint(self.path, model={"w": torch.arange(3.0)}, epoch=1)
        with open(self.path, "rb") as f:
            before = f.read()
        with mock.patch.object(torch, "save", self._failing_save):
            with self.assertRaises(RuntimeError):
                M.save_checkpoint(self.path, model={"w": torch.arange(5.0)}, epoch=2)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(torch.load(self.path, weights_only=True)["epoch"], 1)

    def test_failed_save_leaves_no_temporary_file(self):
        M.save_checkpoint(self.path, model={"w": torch.arange(3.0)}, epoch=1)
        with mock.patch.object(torch, "save", self._failing_save):
            with self.assertRaises(RuntimeError):
                M.save_checkpoint(self.path, model={"w": torch.arange(5.0)}, epoch=2)
        self.assertEqual(os.listdir(self.dir), ["checkpoint-last.pth"])


# ---------------------------------------------------------------------------------------------------------------------
# 9. Optimizer groups and the learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------------
class TestModelParamGroups(unittest.TestCase):
    def group_of(self, groups):
        where = {}
        for g in groups:
            for p in g["params"]:
                self.assertNotIn(id(p), where, "a parameter is in two groups")
                where[id(p)] = g
        return where

    def test_weight_decay_split(self):
        for model in (_m_classifier(0, depth=2), _m_student(0, use_cls_token=True), _m_image_mae(0)):
            with self.subTest(model=type(model).__name__):
                where = self.group_of(M.param_groups(model, 0.05))
                params = dict(model.named_parameters())
                self.assertEqual(set(where), {id(p) for p in params.values()})
                for name, p in params.items():
                    no_decay = p.ndim == 1 or name.endswith(("q_bias", "v_bias")) or "token" in name
                    self.assertEqual(where[id(p)]["weight_decay"], 0.0 if no_decay else 0.05, name)
                    self.assertEqual(where[id(p)].get("lr_scale", 1.0), 1.0, name)
                for name, buf in model.named_buffers():  # position tables are buffers, in no group
                    self.assertNotIn(id(buf), where, name)
                self.assertTrue(any("pos_embed" in n for n, _ in model.named_buffers()))
                self.assertFalse(any("pos_embed" in n for n in params))

    def test_layer_decay_scales(self):
        depth = 3
        model = _m_classifier(0, depth=depth)
        where = self.group_of(M.param_groups(model, 0.05, layer_decay=0.75, depth=depth))
        for name, p in model.named_parameters():
            if name.startswith("blocks."):
                i = int(name.split(".")[1])
                expected = 0.75 ** (depth + 1 - (i + 1))
            elif name.startswith("patch_embed"):
                expected = 0.75 ** (depth + 1)
            else:  # fc_norm, head
                expected = 1.0
            self.assertAlmostEqual(where[id(p)]["lr_scale"], expected, places=12, msg=name)
            self.assertEqual(where[id(p)]["weight_decay"], 0.0 if p.ndim == 1 else 0.05, name)
        self.assertAlmostEqual(where[id(model.blocks[0].attn.qkv.weight)]["lr_scale"], 0.75 ** 3)
        self.assertAlmostEqual(where[id(model.head.weight)]["lr_scale"], 1.0)
        self.assertAlmostEqual(where[id(model.patch_embed.proj.weight)]["lr_scale"], 0.75 ** 4)

    def test_cosine_schedule(self):
        base, low, total, warm = 1e-3, 1e-5, 100, 10
        lr = [M.cosine_schedule(s, total, warm, base, low) for s in range(total + 1)]
        self.assertEqual(lr[0], 0.0)
        self.assertAlmostEqual(lr[5], base / 2, places=12)
        self.assertAlmostEqual(lr[warm], base, places=12)
        self.assertAlmostEqual(lr[total], low, places=12)
        self.assertAlmostEqual(lr[55], (base + low) / 2, places=12)  # halfway through the cosine
        s = 37
        closed = low + 0.5 * (base - low) * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        self.assertAlmostEqual(lr[s], closed, places=12)
        self.assertTrue(all(a < b for a, b in zip(lr[:warm], lr[1:warm + 1])))  # warmup rises
        self.assertTrue(all(a > b for a, b in zip(lr[warm:total], lr[warm + 1:total + 1])))  # then decreases
        self.assertAlmostEqual(M.cosine_schedule(0, total, 0, base, low), base, places=12)


# ---------------------------------------------------------------------------------------------------------------------
# 10. DropPath
# ---------------------------------------------------------------------------------------------------------------------
class TestModelDropPath(unittest.TestCase):
    def test_drops_whole_samples_in_training_only(self):
        torch.manual_seed(0)
        dp = M.DropPath(0.5).train()
        x = torch.randn(400, 6, 5) + 0.1
        out = dp(x)
        dropped = (out == 0).flatten(1).all(1)
        kept = torch.isclose(out, 2 * x, atol=0, rtol=1e-6).flatten(1).all(1)
        self.assertTrue(bool((dropped ^ kept).all()))  # every sample is entirely one or the other
        self.assertTrue(0.4 < dropped.float().mean().item() < 0.6)
        dp.eval()
        self.assertTrue(torch.equal(dp(x), x))
        self.assertTrue(torch.equal(M.DropPath(0.0).train()(x), x))


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
