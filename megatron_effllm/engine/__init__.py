"""The training-engine seam: ``base.TrainEngine`` is what the trainer and the pruning runtimes
speak to; ``deepspeed_engine`` is its DeepSpeed ZeRO implementation and the only module of the
package that imports ``deepspeed``."""
