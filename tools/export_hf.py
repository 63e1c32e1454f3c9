"""Export a VideoMAE teacher trained here, or a classifier fine-tuned with --pos_embed 1d, as a transformers folder:

    python tools/export_hf.py output/video_mae/checkpoint-last.pth videomae-teacher/
    python tools/export_hf.py output/finetune/checkpoint-last.pth videomae-classifier/   # fine-tuned with --pos_embed 1d

writes OUT_DIR/config.json and OUT_DIR/model.safetensors (torch alone, no transformers needed). The teacher becomes a
`VideoMAEModel` (encoder and final norm; the pixel decoder stays behind: `VideoMAEForPreTraining`'s decoder norm has a
fixed epsilon of 1e-5, ours 1e-6, so it would not compute ours), the classifier a `VideoMAEForVideoClassification`
(mean pooling, `fc_norm`, `classifier`); `from_pretrained(OUT_DIR)` loads either with no missing or unexpected weights.
Their input is (B, T, C, H, W), ours (B, C, T, H, W). transformers builds VideoMAE's 1D sinusoid table itself, so only
models trained with that table export: MVD's student and the classifiers fine-tuned from it use the 3D sin-cos table,
which those classes cannot hold, and are refused. Two figures differ from ours by construction and are written as
transformers needs them: the classifier's fc_norm epsilon is fixed at 1e-5 there (ours 1e-6: logits move by ~1e-6
relative), and our checkpoints record no class names, so id2label holds LABEL_0, LABEL_1, ... (the label numbers of
the training lists)."""
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import (PREFIXES, SAFETENSORS_DTYPES, VIT_SIZES, VideoClassifier, VideoMAE, load_checkpoint,  # noqa: E402
                   read_checkpoint, saved_args)

# our names -> transformers' VideoMAE names, applied in order after the encoder's `encoder.` prefix is removed
TO_HUB = [(r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."), (r"^blocks\.", "encoder.layer."),
          (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after."),
          (r"\.attn\.proj\.", ".attention.output.dense."), (r"\.attn\.", ".attention.attention."),
          (r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense."), (r"^norm\.", "layernorm."),
          (r"^head\.", "classifier.")]


def write_safetensors(path, tensors):
    """{name: tensor} -> a .safetensors file: 8-byte little-endian header length, JSON header (dtype, shape, byte
    offsets; padded with spaces to 8 bytes), then each tensor's bytes, contiguous, in the header's order."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # the raw bytes, little-endian
        header[name] = dict(dtype=codes[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(data)])
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for data in blobs:
            f.write(data.numpy().data)


def to_hub(state, classifier):
    """Our VideoMAE encoder / VideoClassifier state dict -> transformers' names; qkv is split into query, key, value
    (the key without a bias, as transformers' VideoMAE computes it)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("encoder.")
        for pattern, new in TO_HUB:
            key = re.sub(pattern, new, key)
        if classifier and not key.startswith(("fc_norm.", "classifier.")):
            key = "videomae." + key  # VideoMAEForVideoClassification keeps its encoder under videomae.
        if key.endswith("attention.qkv.weight"):
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[key.replace("qkv", name)] = part
        else:
            out[key] = value
    return out


def export(path, out_dir):
    """-> the config written. Builds our model from the checkpoint (any layout load_checkpoint reads), then writes it
    under transformers' names. One-line ValueError for what transformers' VideoMAE classes cannot hold."""
    state = read_checkpoint(path)
    saved, weights = saved_args(state), {}
    for key, value in state.get("model", state.get("module", state)).items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        weights[key] = value
    classifier, video = "head.weight" in weights, "encoder.patch_embed.proj.weight" in weights
    pos = saved.get("pos_embed", "3d" if classifier else "1d")  # finetune.py records it; an official VideoMAE: 1d
    if not (classifier or video) or pos != "1d":
        what = (f"uses the {pos.upper()} sin-cos table (MVD's student and its classifiers; a classifier that records "
                "no --pos_embed 1d counts as one)" if classifier or video else "is no VideoMAE (an MVD student, whose "
                "table is 3D, or an image MAE)")
        raise ValueError(f"cannot export {path}: it {what}; transformers' VideoMAE classes build only VideoMAE's 1D "
                         "table, so their outputs would differ from ours: nothing written")
    conv = weights["encoder.patch_embed.proj.weight" if video else "patch_embed.proj.weight"]  # (D, 3, tubelet, p, p)
    size = next((k for k, v in VIT_SIZES.items() if v["dim"] == conv.shape[0]), None)
    depth = len([k for k in weights if re.fullmatch(r"(encoder\.)?blocks\.\d+\.norm1\.weight", k)])
    num_frames, img, patch = saved.get("num_frames", 16), saved.get("input_size", 224), conv.shape[-1]
    eps = saved.get("layer_norm_eps", 1e-6)  # ours 1e-6; a transformers folder's own
    if classifier:
        num_classes = weights["head.weight"].shape[0]
        model = VideoClassifier(size, num_classes, num_frames, img, patch, pos="1d", depth=depth, eps=eps)
    else:
        model = VideoMAE(size, num_frames, img, patch, decoder_depth=0, depth=depth, eps=eps)
        print("the pixel decoder is not exported: a VideoMAEModel holds the encoder")
    load_checkpoint(model, weights)
    encoder = model if classifier else model.encoder
    config = dict(architectures=["VideoMAEForVideoClassification" if classifier else "VideoMAEModel"],
                  model_type="videomae", image_size=img, patch_size=patch, num_channels=3, num_frames=num_frames,
                  tubelet_size=encoder.tubelet_size, hidden_size=encoder.dim, num_hidden_layers=encoder.depth,
                  num_attention_heads=encoder.heads, intermediate_size=4 * encoder.dim, hidden_act="gelu",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=eps, qkv_bias=True,
                  use_mean_pooling=classifier, torch_dtype="float32")
    if classifier:
        print(f"{path} records no class names: id2label holds LABEL_0 ... LABEL_{num_classes - 1}")
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), to_hub(model.state_dict(), classifier))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {out_dir}: {config['architectures'][0]} ({size}, {encoder.depth} blocks, {num_frames} frames of "
          f"{img} px)")
    return config


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    try:
        export(sys.argv[1], sys.argv[2])
    except ValueError as e:
        sys.exit(f"export_hf.py: error: {e}")
