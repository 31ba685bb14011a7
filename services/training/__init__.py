"""Distributed fine-tuning with Ray Train.

`run.run_training(config)` is the driver: it reads and tokenises the data once, starts
a `TorchTrainer` whose workers run `loop.train_loop_per_worker`, shows progress, and
publishes the best checkpoint to the registry.
"""
