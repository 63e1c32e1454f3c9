#!/usr/bin/env bash
# The paper's finding on a laptop: an image teacher passes on appearance, a video teacher motion, co-teaching both.
#
#     bash experiments/coteaching.sh            # seeds 0 1 2 into output/coteaching/seed*; or name seeds: ... 0 3
#     python experiments/report.py output/coteaching     # the table, the claims checked, mvd_coteaching.svg
#
# Per seed: a synthetic set of its own (data.py), the two teachers (pretrain_mae.py), three students at equal budget
# (distill.py: image teacher only, video teacher only, both), then every encoder fine-tuned at equal budget on
# appearance and on motion (finetune.py), with random init, the video teacher itself, and a one-frame baseline.
# Run it from the repository root in the venv of the README. Every stage resumes where it stopped and a finished one
# is skipped, so an interrupted run continues when the command is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
root=${COTEACHING_ROOT:-output/coteaching}

for seed in "${seeds[@]}"; do
    out=$root/seed$seed
    syn=$out/synthetic
    python data.py --synthetic $syn --synthetic_seed $seed --synthetic_videos 2000 --synthetic_val 0.2
    # Every model: a ViT-Tiny cut to 4 blocks, 8 frames of 64 px, patch 16 (a 4x4 grid, 64 tubes a clip)
    size="--model vit_tiny --depth 4 --input_size 64 --num_frames 8 --sampling_rate 2 --patch_size 16 --seed $seed"
    # --cache_videos decodes each list once, up front; the clips are then cheap enough (0.3-1 ms) to prepare in the
    # training process itself: loader workers on the same two cores slowed the model's steps more than they saved
    common="$size --data_root $syn --cache_videos --num_workers 0 --log_every 1000"
    teacher="$common --data_path $syn/appearance/train.csv --decoder_depth 2 --warmup_epochs 2"
    python pretrain_mae.py --mode image $teacher --batch_size 32 --epochs 20 --lr 1e-3 --decoder_dim 128 \
        --output_dir $out/image_mae
    # VideoMAE: a 3D sin-cos position table (the official 1D one left this 4x4x4 grid learning only the clip's
    # mean colour), random masking (tubes at 75% hid the motion too well here), raw pixels as targets, lr 3e-3
    python pretrain_mae.py --mode video $teacher --batch_size 32 --epochs 20 --lr 3e-3 --no-normlize_target \
        --mask_type random --mask_ratio 0.75 --pos_embed 3d --output_dir $out/video_mae
    teachers="--image_teacher $out/image_mae/checkpoint-last.pth --video_teacher $out/video_mae/checkpoint-last.pth"
    for student in image video both; do                                  # equal budget: the same steps for each
        case $student in
            image) weights="--video_teacher_loss_weight 0" ;;
            video) weights="--image_teacher_loss_weight 0" ;;
            both) weights="" ;;
        esac
        python distill.py $common $teachers $weights --data_path $syn/appearance/train.csv --batch_size 32 \
            --epochs 10 --warmup_epochs 1 --lr 1e-3 --output_dir $out/student_$student
    done
    # Fine-tuning: no layer decay (4 blocks, few steps). Motion gets 1 epoch (100 steps): from random init it is
    # learnt in about 200, so a longer budget hides what the initialisation brings; appearance gets 4 epochs.
    finetune="$common --batch_size 16 --layer_decay 1.0 --no-flip --test_num_segment 2 \
        --test_num_crop 1 --lr 1e-3 --crop_scale 0.5 --aa none --reprob 0 --mixup 0 --cutmix 0 --smoothing 0 \
        --num_sample 1"
    motion_budget="--epochs 1 --warmup_epochs 0 --eval_freq 1"
    for task in appearance motion; do
        case $task in
            appearance) budget="--epochs 4 --warmup_epochs 1 --eval_freq 4" ;;
            motion) budget=$motion_budget ;;
        esac
        for init in scratch video_mae image video both; do
            case $init in
                scratch) weights="" ;;
                video_mae) weights="--finetune $out/video_mae/checkpoint-last.pth --pos_embed 3d" ;;
                *) weights="--finetune $out/student_$init/checkpoint-last.pth" ;;
            esac
            python finetune.py $finetune $budget $weights --data_path $syn/$task --output_dir $out/finetune_${task}_$init
        done
    done
    python finetune.py $finetune $motion_budget --finetune $out/student_both/checkpoint-last.pth --sampling_rate 0 \
        --data_path $syn/motion --output_dir $out/finetune_motion_one_frame
done
