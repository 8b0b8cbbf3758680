"""Trainers under `accelerate launch`: the training worker starts the launch as a subprocess and follows it.

`train(name, config, launch=..., progress=..., **arguments)` runs trainer `name` (sft, rm) in this process when
`launch` is None, and otherwise as `accelerate launch --config_file FILE -m ml.launch SPEC`: N processes (DDP over
the GPUs of one or several nodes, DeepSpeed ZeRO, or gloo on CPUs), each running `main()` below.

- Data and config go to the processes in a JSON spec file; the main process writes the progress (step, series,
  log) to a state file at most every `interval_s`, which this side reads and hands to its own Progress, so the
  run's page moves as it does in one process.
- Cancel: this side asks `progress.should_stop()` at every poll, and stops the launch's whole process group.
- Only a complete model counts: the main process writes its result file after the model is saved, and this side
  returns only when the launch exited 0 with that file. A launch that fails says why (its error, or the tail of its
  output). The worker's runner then registers the output folder as before.

Pure Python, no Django: the runner passes settings in as values.
"""

import contextlib
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ml.runs import Cancelled, Progress, TrainingFailed, TrainResult, config_from

# name -> (module, function, config class)
TRAINERS = {
    "sft": ("ml.sft", "train_sft", "SFTConfig"),
    "rm": ("ml.reward", "train_reward", "RewardConfig"),
}
RANKED_ARGUMENTS = ("train", "validation", "holdout")  # the reward model's rankings
ROOT = Path(__file__).resolve().parents[1]  # where `-m ml.launch` is found


@dataclass
class Launch:
    """How to launch: an accelerate config file (config/accelerate/*.yaml), and optionally the number of
    processes (0: the file's). On a machine without CUDA the processes run on the CPU (gloo)."""

    config_file: Path
    num_processes: int = 0
    poll_s: float = 0.5
    stop_timeout_s: float = 20.0


def trainer(name: str):
    if name not in TRAINERS:
        raise ValueError(f"no trainer {name!r} runs under a launch (known: {', '.join(TRAINERS)})")
    module, function, config_class = TRAINERS[name]
    loaded = importlib.import_module(module)
    return getattr(loaded, function), getattr(loaded, config_class)


def train(name: str, config, *, launch: Launch | None, progress: Progress, **arguments) -> TrainResult:
    """Run trainer `name` here (`launch` None) or under `accelerate launch`; the same TrainResult either way."""
    function, _ = trainer(name)
    if launch is None:
        return function(config, progress=progress, **arguments)
    return _launched(name, config, launch, progress, arguments)


# --- the worker's side ---


def _to_json(arguments: dict) -> dict:
    encoded = {}
    for key, value in arguments.items():
        if isinstance(value, Path):
            encoded[key] = str(value)
        elif key in RANKED_ARGUMENTS:
            encoded[key] = [dataclasses.asdict(r) for r in value]
        else:
            encoded[key] = [list(v) if isinstance(v, tuple) else v for v in value]
    return encoded


def launch_command(launch: Launch, spec: Path) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.config_file)]
    if launch.num_processes:
        command += ["--num_processes", str(launch.num_processes)]
    return [*command, "-m", "ml.launch", str(spec)]


def launch_environment() -> dict:
    """The launch's environment: this one, plus ACCELERATE_USE_CPU where there is no CUDA, which makes the
    config's multi-GPU launch (torchrun) run its processes on the CPU with gloo."""
    import torch

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    if not torch.cuda.is_available():
        environment["ACCELERATE_USE_CPU"] = "true"
    return environment


def _launched(name: str, config, launch: Launch, progress: Progress, arguments: dict) -> TrainResult:
    output_dir = Path(arguments["output_dir"])
    with tempfile.TemporaryDirectory(prefix=f"launch-{name}-") as folder:
        folder = Path(folder)
        spec, state, result, log = (folder / n for n in ("spec.json", "state.json", "result.json", "output.log"))
        spec.write_text(
            json.dumps(
                {
                    "trainer": name,
                    "config": dataclasses.asdict(config),
                    "arguments": _to_json(arguments),
                    "state": str(state),
                    "result": str(result),
                    "interval_s": progress.interval_s,
                }
            )
        )
        progress.message(f"launching {name} with accelerate ({launch.config_file.name})")
        progress.flush(force=True)
        with open(log, "wb") as output:
            process = subprocess.Popen(
                launch_command(launch, spec),
                env=launch_environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops every rank
            )
            earlier = list(progress.log)  # this side's messages stay above the launch's
            try:
                _follow(process, state, progress, launch, earlier)
            except BaseException:
                _stop(process, launch.stop_timeout_s)
                raise
        _take_state(state, progress, earlier)
        outcome = json.loads(result.read_text()) if result.is_file() else {}
        if process.returncode != 0 or "metrics" not in outcome:
            tail = log.read_text(errors="replace")[-3000:]
            reason = outcome.get("error") or f"the launch exited with {process.returncode}: {tail}"
            raise TrainingFailed(f"{name} under accelerate launch failed: {reason}")
    progress.flush(force=True)
    return TrainResult(output_dir=output_dir, metrics=outcome["metrics"], series=progress.series)


def _follow(process: subprocess.Popen, state: Path, progress: Progress, launch: Launch, earlier: list) -> None:
    while process.poll() is None:
        time.sleep(launch.poll_s)
        if _take_state(state, progress, earlier):
            progress.flush()
        if progress.should_stop is not None and progress.should_stop():
            raise Cancelled("cancelled")


def _take_state(state: Path, progress: Progress, earlier: list) -> bool:
    try:
        taken = json.loads(state.read_text())
    except (OSError, ValueError):  # not written yet (it is replaced whole, never seen half-written)
        return False
    progress.step, progress.total = taken["step"], taken["total"]
    progress.series, progress.log = taken["series"], [*earlier, *taken["log"]][-200:]
    return True


def _stop(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM to the launch's process group, SIGKILL to what is left after `timeout_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- each launched process ---


def _write_atomically(path: Path, payload: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload))
    os.replace(partial, path)


def _from_json(name: str, arguments: dict) -> dict:
    decoded = {}
    for key, value in arguments.items():
        if key.endswith("_dir"):
            decoded[key] = Path(value)
        elif name == "rm" and key in RANKED_ARGUMENTS:
            from ml.reward import Ranked

            decoded[key] = [Ranked(**r) for r in value]
        elif name == "rm" and key == "demonstrations":
            decoded[key] = [tuple(v) for v in value]
        else:
            decoded[key] = value
    return decoded


def main(argv: list[str] | None = None) -> int:
    from ml.parallel import DataParallel

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    name, state, result = spec["trainer"], Path(spec["state"]), Path(spec["result"])
    parallel = DataParallel.from_launch()

    def sink(progress: Progress) -> None:
        _write_atomically(
            state, {"step": progress.step, "total": progress.total, "series": progress.series, "log": progress.log}
        )

    progress = Progress(sink=sink if parallel.is_main else None, interval_s=spec["interval_s"])
    function, config_class = trainer(name)
    try:
        trained = function(
            config_from(config_class, spec["config"]),
            **_from_json(name, spec["arguments"]),
            progress=progress,
            parallel=parallel,
        )
    except (TrainingFailed, ValueError) as exc:
        if parallel.is_main:
            _write_atomically(result, {"error": str(exc)})
        return 3
    except Exception:
        traceback.print_exc()
        return 1
    if parallel.is_main:
        progress.message(f"{name} done in {parallel.world} process(es)")
        sink(progress)
        _write_atomically(result, {"metrics": trained.metrics})
    return 0


if __name__ == "__main__":
    sys.exit(main())
