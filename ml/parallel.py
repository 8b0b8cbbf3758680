"""Data-parallel training through Hugging Face Accelerate, for the trainers that support it (SFT, reward model).

Under `accelerate launch` (ml/launch.py) every process holds a copy of the model and takes its share of each batch.
The trainers keep their single-process batches: each global batch (the same rows, in the same order, as in one
process) is split by rows between the processes, and each process scales its loss so that the gradients the
processes average (DDP's all-reduce, or DeepSpeed's) are the single process's gradient of the whole batch. Sums
that decide something (validation loss, accuracy, token counts) are added up over the processes, so every process
takes the same decisions (best epoch, early stop) and one process (the main one) writes the model.

`DataParallel()` with no accelerator is one process alone: every method is then a no-op and the trainers run
exactly as they did before this existed. Pure torch and accelerate, no Django.
"""

import torch


class DataParallel:
    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    @classmethod
    def from_launch(cls) -> "DataParallel":
        """This process's place in the launch that started it (`accelerate launch`, torchrun): its environment
        says the rank, the number of processes and the backend (NCCL on GPUs, gloo on CPUs)."""
        from accelerate import Accelerator

        return cls(Accelerator())

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """This process's device (cuda:LOCAL_RANK under a GPU launch); None alone (the trainer picks it)."""
        return self.accelerator.device if self.distributed else None

    def rows(self, count: int) -> tuple[list[int], float]:
        """This process's rows of a global batch of `count` rows, and the weight of its loss: a process left
        without a row (a last batch smaller than the number of processes) runs the first row with weight 0, since
        every process must take part in each step's gradient exchange."""
        mine = list(range(self.rank, count, self.world))
        return (mine, 1.0) if mine else ([0], 0.0)

    def share(self, items: list) -> list:
        """This process's share of a list to evaluate (every world-th item)."""
        return items[self.rank :: self.world]

    def total(self, *values: float) -> list[float]:
        """The sums over every process of `values` (the values themselves alone)."""
        if not self.distributed:
            return [float(v) for v in values]
        summed = self.accelerator.reduce(
            torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device), "sum"
        )
        return summed.tolist()

    def prepare(self, module, optimizer):
        """The module and optimizer wrapped for the launch's strategy (DDP, DeepSpeed ZeRO); unchanged alone."""
        if not self.distributed:
            return module, optimizer
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            # DeepSpeed sizes its bookkeeping from a prepared data loader; the trainers batch their own rows.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        return self.accelerator.prepare(module, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        if self.distributed:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float):
        if self.distributed:
            return self.accelerator.clip_grad_norm_(parameters, max_norm)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap(self, module):
        return self.accelerator.unwrap_model(module) if self.distributed else module

    def wait(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def scale(self, local_sum: torch.Tensor, global_count: float, weight: float = 1.0) -> torch.Tensor:
        """A process's loss such that the processes' averaged gradient is that of sum / global_count over the
        whole batch (the average divides by the number of processes, hence the factor)."""
        return local_sum * (weight * self.world / max(global_count, 1.0))
