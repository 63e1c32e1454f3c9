"""Write the synthetic set, the stages' demo data: `python tools/synthetic.py --synthetic DIR`, printing the paths of
its lists as JSON (data.make_synthetic_set; a stage without --data_path writes it on its own)."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: import data

from data import make_synthetic_set  # noqa: E402

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
