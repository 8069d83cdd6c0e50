"""train-adapter on several processes: ``accelerate launch`` of the same stage script.

DVC runs the stage's one command. With ``train.launcher: accelerate`` that process does no
training itself: it starts ``accelerate launch`` on its own script and arguments, waits, and
exits with its status. Each launched process trains on its share of every batch (data
parallel); the first (rank 0) writes every output.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from qlora_pipeline.config import Params, TrainConfig
from qlora_pipeline.errors import PipelineError


# Set for the launched processes: a launcher that started them without torchrun's variables
# must not make each of them launch again.
MARKER = "QLORA_PIPELINE_LAUNCHED"


def launched() -> bool:
    """True inside a process that ``accelerate launch`` (torchrun) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(train: TrainConfig) -> bool:
    if train.launcher != "accelerate" or launched():
        return False
    if os.environ.get(MARKER):
        raise PipelineError("train.launcher: accelerate launch started a process without LOCAL_RANK/WORLD_SIZE; "
                            "check train.accelerate_config's distributed_type")
    return True


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def config_file(name: str | None, configs_dir: Path) -> Path | None:
    """The shipped accelerate config ``train.accelerate_config`` names, or None for plain DDP."""
    if name is None:
        return None
    path = configs_dir / f"{name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in configs_dir.glob("*.yaml"))
        raise PipelineError(f"train.accelerate_config: no {path}; use one of {', '.join(shipped)} or null")
    return path


def check_config(params: Params, path: Path | None) -> None:
    """Refuse combinations that would only fail inside the launched processes, minutes later."""
    if path is None:
        return
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    kind = config.get("distributed_type")
    storage = params.model.quantization.bnb_4bit_quant_storage
    # FSDP flattens each wrapped module's parameters into one tensor of one float dtype; packed
    # uint8 4-bit weights cannot join it (the FSDP-QLoRA recipe stores them as bfloat16).
    shards = kind == "FSDP" or (kind == "DEEPSPEED" and (config.get("deepspeed_config") or {}).get("zero_stage") == 3)
    if shards and params.train.method == "qlora" and storage in (None, "uint8"):
        raise PipelineError(f"train.accelerate_config: {path.name} shards the weights ({kind}), which needs "
                            "model.quantization.bnb_4bit_quant_storage: bfloat16 for a 4-bit base")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise PipelineError(f"train.accelerate_config: {path.name} needs DeepSpeed; pip install deepspeed "
                            "(on the GPU machine), or use fsdp_qlora")
    if kind in ("FSDP", "DEEPSPEED", "MULTI_GPU") and not _cuda():
        raise PipelineError(f"train.accelerate_config: {path.name} ({kind}) needs GPUs; on a CPU use null (DDP)")


def launch_command(train: TrainConfig, config: Path | None, script: str, argv: list[str], port: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(train.num_processes),
               "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    if config is not None:
        command += ["--config_file", str(config)]
    else:
        # torchrun's launcher, on GPUs (NCCL) and CPUs alike: the Trainer's use_cpu then picks gloo.
        # (accelerate's --cpu would start one plain process, or need MPI.)
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*command, script, *argv]


def relaunch(params: Params, configs_dir: Path, script: str, argv: list[str]) -> None:
    """Run this stage again under ``accelerate launch``; raise if any process failed."""
    config = config_file(params.train.accelerate_config, configs_dir)
    check_config(params, config)
    command = launch_command(params.train, config, script, argv, free_port())
    env = {**os.environ, **_thread_split(params.train.num_processes), MARKER: "1"}
    print(f"train-adapter: {params.train.num_processes} processes under accelerate launch"
          f"{f' ({config.name})' if config else ''}", flush=True)
    status = subprocess.run(command, env=env, preexec_fn=_die_with_parent).returncode
    if status != 0:
        raise PipelineError(f"train.launcher: accelerate launch exited with status {status}; "
                            "the processes' own messages are above")


def free_port() -> int:
    """A free port on 127.0.0.1 for the processes' rendezvous: queued experiments may train at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every process (itself when there is one process)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist
    from accelerate import PartialState

    # Joins the process group accelerate launch set up, as the Trainer will (gloo on a CPU).
    PartialState(cpu=not _cuda())
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _thread_split(processes: int) -> dict[str, str]:
    """OMP_NUM_THREADS per process: without it each CPU process starts a pool as wide as the machine."""
    if "OMP_NUM_THREADS" in os.environ or _cuda():
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}


def _die_with_parent() -> None:
    """Linux: the launched processes get SIGKILL when this one dies, so a killed `dvc repro` leaves no
    orphan training on (and writing checkpoints beside) the next run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
