"""Training: transformers' Trainer with peft and bitsandbytes, plus atomic checkpoints, exact resume,
a NaN guard and throughput/memory metrics."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qtune import data as qdata
from qtune import liger, memory_plan, models, rundir, tracking
from qtune.cpu import fit_threads
from qtune.errors import NonFiniteLossError, QtuneError, stage
from qtune.host_memory import map_large_allocations
from qtune.liger import LigerResult
from qtune.paths import atomic_dir, fsync_tree, write_text_atomic
from qtune.recipe import LoadedRecipe, Recipe, TrainingSection, unsupported_export_message

log = logging.getLogger(__name__)


def paged_memory_bytes() -> int:
    """CUDA managed memory held by bitsandbytes' paged optimizer states. torch's allocator never sees it
    (bitsandbytes takes it with cudaMallocManaged), so max_memory_allocated leaves it out. The states
    live from their first step to the end of training, so what is held now is also the peak."""
    try:
        from bitsandbytes.functional import GlobalPageManager
    except ImportError:
        return 0
    return sum(t.numel() * t.element_size() for t in GlobalPageManager.get_instance().paged_tensors)


def peak_memory_gb() -> float:
    """Peak GPU memory (torch's allocator plus paged optimizer states) on CUDA, else peak resident memory."""
    if torch.cuda.is_available():
        return (torch.cuda.max_memory_allocated() + paged_memory_bytes()) / 2**30
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def optimizer_name(training: TrainingSection) -> str:
    """The optimizer that really runs. Paging needs CUDA unified memory; on CPU the same update runs unpaged."""
    if torch.cuda.is_available() or not training.optimizer.startswith("paged_"):
        return training.optimizer
    unpaged = {"paged_adamw_8bit": "adamw_bnb_8bit", "paged_adamw_32bit": "adamw_torch"}[training.optimizer]
    log.info("on CPU %s runs as %s: paging needs CUDA unified memory", training.optimizer, unpaged)
    return unpaged


@dataclass(frozen=True)
class FusedKernels:
    """What `use_fused_kernels` did: how many of the model's 4-bit LoRA layers it routed through the fused
    kernels, which it left on peft's path and why, and why the kernels are off when they are."""

    patched: int
    layers: int
    left_out: dict[str, str]
    off_because: str = ""


def use_fused_kernels(model, recipe: Recipe) -> FusedKernels:
    """Route the 4-bit LoRA layers through qtune's fused NF4 kernels as ``training.fused_kernels`` says
    (``auto``: on CUDA), once they have passed their self-check on this device (see `fuse`)."""
    switch = recipe.training.fused_kernels
    device = next(model.parameters()).device
    if switch == "off":
        return FusedKernels(0, 0, {}, "training.fused_kernels is off")
    if device.type != "cuda" and switch == "auto":
        return FusedKernels(0, 0, {}, "no CUDA device (auto turns them on with CUDA)")
    if not recipe.quantization.load_in_4bit or recipe.quantization.quant_type != "nf4":
        return FusedKernels(0, 0, {}, "the base is not loaded in 4-bit NF4")
    return fuse(model, required=switch == "on", autocast=autocast_dtype(recipe, device))


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """Training's mixed precision: autocast in the compute dtype on CUDA when it is bf16 or fp16, none otherwise."""
    dtype = models.compute_dtype(recipe.quantization)
    return dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None


def use_liger(model, recipe: Recipe) -> LigerResult:
    """liger-kernel's fused linear cross-entropy, RMSNorm and gated MLP on the (not yet LoRA-wrapped) base,
    as ``training.liger`` says (``auto``: on CUDA), once they have passed their self-check (qtune.liger)."""
    switch = recipe.training.liger
    device = next(model.parameters()).device
    if switch == "off":
        return LigerResult(False, "training.liger is off")
    if device.type != "cuda" and switch == "auto":
        return LigerResult(False, "no CUDA device (auto turns it on with CUDA)")
    return liger.enable(model, required=switch == "on", autocast=autocast_dtype(recipe, device))


def fuse(model, required: bool, autocast: torch.dtype | None) -> FusedKernels:
    """Patch the model's fusable 4-bit LoRA layers, after the kernel configurations they use have passed
    their self-check on the model's device (``qtune.kernels.selfcheck``, cached per device and versions).

    Not required (``auto``): on a failed check, or when no layer can take the kernels, log why and leave
    the model on peft + bitsandbytes. Required (``on``): raise instead, and also when any 4-bit LoRA
    layer is left out. Either way the layers left out are named, with the reason.
    """
    from qtune.kernels import qlora_linear, selfcheck

    device = next(model.parameters()).device
    plan = qlora_linear.fusion_plan(model)
    left_out = "; ".join(f"{name}: {why}" for name, why in plan.left_out.items())
    problem = ""
    if not plan.fusable:
        problem = f"none of the model's {plan.layers} 4-bit LoRA layers can take them" + (f" ({left_out})" if left_out else "")
    elif required and plan.left_out:
        problem = f"{len(plan.left_out)} of {plan.layers} 4-bit LoRA layers cannot take them: {left_out}"
    else:
        failed = [v for v in selfcheck.check(selfcheck.configs_for(model, plan.fusable, autocast), device) if not v.ok]
        if failed:
            problem = f"they failed their self-check on {device} ({failed[0].config.describe()}): {failed[0].reason}"
    if problem:
        if required:
            raise QtuneError(f"training.fused_kernels is on, but {problem}; set it to auto to train on peft + bitsandbytes")
        log.warning("fused NF4 QLoRA kernels off: %s; training runs on peft + bitsandbytes", problem)
        return FusedKernels(0, plan.layers, plan.left_out, problem)
    patched = qlora_linear.patch_peft_model(model)
    if patched != len(plan.fusable):
        raise RuntimeError(f"patched {patched} layers where {len(plan.fusable)} were fusable")
    if plan.left_out:
        log.warning("%d of %d 4-bit LoRA layers keep peft's path: %s", len(plan.left_out), plan.layers, left_out)
    log.info("fused NF4 QLoRA kernels on %d of %d 4-bit LoRA layers", patched, plan.layers)
    return FusedKernels(patched, plan.layers, plan.left_out)


def _trainer_class():
    from transformers import Trainer

    class QtuneTrainer(Trainer):
        """Trainer with atomic checkpoints, a NaN/inf guard, and tokens/s + peak memory in every log."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tokens_seen = 0
            self._last_log = (time.perf_counter(), 0)

        def training_step(self, model, inputs, num_items_in_batch=None):
            fit_threads()
            self.tokens_seen += int(inputs.pop("num_real_tokens", inputs["input_ids"].numel()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            bad = torch.tensor(float(not torch.isfinite(loss).all()), device=loss.device)
            if self.args.world_size > 1:
                torch.distributed.all_reduce(bad)
            if bad.item():
                raise NonFiniteLossError(f"the training loss became {loss.item()} at step {self.state.global_step + 1}")
            return loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs.pop("num_real_tokens", None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

        def log(self, logs, start_time=None):
            now = time.perf_counter()
            since, tokens_then = self._last_log
            if "loss" in logs:
                tokens = self.tokens_seen * self.args.world_size
                logs["tokens_per_second"] = round((tokens - tokens_then) / max(now - since, 1e-9), 2)
                logs["peak_memory_gb"] = round(peak_memory_gb(), 3)
                self._last_log = (now, tokens)
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            # Trainer writes checkpoint-N in place; write it into a staging directory and rename it,
            # so a checkpoint-N directory is always complete.
            run_dir = Path(self.args.output_dir)
            final = run_dir / f"checkpoint-{self.state.global_step}"
            # every rank writes into it, so its name cannot carry one process's PID
            staging_root = run_dir / f".checkpoint-{self.state.global_step}.tmp-staging"
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.args.output_dir = str(staging_root)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(run_dir)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                written = staging_root / final.name
                fsync_tree(written)
                os.replace(written, final)
                shutil.rmtree(staging_root, ignore_errors=True)
                self.state.best_model_checkpoint = None
                _rotate(run_dir, self.qtune_keep)
            self.accelerator.wait_for_everyone()

    return QtuneTrainer


def _rotate(run_dir: Path, keep: int) -> None:
    for old in rundir.checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def training_arguments(recipe: Recipe, run_dir: Path, report_to: list[str]):
    from transformers import TrainingArguments

    t = recipe.training
    on_cuda = torch.cuda.is_available()
    mixed = autocast_dtype(recipe, torch.device("cuda" if on_cuda else "cpu"))
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        optim=optimizer_name(t),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,
        report_to=report_to,
        run_name=recipe.tracking.run_name or run_dir.name,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        use_cpu=not on_cuda,
        bf16=mixed == torch.bfloat16,
        fp16=mixed == torch.float16,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def _wait_for_claim(run_dir: Path, fingerprint: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (rundir.read_run_file(run_dir) or {}).get("fingerprint") == fingerprint:
                return
        except QtuneError:  # caught mid-write
            pass
        time.sleep(0.2)
    raise QtuneError(f"rank 0 did not claim {run_dir} within {timeout:.0f} s")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int | None  # None when the run directory already held a trained adapter

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / rundir.ADAPTER_DIR


def train(loaded: LoadedRecipe, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train the recipe's adapter into run_dir/adapter (the run directory is the recipe's output.dir)."""
    with stage("train", loaded.output_dir):
        return _train(loaded, resume, overwrite)


def _train(loaded: LoadedRecipe, resume: bool, overwrite: bool) -> TrainResult:
    from accelerate import PartialState
    from transformers import set_seed

    recipe = loaded.with_absolute_paths()
    run_dir = loaded.output_dir
    state = PartialState()
    # The launcher's RANK decides who claims the directory: before the Trainer's accelerator starts the
    # process group, PartialState can see a single process in every rank, and two claims race.
    rank = int(os.environ.get("RANK", state.process_index))
    if rank == 0:
        rundir.claim(run_dir, recipe, resume=resume, overwrite=overwrite)
    state.wait_for_everyone()
    if rank != 0:
        _wait_for_claim(run_dir, rundir.fingerprint(recipe))
    if rundir.is_trained(run_dir) and not overwrite:
        log.info("%s already holds a trained adapter; nothing to train", run_dir)
        return TrainResult(run_dir, None)
    resume_from = rundir.latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        log.info("no complete checkpoint in %s yet; starting from the beginning", run_dir)
    elif resume_from is not None:
        log.info("resuming from %s", resume_from.name)

    set_seed(recipe.training.seed)
    checkpoint = models.resolve_base(recipe.model)
    if recipe.export:  # validation could not read a hub base's config before its download; check before training
        problem = unsupported_export_message(json.loads((checkpoint / "config.json").read_text()).get("model_type"))
        if problem:
            raise QtuneError(f"export: {problem}")
    memory_plan.log_stage(loaded, "train")
    tokenizer = models.load_tokenizer(checkpoint, recipe.model.trust_remote_code)
    prepared = qdata.prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed)
    if state.is_main_process:
        write_text_atomic(run_dir / "data_report.json", json.dumps({k: v.as_dict() for k, v in prepared.reports.items()}, indent=2))
    log.info("data: %s", {k: v.as_dict() for k, v in prepared.reports.items()})

    if models.device().type == "cpu":  # each step dequantizes every weight; see host_memory
        map_large_allocations()
    base = models.load_base(checkpoint, recipe.model, recipe.quantization)
    liger_result = use_liger(base, recipe)
    model = models.attach_lora(base, recipe.lora, recipe.training.gradient_checkpointing)
    fused = use_fused_kernels(model, recipe)

    run = tracking.start_run(recipe, run_dir) if state.is_main_process else None
    report_to = ["wandb"] if run is not None else []
    args = training_arguments(recipe, run_dir, report_to)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.validation if recipe.training.eval_steps and prepared.validation else None,
        data_collator=qdata.Collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.qtune_keep = recipe.training.keep_checkpoints
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except NonFiniteLossError as exc:
        last = rundir.latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {last.name}" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"{exc}; training stopped, {kept}. Lower training.learning_rate or check the data") from None
    except OSError as exc:
        if state.is_main_process:
            rundir.remove_staging(run_dir)
        last = rundir.latest_checkpoint(run_dir)
        kept = f"the latest complete checkpoint is still {last.name}" if last else "no complete checkpoint exists yet"
        reason = "the disk is full" if exc.errno == errno.ENOSPC else f"writing failed ({exc.strerror or exc})"
        raise QtuneError(f"{reason} while saving to {run_dir}; {kept}. Free space and run again with --resume") from None
    finally:
        tracking.finish_run(run)
    elapsed = time.perf_counter() - started

    if state.is_main_process:
        with atomic_dir(run_dir / rundir.ADAPTER_DIR, overwrite=True) as staging:
            trainer.model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        history = trainer.state.log_history
        write_text_atomic(run_dir / "train_log.json", json.dumps(history, indent=2))
        losses = [h["loss"] for h in history if "loss" in h]
        rundir.update_run_file(
            run_dir,
            trained=True,
            train_seconds=round(elapsed, 1),
            steps=trainer.state.global_step,
            final_loss=losses[-1] if losses else None,
            tokens_seen=trainer.tokens_seen * args.world_size,
            peak_memory_gb=round(peak_memory_gb(), 3),
            kernels={
                "fused_qlora_layers": fused.patched,
                "lora_4bit_layers": fused.layers,
                "fused_qlora_off_because": fused.off_because,
                "liger": liger_result.applied,
                "liger_off_because": liger_result.off_because,
            },
        )
    state.wait_for_everyone()
    return TrainResult(run_dir, trainer.state.global_step)
