import os
import sys

import torch

# The test models are tiny: one thread is fastest, and avoids oversubscribing CI's two cores when
# the multi-process tests run.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
