"""MVD-minimal test suite: `python test_mvd.py` (or pytest). Tiny configs (a few layers, 32-64 px, 4-8 frames), CPU only.
Every test checks numbers against an independent computation; the run ends with one line `N passed, N failed`."""
import os
import sys
import tempfile
import unittest

import numpy as np
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import model as M  # noqa: E402


class TestPlaceholderSmoke(unittest.TestCase):
    def test_models_build(self):
        v = torch.randn(1, 3, 4, 32, 32)
        c = M.VideoClassifier("vit_tiny", num_classes=3, num_frames=4, img_size=32, depth=1)
        self.assertEqual(tuple(c(v).shape), (1, 3))


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
