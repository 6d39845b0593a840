"""A run's metrics, one owner: `metrics.jsonl` (one row per logged step), TensorBoard's events
(`--train.report_to tensorboard`) and the loss plot `loss.png`; a resumed run drops what was
logged after its checkpoint's step before writing again."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Rows appended to `out/metrics.jsonl` (and TensorBoard's events when asked); only the rank
    that writes (rank 0) opens one."""

    def __init__(self, out: Path, report_to: list[str], resumed_step: int | None, fresh: bool):
        """`resumed_step`: the step a checkpoint was resumed at (later rows are dropped); `fresh`:
        a run that was not asked to resume starts a new file."""
        self.path = out / "metrics.jsonl"
        if resumed_step is not None:
            self._truncate(resumed_step)
        elif fresh and self.path.exists():
            self.path.unlink()
        self.board = None
        if "tensorboard" in report_to:  # events after a resumed step are dropped: no doubles
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)
        self.start(0)

    def start(self, tokens: int) -> None:
        """The clock and the token count that the next row's rates are measured from."""
        self.last_time, self.last_tokens = time.time(), tokens

    def _truncate(self, step: int) -> None:
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, row: dict) -> None:
        """Append `row` (with `step`, `loss`, `lr`, `grad_norm`, `tokens`); `seconds_since_last` is
        added, and tokens/s since the last row goes to TensorBoard."""
        now = time.time()
        dt = max(now - self.last_time, 1e-9)
        row = {**row, "seconds_since_last": round(dt, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key in ("loss", "lr", "grad_norm"):
                self.board.add_scalar(f"train/{key}", row[key], row["step"])
            self.board.add_scalar("train/tokens_per_s", (row["tokens"] - self.last_tokens) / dt, row["step"])
            self.board.flush()
        self.last_time, self.last_tokens = now, row["tokens"]

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None

    def plot(self, out: Path) -> None:
        if self.path.exists():
            plot_loss(self.path, out)


def plot_loss(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmforge.io import atomic_save

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(out.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
