"""SFT with the default model in the training worker's process against the same run under `accelerate launch`.

    .venv/bin/python bench/launch.py [--demonstrations 32] [--processes 2] [--max-length 192]

Both runs train the same demonstrations with the same config (top 8 blocks, as the product's CPU default) from the
default model (SmolLM2-135M-Instruct, base v0): first in this process (the baseline), then as a launch of
`--processes` processes through ml/launch.py (gloo on a CPU, one process per GPU where CUDA is present: the same
script is the GPU check). Reported: wall seconds including start-up, train tokens/s as the trainer counts them,
the validation loss of each and their difference, and the launch's speed against the baseline. The last line is
JSON with every figure.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402

from bench.training import default_model_dir, demonstrations, log  # noqa: E402
from ml.launch import Launch, train  # noqa: E402
from ml.runs import Progress  # noqa: E402
from ml.sft import SFTConfig  # noqa: E402


def run(config, chats, validation, model_dir: Path, launch: Launch | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = train(
            "sft",
            config,
            launch=launch,
            progress=Progress(),
            train_chats=chats,
            validation_chats=validation,
            base_dir=model_dir,
            output_dir=Path(out) / "sft",
        )
        wall = time.perf_counter() - started
    metrics = result.metrics
    return {
        "wall_s": round(wall, 1),
        "tokens_per_s": metrics["tokens_per_s"],
        "train_tokens": metrics["train_tokens"],
        "val_loss_initial": metrics["val_loss_initial"],
        "val_loss": metrics["val_loss"],
        "processes": metrics["processes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demonstrations", type=int, default=32)
    parser.add_argument("--processes", type=int, default=torch.cuda.device_count() if torch.cuda.is_available() else 2)
    parser.add_argument("--max-length", type=int, default=192)
    args = parser.parse_args()

    model_dir = default_model_dir()
    chats = demonstrations(args.demonstrations + 8)
    train_chats, validation = chats[: args.demonstrations], chats[args.demonstrations :]
    config = SFTConfig(epochs=1, learning_rate=1e-4, batch_size=8, max_length=args.max_length, train_top_layers=8)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x {os.cpu_count()}"
    log(f"SFT on {len(train_chats)} demonstrations ({device}): one process first")
    one = run(config, train_chats, validation, model_dir, None)
    log(f"one process: {one}")
    launch = Launch(config_file=ROOT / "config" / "accelerate" / "ddp.yaml", num_processes=args.processes)
    log(f"then accelerate launch with {args.processes} processes")
    many = run(config, train_chats, validation, model_dir, launch)
    log(f"{args.processes} processes: {many}")
    figures = {
        "device": device,
        "demonstrations": len(train_chats),
        "one_process": one,
        "launch": many,
        "val_loss_difference": round(abs(many["val_loss"] - one["val_loss"]), 6),
        "launch_tokens_per_s_vs_one": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
        "launch_wall_vs_one": round(many["wall_s"] / one["wall_s"], 2),
    }
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
