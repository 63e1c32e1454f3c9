"""The co-teaching experiment's table, its claims and its figure, from the log.txt files of experiments/coteaching.sh.

    python experiments/report.py output/coteaching          # prints the Markdown table and the claims, writes the SVG

Every number is the final held-out top-1 of a run (the last line of its log.txt), as mean ± std over the seeds found
(folders seed*); std is the sample standard deviation (0 for one seed).
"""
import argparse
import glob
import json
import os
import statistics

ENCODERS = {"scratch": "random init (no pretraining)", "video_mae": "the video teacher itself (VideoMAE)",
            "image": "student of the image teacher", "video": "student of the video teacher",
            "both": "student of both teachers"}
TASKS = ("appearance", "motion")
CHANCE = 25.0  # 4 classes
COLOURS = {"scratch": "#999", "video_mae": "#9cc3e8", "image": "#e08a1e", "video": "#2a6fbb", "both": "#7b3fa0",
           "one_frame": "#fff"}


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def top1(runs, name):
    """(mean, std) over the seeds of the final held-out top-1 of run `name` (e.g. finetune_motion_video)."""
    values = [read_log(os.path.join(run, name, "log.txt"))[-1]["test_top1"] for run in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(runs):
    lines = [f"| encoder ({len(runs)} seeds, held-out top-1 %, mean ± std) | appearance | motion |", "|---|---|---|"]
    for key, label in ENCODERS.items():
        lines.append(f"| {label} | " + " | ".join("%.1f ± %.1f" % top1(runs, f"finetune_{task}_{key}")
                                                  for task in TASKS) + " |")
    lines.append("| student of both, one frame repeated |  | %.1f ± %.1f |" % top1(runs, "finetune_motion_one_frame"))
    return "\n".join(lines)


def claims(runs):
    """The paper's finding as conditions on the table: [(statement, holds)]."""
    def score(task, key):
        return top1(runs, f"finetune_{task}_{key}")

    def beats(a, b):  # a's mean above b's by more than the larger std
        return a[0] - b[0] > max(a[1], b[1])

    out = [("motion: the video teacher itself beats random init by more than a std",
            beats(score("motion", "video_mae"), score("motion", "scratch"))),
           ("motion: one frame repeated stays within 5 points of chance (the image side cannot see motion)",
            top1(runs, "finetune_motion_one_frame")[0] < CHANCE + 5),
           ("motion: the student of the video teacher beats the image teacher's by more than the larger std",
            beats(score("motion", "video"), score("motion", "image"))),
           ("appearance: the student of the image teacher beats the video teacher's by more than the larger std",
            beats(score("appearance", "image"), score("appearance", "video")))]
    for task in TASKS:
        best = max((score(task, key) for key in ("image", "video")), key=lambda s: s[0])
        both = score(task, "both")
        out.append((f"{task}: co-teaching within a std of the better single teacher, or above it",
                    both[0] >= best[0] - max(both[1], best[1])))
        for key in ("image", "video", "both"):
            out.append((f"{task}: the {ENCODERS[key]} above random init", score(task, key)[0] > score(task, "scratch")[0]))
    return out


def figure(runs):
    """SVG: each student's distillation loss to each teacher per epoch, seed mean (left); top-1 bars, ± 1 std (right)."""
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="900" height="340" font-family="sans-serif" font-size="12">',
           '<rect width="900" height="340" fill="white"/>']

    def text(x, y, s, anchor="middle", style=""):
        svg.append(f'<text x="{x:.0f}" y="{y:.0f}" text-anchor="{anchor}" {style}>{s}</text>')

    def axes(x0, x1, ticks, y, title):  # from y=60 down to 290, x0 to x1; labelled ticks on the left, a title
        svg.append(f'<path d="M{x0},60 V290 H{x1}" fill="none" stroke="black"/>')
        for value, name in ticks:
            svg.append(f'<path d="M{x0 - 4},{y(value):.1f} h4" stroke="black"/>')
            text(x0 - 7, y(value) + 4, name, "end")
        text((x0 + x1) / 2, 18, title, style='font-weight="bold"')

    # left: losses; a student of one teacher has one curve, the co-taught one two (solid: image, dashed: video)
    curves = {}
    for student in ("both", "image", "video"):
        for teacher in ("img", "vid"):
            if student == "both" or student[0] == teacher[0]:
                per_seed = [[e[f"train_loss_{teacher}"] for e in read_log(os.path.join(r, f"student_{student}",
                                                                                        "log.txt"))] for r in runs]
                curves[student, teacher] = [statistics.mean(v) for v in zip(*per_seed)]
    high, epochs = 1.1 * max(max(c) for c in curves.values()), len(curves["both", "img"])
    y, x = (lambda v: 290 - 230 * v / high), (lambda e: 50 + 330 * e / max(1, epochs - 1))
    axes(50, 380, [(high * i / 4, f"{high * i / 4:.2f}") for i in range(5)], y, "distillation loss (seed mean)")
    for i, key in enumerate(("image", "video", "both")):
        svg.append(f'<rect x="{60 + 92 * i}" y="29" width="10" height="10" fill="{COLOURS[key]}" stroke="#333"/>')
        text(74 + 92 * i, 38, {"image": "image only", "video": "video only"}.get(key, key), "start")
    text(215, 54, "solid: to the image teacher, dashed: to the video teacher", style='font-size="11"')
    for e in range(0, epochs, max(1, epochs // 5)):
        svg.append(f'<path d="M{x(e):.1f},290 v4" stroke="black"/>')
        text(x(e), 306, e + 1)
    text(215, 324, "epoch")
    for (student, teacher), curve in sorted(curves.items(), key=lambda item: item[0][0] == "both"):
        points = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in enumerate(curve))
        dash = 'stroke-dasharray="6,4"' if teacher == "vid" else ""
        svg.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS[student]}" '
                   f'stroke-width="{2 if student == "both" else 6}" {dash}/>')
    # right: bars, one group per task, with the one-frame baseline on motion
    groups = [(task, [(key, f"finetune_{task}_{key}") for key in ENCODERS] +
               ([("one_frame", "finetune_motion_one_frame")] if task == "motion" else [])) for task in TASKS]
    bars = [(task, key, *top1(runs, name)) for task, members in groups for key, name in members]
    high = 50 if max(m + s for _, _, m, s in bars) < 48 else 100
    y = lambda v: 290 - 230 * v / high  # noqa: E731
    axes(470, 890, [(v, f"{v}%") for v in range(0, high + 1, high // 5)], y, "held-out top-1, fine-tuned, seed "
         "mean ± std (dashed: chance)")
    left = 480
    for key in COLOURS:  # each label as wide as its text (~7 px a letter)
        name = {"scratch": "random", "video_mae": "VideoMAE", "one_frame": "1 frame"}.get(key, key)
        svg.append(f'<rect x="{left}" y="29" width="10" height="10" fill="{COLOURS[key]}" stroke="#333"/>')
        text(left + 14, 38, name, "start")
        left += 28 + 7 * len(name)
    svg.append(f'<path d="M470,{y(CHANCE)} H890" stroke="#c00" stroke-dasharray="3,3"/>')
    left = 490
    for task, members in groups:
        text(left + 12 * len(members), 310, task, style='font-weight="bold"')
        for key, name in members:
            mean, std = top1(runs, name)
            svg.append(f'<rect x="{left}" y="{y(mean):.1f}" width="22" height="{290 - y(mean):.1f}" '
                       f'fill="{COLOURS[key]}" stroke="#333"/>')
            svg.append(f'<path d="M{left + 11},{y(mean - std):.1f} V{y(mean + std):.1f}" stroke="black"/>')
            left += 26
        left += 40
    return "\n".join(svg + ["</svg>"]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="output/coteaching", help="the folder holding seed0, seed1, ...")
    p.add_argument("--svg", default="mvd_coteaching.svg", help="where the figure is written")
    args = p.parse_args(argv)
    names = [f"finetune_{task}_{key}" for task in TASKS for key in ENCODERS] + ["finetune_motion_one_frame"]
    found = sorted(glob.glob(os.path.join(args.root, "seed*")))
    def finished(run, name):  # a fine-tuning's log ends with its final evaluation
        path = os.path.join(run, name, "log.txt")
        return os.path.exists(path) and "test_top1" in read_log(path)[-1]

    runs = [run for run in found if all(finished(run, name) for name in names)]
    if not runs:
        raise SystemExit(f"report.py: error: no finished seed* folder in {args.root}: run experiments/coteaching.sh")
    if len(runs) < len(found):
        print(f"not finished yet, left out: {', '.join(sorted(set(found) - set(runs)))}\n")
    print(table(runs) + "\n")
    for statement, holds in claims(runs):
        print(f"- [{'x' if holds else ' '}] {statement}")
    with open(args.svg, "w") as f:
        f.write(figure(runs))
    print(f"\nfigure: {args.svg}")


if __name__ == "__main__":
    main()
