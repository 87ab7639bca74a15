"""The preemption story end to end, on the embedded local store (``make demo``).

1. start ``examples/preemptible_training.py`` (digits, 8 epochs, best model by val_accuracy);
2. send it SIGTERM mid-epoch, as a spot VM's shutdown or Kubernetes would: it checkpoints at the next batch
   boundary, commits, and exits with status 143;
3. run the very same command again: it resumes mid-epoch and finishes;
4. ``cloudckpt ls`` and ``cloudckpt pull best`` with the CLI;
5. evaluate the pulled model on held-out digits.

    python examples/demo.py [--dir DIR] [--sigterm-at-step 90]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = [sys.executable, str(HERE / "preemptible_training.py")]
CLI = [sys.executable, "-m", "cloudckpt.cli"]


def say(text: str) -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    say(f"\n[{n}/5] {text}")


NOISE = ("WARNING: All log messages before absl", "I0000 ", "W0000 ", "E0000 ", "To enable the following instructions")


def stream(proc: subprocess.Popen, stop_at: str | None = None) -> bool:
    """Echo the process's output, indented; return True when a line containing ``stop_at`` was seen."""
    for line in proc.stdout:
        if line.startswith(NOISE):
            continue  # TensorFlow's start-up chatter
        if "Epoch " in line and "/" in line and "step" not in line:
            line = line.replace("Epoch", "epoch")
        say("   | " + line.rstrip())
        if stop_at and stop_at in line:
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="working directory (default: a new temporary one)")
    parser.add_argument("--sigterm-at-step", type=int, default=90)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--evaluate", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evaluate:
        return evaluate(args.evaluate)
    work = Path(args.dir or tempfile.mkdtemp(prefix="cloudckpt-demo-")).resolve()
    if work.exists():
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        shutil.rmtree(work / "pulled", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "ckpt" / ".cloudckpt-store"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("CLOUDCKPT_REMOTE", None)
    train = TRAIN + ["--dir", "ckpt", "--epochs", str(args.epochs)]

    say("cloudckpt demo: training on a preemptible machine, with scikit-learn's digits")
    say(f"working directory: {work}")
    say(f"store (the embedded local default, beside the checkpoint file): {store}")

    step(1, f"start training: {' '.join(Path(a).name if '/' in a else a for a in train)}")
    proc = subprocess.Popen(train, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = f"step {args.sigterm_at_step} "
    if not stream(proc, stop_at=marker):
        say(f"training ended before step {args.sigterm_at_step}; nothing to interrupt")
        return 1

    step(2, f"preempt it: SIGTERM to pid {proc.pid} (what a spot VM's shutdown or Kubernetes sends)")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stream(proc)
    rc = proc.wait()
    say(f"   training exited with status {rc} after {time.monotonic() - sent:.1f}s"
        + (" (143: preempted, checkpoint committed)" if rc == 143 else ""))
    if rc != 143:
        return 1

    step(3, "restart the same command: it resumes where it stopped")
    proc = subprocess.Popen(train, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stream(proc)
    if proc.wait() != 0:
        say(f"   the resumed training failed with status {proc.returncode}")
        return 1

    step(4, "list the run and pull the best model with the CLI")
    for cmd in (CLI + ["ls", "--remote", str(store)],
                CLI + ["pull", "best", "--remote", str(store), "--to", str(work / "pulled")]):
        say("   $ cloudckpt " + " ".join(cmd[3:]))
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        for line in (done.stdout + done.stderr).splitlines():
            say("   | " + line)
        if done.returncode != 0:
            say(f"   cloudckpt exited with status {done.returncode}")
            return 1

    step(5, "evaluate the pulled model on held-out digits")
    proc = subprocess.Popen([sys.executable, __file__, "--evaluate", str(work / "pulled" / "digits.keras")], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stream(proc)
    if proc.wait() != 0:
        return 1
    say("\ndone: interrupted by SIGTERM, resumed mid-epoch, finished, pulled the best model and evaluated it.")
    return 0


def evaluate(path: str) -> int:
    import keras

    sys.path.insert(0, str(HERE))
    from _digits import digits

    _, (x_test, y_test) = digits()
    model = keras.models.load_model(path)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    say(f"pulled/{Path(path).name}: test accuracy {accuracy:.4f} (loss {loss:.4f}) on {len(y_test)} held-out digits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
