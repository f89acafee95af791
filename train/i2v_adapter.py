"""Train an I2V-Adapter (the family's task: `adapter_studio.adapters.i2v_adapter.training`).

    accelerate launch train/i2v_adapter.py --config configs/train/i2v_adapter_tiny.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 train/i2v_adapter.py --config ...   # several processes
"""

from adapter_studio.adapters.i2v_adapter.training import main

if __name__ == "__main__":
    main()
