"""Train an AGD adapter (the family's task: `adapter_studio.adapters.agd.training`).

    accelerate launch train/agd.py --config configs/train/agd_tiny.yaml [--field value ...]
"""

from adapter_studio.adapters.agd.training import main

if __name__ == "__main__":
    main()
