"""The training loop and what runs it.

- trainer.py: one trainer for every stage and model (the loop, accumulation, evaluation, logging,
  checkpoints, exact resume)
- interface.py: the engine interface the trainer uses (a Protocol) and `make_engine`
- optim.py: what both engines share: the optimizer config, parameter groups, the LR schedule
- torch_engine.py: plain PyTorch, DDP under torchrun, expert parallelism
- deepspeed_engine.py and ds_config.py: DeepSpeed ZeRO, with the config's "auto" values filled in
- distributed.py: process-group helpers (no-ops in one process)
- checkpoint.py: training checkpoints (atomic, pruned) and RNG state
- metrics.py: metrics.jsonl and the loss plot
"""
