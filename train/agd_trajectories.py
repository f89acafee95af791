"""Record CFG trajectories of the teacher for AGD training (`adapter_studio.adapters.agd.trajectories`).

    python train/agd_trajectories.py --config configs/train/agd_tiny_trajectories.yaml [--field value ...]
"""

import sys

from adapter_studio.adapters.agd.trajectories import main

if __name__ == "__main__":
    sys.exit(main())
