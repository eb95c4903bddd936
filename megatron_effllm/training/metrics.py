"""What the user sees: a log line per step, metrics as JSON lines and TensorBoard, and plots of
how the architecture shrank. Only rank 0 writes."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from megatron_effllm.architecture import Architecture
from megatron_effllm.log import get_logger

log = get_logger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
                except Exception as err:  # tensorboard is optional at run time
                    log.warning(f"[metrics] TensorBoard disabled: {err}")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, record["step"])
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/{sub}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
    return out


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> list[str]:
    """PNG plots from metrics.jsonl: loss and parameter count over steps, per-layer widths over
    the run (heads, FFN) and the final shape. Returns the files written."""
    # Here, not at the top: choosing the backend must not be a side effect of importing the trainer.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    steps = [r for r in records if r.get("kind") == "train"]
    shapes = [r for r in records if r.get("kind") == "architecture"]
    if steps:
        fig, ax1 = plt.subplots(figsize=(8, 4))
        ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", lw=1)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot([r["step"] for r in steps], [r["params"] / 1e6 for r in steps], color="tab:red")
        ax2.set_ylabel("parameters (M)", color="tab:red")
        fig.tight_layout()
        path = os.path.join(out_dir, "loss_and_params.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if shapes:
        archs = [(r["step"], Architecture.from_dict(r["architecture"])) for r in shapes]
        n_src = archs[0][1].num_source_layers
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, field, title in ((axes[0], "num_heads", "query heads per layer"),
                                 (axes[1], "ffn_hidden_size", "FFN width per layer")):
            grid = [[0.0] * len(archs) for _ in range(n_src)]
            for j, (_, arch) in enumerate(archs):
                for layer in arch.layers:
                    grid[layer.source_index][j] = getattr(layer, field)
            im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                           extent=(archs[0][0], archs[-1][0] + 1, -0.5, n_src - 0.5))
            ax.set_xlabel("step")
            ax.set_ylabel("layer (source index)")
            ax.set_title(title)
            fig.colorbar(im, ax=ax)
        final = archs[-1][1]
        first = archs[0][1]
        idx = [l.source_index for l in final.layers]
        src_ffn = {l.source_index: l.ffn_hidden_size for l in first.layers}
        src_heads = {l.source_index: l.num_heads for l in first.layers}
        axes[2].bar([i - 0.2 for i in idx], [l.ffn_hidden_size / src_ffn[l.source_index] for l in final.layers],
                    width=0.4, label="FFN kept")
        axes[2].bar([i + 0.2 for i in idx], [l.num_heads / src_heads[l.source_index] for l in final.layers],
                    width=0.4, label="heads kept")
        axes[2].set_ylim(0, 1.05)
        axes[2].set_xlabel("layer (source index)")
        axes[2].set_title(f"final shape: hidden {final.hidden_size}/{first.hidden_size}, "
                          f"{final.num_params() / 1e6:.1f}M params")
        axes[2].legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "architecture.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
