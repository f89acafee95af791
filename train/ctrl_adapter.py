"""Train a Ctrl-Adapter (the family's task: `adapter_studio.adapters.ctrl_adapter.training`).

    accelerate launch train/ctrl_adapter.py --config configs/train/ctrl_adapter_tiny.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 train/ctrl_adapter.py --config ...   # several processes
"""

from adapter_studio.adapters.ctrl_adapter.training import main

if __name__ == "__main__":
    main()
