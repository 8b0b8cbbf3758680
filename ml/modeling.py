"""What the trainers do to a model: LoRA adapters, training the top blocks only (and keeping the frozen blocks'
output), the learning-rate schedule, and saving."""

import math
from pathlib import Path

import torch

from ml.device import autocast
from ml.runs import Progress, TrainingFailed


def cosine_schedule(optimizer, *, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.1):
    """Linear warm-up, then cosine decay to `final_fraction` of the learning rate (InstructGPT: 10%)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_lora(
    model, *, rank: int, alpha: int, dropout: float = 0.0, task_type: str = "CAUSAL_LM", top_layers: int = 0
):
    """Wrap a model with LoRA adapters on its attention and MLP projections (peft).

    `top_layers` > 0 puts adapters on the top blocks only: the backward pass then stops at the lowest adapted
    block, which on a CPU is most of a step's cost (0: every block)."""
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    config = LoraConfig(
        layers_to_transform=list(range(max(layers - top_layers, 0), layers)) if top_layers > 0 else None,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    return get_peft_model(model, config)


ADAPTER_DIR = "adapter"  # a LoRA policy's adapter alone, inside its model folder


def save_model(model, tokenizer, output_dir: Path) -> Path:
    """save_pretrained with safetensors; a LoRA model is merged first, so the folder loads without peft. A LoRA
    policy (causal LM) also keeps its adapter alone in ADAPTER_DIR: what a server that serves the starting model
    loads on top of it at run time (vLLM's /v1/load_lora_adapter) instead of restarting on the merged weights."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and peft_config.task_type == "CAUSAL_LM":
            model.save_pretrained(output_dir / ADAPTER_DIR, safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def train_top_layers_only(model, layers: int) -> int:
    """Freeze the embeddings and all but the top `layers` transformer blocks (0: train everything).

    On a CPU this is what makes training affordable: the backward pass stops at the lowest trained block, and the
    frozen blocks keep no activations. The final norm and the heads (LM head unless tied to the embeddings, the
    reward model's scalar head) stay trainable. Returns the number of trainable parameters.
    """
    if layers > 0:
        blocks = next(
            (
                m
                for m in model.modules()
                if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers
            ),
            None,
        )
        if blocks is None:
            raise TrainingFailed(f"cannot find the transformer blocks of {type(model).__name__} to freeze")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trained = [*blocks[-layers:]]
        trained += [
            m
            for name, m in model.named_modules()
            if name.endswith(("norm", "score", "classifier")) and "layers." not in name
        ]
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if lm_head is not None and lm_head.weight is not model.get_input_embeddings().weight:
            trained.append(lm_head)
        for module in trained:
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrapped(model):
    """The model itself, without a peft (LoRA) wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model):
    """The transformer under a task head (LlamaModel under LlamaForCausalLM or ...ForSequenceClassification)."""
    inner = unwrapped(model)
    return getattr(inner, inner.base_model_prefix)


def transformer_blocks(model) -> torch.nn.ModuleList:
    return backbone_of(model).layers


class _only_blocks:
    """Run a backbone over its blocks [start:stop] only; the final norm applies only when stop is None."""

    def __init__(self, backbone, start: int, stop: int | None):
        self.backbone, self.start, self.stop = backbone, start, stop

    def __enter__(self):
        self.layers, self.count, self.norm = self.backbone.layers, self.backbone.config.num_hidden_layers, None
        picked = list(self.layers)[self.start : self.stop]
        self.backbone.layers = torch.nn.ModuleList(picked)
        self.backbone.config.num_hidden_layers = len(picked)
        if self.stop is not None:
            self.norm, self.backbone.norm = self.backbone.norm, torch.nn.Identity()
        return self

    def __exit__(self, *exc):
        self.backbone.layers, self.backbone.config.num_hidden_layers = self.layers, self.count
        if self.norm is not None:
            self.backbone.norm = self.norm
        return False


class FrozenBlocks:
    """What enters the lowest trained block, for each token row, computed once with no gradient.

    With only the top n of L blocks training (`train_top_layers_only`), the lower L - n blocks compute the same
    states at every epoch. They run once per row here (one no-grad pass), and training then runs the top n blocks
    alone on the kept states: the backbone is called with `inputs_embeds` and only its top blocks (Llama-style
    backbones add nothing to `inputs_embeds`; a subclass checks that its outputs equal the whole model's, and the
    trainers fall back to full passes when they do not). Positions come from the attention mask, as in a full pass.
    """

    def __init__(self, model, tokenizer, *, trained_blocks: int, max_length: int, batch_size: int = 16):
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size
        self.below = len(transformer_blocks(model)) - trained_blocks
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.states: dict[tuple, torch.Tensor] = {}

    def _backbone(self):
        return backbone_of(self.model)

    @torch.no_grad()
    def add(self, rows: list[list[int]], *, progress: "Progress | None" = None) -> None:
        """Compute and keep the states of the rows not kept yet (similar lengths batched together). With
        `progress`, each batch reports (the run's heartbeat: this pass takes minutes with the default model) and
        stops the pass when the run was cancelled."""
        from ml.generation import left_pad

        device = next(self.model.parameters()).device
        missing = sorted({tuple(r) for r in rows if tuple(r) not in self.states}, key=len)
        backbone = self._backbone()
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            ids, mask = left_pad([list(r) for r in chunk], self.pad_id, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with _only_blocks(backbone, 0, self.below), autocast():
                hidden = backbone(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
                ).last_hidden_state
            for i, row in enumerate(chunk):
                self.states[row] = hidden[i, -len(row) :].detach().clone()
            if progress is not None:
                progress.advance(0)

    def hidden(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The top blocks' output (after the final norm) for left-padded rows, and their attention mask."""
        self.add(rows)
        states = [self.states[tuple(r)] for r in rows]
        width = max(len(s) for s in states)
        embeds = states[0].new_zeros((len(states), width, states[0].shape[-1]))
        mask = torch.zeros((len(states), width), dtype=torch.long, device=states[0].device)
        for i, state in enumerate(states):
            embeds[i, width - len(state) :] = state
            mask[i, width - len(state) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        backbone = self._backbone()
        with _only_blocks(backbone, self.below, None), autocast():
            hidden = backbone(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
        return hidden, mask
