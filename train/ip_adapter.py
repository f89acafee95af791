"""Train an IP-Adapter (the family's task: `adapter_studio.adapters.ip_adapter.training`).

    accelerate launch train/ip_adapter.py --config configs/train/ip_adapter_tiny.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 train/ip_adapter.py --config ...   # several processes
"""

from adapter_studio.adapters.ip_adapter.training import main

if __name__ == "__main__":
    main()
