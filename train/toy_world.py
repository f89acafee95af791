"""Train one part of the toy world's base model (the task: `adapter_studio.toyworld.training`).

    python train/toy_world.py --config configs/toyworld/vae.yaml [--field value ...]
    accelerate launch --multi_gpu --num_processes 2 train/toy_world.py --config ...   # several processes

`python -m adapter_studio.toyworld build` runs every part and the adapters in order (docs/quality.md).
"""

from adapter_studio.toyworld.training import main

if __name__ == "__main__":
    main()
