"""Training: process set-up and the resolved config (launch.py `setup`), the model and DeepSpeed
engine with the DeepSpeed config (engine.py), gradient clipping (clipping.py), the LR and batch
ramp-up schedule (schedules.py), one optimizer step (step.py), the loop (trainer.py), when and how
checkpoints are saved and loaded (checkpointer.py, checkpoint.py, writer.py; the file format is
megatron_neox/checkpoint_files.py), validation, metrics, the loss-spike policy and preemption.
The top library layer: it may import every other package but plan and devtools."""
