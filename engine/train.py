"""The training process: `python -m engine.train --run-dir DIR [--resume]` trains one run, reporting events.

stdout carries JSON-lines events only (also appended to DIR/events.jsonl); logs go to stderr and train.log.
The loop is transformers' Trainer with peft; this module adds what a long unattended run needs: prompt-masked
examples rendered by engine.template, atomic step_<n> checkpoints, events with throughput and ETA, clean stops
on SIGTERM/SIGINT, honest resume, and every failure reported as run_failed with a cause and a next step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from engine import distributed
from engine.atomic import atomic_write_text, disk_full_error, is_disk_full, is_partial, tree_bytes
from engine.errors import DatasetError, EngineError, TrainingError
from engine.events import (
    CheckpointSaved,
    Eval,
    EventWriter,
    Log,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    Step,
    claim_stdout,
)
from engine.launch import DatasetInfo, check_resumable, dataset_info, read_run_meta
from engine.modeling import DEMO_BASE, check_loadable, resolve_base_model
from engine.recipes import Recipe, load_recipe
from engine.template import IGNORE_INDEX, EncodedPair, PromptRenderer
from engine.workspace import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    MARKER_FILE,
    RUN_EVENTS_FILE,
    RUN_LOG_FILE,
    RUN_META_FILE,
    RUN_PID_FILE,
    RUN_RECIPE_FILE,
    Workspace,
    checkpoint_dirs,
    checkpoint_step,
    latest_checkpoint,
)

log = logging.getLogger("engine.train")

FAULT_ENV = "TUNEDECK_FAULT"  # see Fault
FAULT_RANK_ENV = "TUNEDECK_FAULT_RANK"  # when set, the fault strikes only the rank it names
# HF's Trainer writes checkpoint-<n>/ inside this temp folder; it is renamed to step_<n> when complete.
STAGING_NAME = ".staging.partial-"
ETA_WINDOW = 20  # steps in the moving average behind the ETA
SETUP_STAGE = "setup"


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived before training began: nothing to checkpoint, so stop at once."""


class StopSignal:
    """Turns SIGTERM/SIGINT into a polite stop: an exception before training, a flag the loop checks in it."""

    def __init__(self, *, immediate: bool = True) -> None:
        self.requested = False
        self.training = False
        # Ranks of a distributed run must stop after the same step, so there a stop is only ever a flag.
        self.immediate = immediate

    def install(self) -> None:
        """Handle SIGTERM and SIGINT in this (main) thread."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.requested
        self.requested = True
        if first:
            log.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)
        if self.immediate and not self.training:
            raise StopRequested()


@dataclasses.dataclass
class Fault:
    """A failure or delay injected through TUNEDECK_FAULT, so failure reporting and stops can be tested.

    `oom_at_step:N` raises a CUDA out-of-memory error inside step N, `crash_at_step:N` a RuntimeError, and
    `slow_steps:S` sleeps S seconds in every step (to make a run slow enough to interrupt).
    """

    kind: str
    value: float

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec or os.environ.get(FAULT_RANK_ENV, str(distributed.rank())) != str(distributed.rank()):
            return None
        kind, _, value = spec.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if kind not in ("oom_at_step", "crash_at_step", "slow_steps") or number < 0:
            log.warning(
                "ignoring %s=%r (want oom_at_step:N, crash_at_step:N or slow_steps:SECONDS)", FAULT_ENV, spec
            )
            return None
        return cls(kind, number)

    def at_step(self, step: int) -> None:
        """Apply the fault as optimizer step `step` begins."""
        if self.kind == "slow_steps":
            time.sleep(self.value)
            return
        if step != int(self.value):
            return
        import torch

        if self.kind == "oom_at_step":
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {FAULT_ENV} at step {step}).")
        raise RuntimeError(f"simulated crash ({FAULT_ENV} at step {step})")


# ----------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Examples:
    """Tokenized training and evaluation examples, and what was cut or dropped to fit max_length."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/eval split of `count` rows; at least one row on each side when a fraction is asked for."""
    indices = list(range(count))
    if eval_fraction <= 0 or count < 2:
        return indices, []
    random.Random(seed).shuffle(indices)
    eval_count = min(max(1, round(count * eval_fraction)), count - 1)
    return sorted(indices[eval_count:]), sorted(indices[:eval_count])


def encode_examples(renderer: PromptRenderer, pairs: list[Any], recipe: Recipe) -> Examples:
    """Render every pair through the chat template and mask its prompt; cut answers that exceed max_length."""
    max_length = recipe.data.max_length
    train_idx, eval_idx = split_indices(len(pairs), recipe.data.eval_fraction, recipe.train.seed)
    examples = Examples([], [])
    encoded: dict[int, EncodedPair] = {}
    for index, pair in enumerate(pairs):
        item = renderer.encode(pair, max_length)
        if item.trained_tokens == 0:
            examples.dropped += 1
            continue
        examples.truncated += int(item.truncated)
        encoded[index] = item
    for target, indices in ((examples.train, train_idx), (examples.eval, eval_idx)):
        for index in indices:
            if index in encoded:
                target.append({"input_ids": encoded[index].input_ids, "labels": encoded[index].labels})
    examples.trained_tokens = sum(encoded[i].trained_tokens for i in train_idx if i in encoded)
    if not examples.train:
        raise DatasetError(
            f"No row leaves room for an answer within data.max_length={max_length} tokens.",
            next_step="Raise data.max_length or shorten the questions and system prompt.",
        )
    return examples


def answer_window(inputs: dict[str, Any]) -> dict[str, Any]:
    """Ask the model for logits only from the last prompt token on: prompt positions carry no loss, and the
    vocabulary projection of every position is a large share of a small model's work and memory."""
    labels = inputs.get("labels")
    if labels is None:
        return inputs
    trained = labels != IGNORE_INDEX
    rows = trained.any(dim=1)
    if not bool(rows.any()):
        return inputs
    first = int(trained.int().argmax(dim=1)[rows].min())
    start = max(first - 1, 0)
    if start == 0:
        return inputs
    # The model shifts labels by one inside the window, so it starts one token before the first answer token.
    return {**inputs, "labels": labels[:, start:].contiguous(), "logits_to_keep": labels.shape[1] - start}


def accepts_logits_to_keep(model: Any) -> bool:
    """True when the (unwrapped) model's forward takes `logits_to_keep`, as transformers' causal LMs do."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class PadCollator:
    """Pads a batch on the right: ids with the pad id, labels with IGNORE_INDEX, optionally to a multiple."""

    def __init__(self, pad_id: int, multiple: int | None = None) -> None:
        self.pad_id = pad_id
        self.multiple = multiple

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(feature["input_ids"]) for feature in features)
        if self.multiple:
            width = math.ceil(width / self.multiple) * self.multiple
        input_ids, labels, attention = [], [], []
        for feature in features:
            pad = width - len(feature["input_ids"])
            input_ids.append(feature["input_ids"] + [self.pad_id] * pad)
            labels.append(feature["labels"] + [IGNORE_INDEX] * pad)
            attention.append([1] * len(feature["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
        }


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _fsync_tree(folder: Path) -> None:
    # Checkpoint files must be on disk before the rename makes the folder look complete.
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_partial_checkpoints(run_dir: Path) -> list[str]:
    """Remove temp folders an interrupted save left in checkpoints/; returns their names."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if is_partial(path) or path.name.startswith(".staging"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}"


# ----------------------------------------------------------------------------------------------------
# The job


class TrainingJob:
    """One attempt at training a run folder: setup, the Trainer loop, checkpoints and events."""

    def __init__(self, run_dir: Path, writer: EventWriter, stop: StopSignal, *, resume: bool) -> None:
        self.run_dir = Path(run_dir)
        self.writer = writer
        self.stop = stop
        self.resume = resume
        self.started = time.monotonic()
        self.fault = Fault.from_env()
        self.recipe: Recipe | None = None
        self.device = "cpu"
        self.resume_checkpoint: Path | None = None
        self.last_checkpoint: Path | None = None
        self.last_loss: float | None = None
        self.global_step = 0
        self.last_eval_step = -1
        self.logits_window = False
        # The packed-path runner (engine.fast.PackedCausalLM) when training goes through packs, else None.
        self.runner: Any = None
        # A fixed order of training examples instead of the Trainer's sampler (to compare paths step by step).
        self.sample_order: list[int] | None = None
        self.max_steps = 0
        self.tokens_since_log = 0
        self.last_log_time = time.monotonic()
        self.last_step_time: float | None = None
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=ETA_WINDOW)

    # -- setup ----------------------------------------------------------------------------------------------

    def _workspace(self, meta: dict[str, Any]) -> Workspace:
        recorded = Path(str(meta.get("workspace", "")))
        if recorded.is_dir() and (recorded / MARKER_FILE).exists():
            return Workspace(recorded)
        return Workspace(self.run_dir.resolve().parent.parent)

    def _progress(self, current: int, total: int, message: str) -> None:
        log.info("%s", message)
        self.writer.emit(Progress(stage=SETUP_STAGE, current=current, total=total, message=message))

    def _check_dataset(self, meta: dict[str, Any]) -> DatasetInfo:
        recorded = DatasetInfo(**meta["dataset"])
        if not Path(recorded.path).is_file():
            raise DatasetError(
                f"The dataset {recorded.path} is gone.",
                next_step="Put it back, or start a new run with data.dataset set.",
            )
        current = dataset_info(Path(recorded.path))
        if current != recorded and not self.resume and distributed.is_main_process():
            # The file changed between launch and start: record what this run really trains on.
            meta["dataset"] = dataclasses.asdict(current)
            atomic_write_text(self.run_dir / RUN_META_FILE, json.dumps(meta, indent=2) + "\n")
        return current

    def _base_model(self, workspace: Workspace, recipe: Recipe) -> str:
        if recipe.model.base.strip() == DEMO_BASE:
            from engine.demo import prepare_demo_model

            return str(prepare_demo_model(workspace, self.writer))
        resolved = resolve_base_model(recipe.model.base, workspace)
        check_loadable(resolved)
        return resolved

    def run(self) -> str:
        """Train the run folder; returns the final status (finished or stopped)."""
        meta = read_run_meta(self.run_dir)
        recipe = load_recipe(self.run_dir / RUN_RECIPE_FILE)
        self.recipe = recipe
        workspace = self._workspace(meta)
        # Rank 0 alone writes (partial checkpoints removed, run.json, the demo model); the others then read.
        with distributed.main_process_first():
            model_path, pairs, dataset = self._prepare(meta, recipe, workspace)
        return self._train(recipe, model_path, pairs, dataset)

    def _prepare(
        self, meta: dict[str, Any], recipe: Recipe, workspace: Workspace
    ) -> tuple[str, list[Any], DatasetInfo]:
        """Check the checkpoints, the dataset and the base model; returns the model path, pairs and dataset."""
        writes = distributed.is_main_process()
        if self.resume:
            removed = clean_partial_checkpoints(self.run_dir) if writes else []
            if removed:
                log.info("removed partial checkpoint folders: %s", ", ".join(removed))
            self.resume_checkpoint = check_resumable(self.run_dir, check_running=False)
        elif checkpoint_dirs(self.run_dir):
            raise TrainingError(
                f"Run {self.run_dir.name} has checkpoints already; a fresh start would overwrite them.",
                next_step=f"Resume it (`tunedeck train --resume {self.run_dir.name}`) or start a new run.",
            )
        self._progress(0, 4, "checking the dataset")
        dataset = self._check_dataset(meta)
        from engine.dataset import load_pairs

        pairs = load_pairs(Path(dataset.path))
        self._progress(1, 4, "finding the base model")
        return self._base_model(workspace, recipe), pairs, dataset

    def _train(self, recipe: Recipe, model_path: str, pairs: list[Any], dataset: DatasetInfo) -> str:
        if recipe.train.method == "full" and recipe.model.dtype == "float16":
            raise TrainingError(
                "Full fine-tuning with float16 weights overflows and diverges.",
                next_step="Set model.dtype=bfloat16 (or float32) for train.method=full.",
            )
        self._progress(2, 4, f"loading {Path(model_path).name} for {recipe.train.method}")
        import transformers

        from engine.modeling import load_model, load_tokenizer, renderer_for, resolve_device

        transformers.utils.logging.disable_progress_bar()
        transformers.set_seed(recipe.train.seed)
        self.device = distributed.process_device(resolve_device(recipe.train.device))
        tokenizer = load_tokenizer(
            model_path,
            chat_template=recipe.model.chat_template,
            trust_remote_code=recipe.model.trust_remote_code,
        )
        examples = encode_examples(renderer_for(tokenizer, recipe.data.system_prompt), pairs, recipe)
        self._report_cuts(examples, len(pairs), recipe.data.max_length)
        packing = self._packing_wanted(recipe)
        model = load_model(model_path, recipe, tokenizer, device=self.device, packed=packing)
        info = {
            "recipe": recipe.name,
            "method": recipe.train.method,
            "base_model": model_path,
            "dataset": dataset.name,
            "num_train": len(examples.train),
            "num_eval": len(examples.eval),
        }
        return self.fit(recipe, model, tokenizer, examples, info, packing=packing)

    def _packing_wanted(self, recipe: Recipe) -> bool:
        """True when the recipe asks for packed batches and nothing about it or the device rules them out."""
        if not recipe.train.packing:
            return False
        blocker = None
        if recipe.train.method == "full":
            blocker = "full fine-tuning trains every weight, and the packed path trains adapters"
        elif self.device.startswith("cuda") and not _mixed_precision(recipe, self.device)["bf16"]:
            blocker = "it computes in bfloat16, which this GPU or model.dtype=float32 rules out"
        elif distributed.shards_model():
            blocker = "FSDP shards the weights, and the packed path reads each layer's whole weights"
        if blocker:
            self._info(f"Training on padded batches, not packs: {blocker}.")
        return blocker is None

    def _packed_runner(self, model: Any, recipe: Recipe) -> Any:
        """The packed-path runner for `model`, or None (saying why) when the model needs the padded path."""
        from engine import fast

        reason = fast.unsupported_reason(model)
        if reason is not None:
            self._info(f"Training on padded batches, not packs: {reason}.")
            return None
        runner = fast.PackedCausalLM(model, fast.options_from_recipe(recipe))
        if runner.graphs is not None:
            self._info(
                f"Training on packs of up to {runner.options.max_tokens} tokens, each layer's backward"
                f" replayed as a CUDA graph (packs padded to multiples of {runner.options.graph_granularity})."
            )
        else:
            self._info(f"Training on packs of up to {runner.options.max_tokens} tokens (padding-free).")
        return runner

    def fit(
        self,
        recipe: Recipe,
        model: Any,
        tokenizer: Any,
        examples: Examples,
        info: dict[str, Any],
        *,
        packing: bool = False,
        callbacks: list[Any] | None = None,
    ) -> str:
        """Train `model` on tokenized examples with events and atomic checkpoints; returns the final status.

        `packing` trains through engine.fast where the model allows it; `callbacks` are extra Trainer callbacks.
        """
        from transformers import PrinterCallback, TrainingArguments

        self.recipe = recipe
        self.logits_window = accepts_logits_to_keep(model)
        self.runner = self._packed_runner(model, recipe) if packing else None
        self._progress(3, 4, "starting the training loop")
        on_gpu = self.device.startswith("cuda")
        # Every rank writes its part of a checkpoint (e.g. its RNG state) into the same staging folder.
        staging = self.run_dir / CHECKPOINTS_DIR / f"{STAGING_NAME}{distributed.launcher_pid()}"
        has_eval = bool(examples.eval)
        args = TrainingArguments(
            # The packed path checkpoints its own layers; the Trainer's switch would wrap the HF forward only.
            **_version_dependent_arguments(TrainingArguments, recipe, checkpointing=self.runner is None),
            **_mixed_precision(recipe, self.device),
            output_dir=str(staging),
            per_device_train_batch_size=recipe.train.batch_size,
            per_device_eval_batch_size=recipe.train.batch_size,
            gradient_accumulation_steps=recipe.train.grad_accum,
            num_train_epochs=recipe.train.epochs,
            max_steps=recipe.train.max_steps if recipe.train.max_steps > 0 else -1,
            learning_rate=recipe.train.learning_rate,
            lr_scheduler_type=recipe.train.lr_scheduler,
            warmup_steps=recipe.train.warmup_ratio,  # a float below 1 is a fraction of the total steps
            weight_decay=recipe.train.weight_decay,
            max_grad_norm=recipe.train.max_grad_norm,
            optim=_optimizer(recipe.train.optimizer, self.device),
            seed=recipe.train.seed,
            data_seed=recipe.train.seed,
            logging_strategy="steps",
            logging_steps=recipe.train.logging_steps,
            save_strategy="steps" if recipe.train.save_steps > 0 else "no",
            save_steps=recipe.train.save_steps if recipe.train.save_steps > 0 else 500,
            eval_strategy=("steps" if recipe.train.eval_steps > 0 else "epoch") if has_eval else "no",
            eval_steps=recipe.train.eval_steps if recipe.train.eval_steps > 0 else None,
            use_cpu=not on_gpu,
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            # Evaluation needs only the loss; gathering all positions' logits is how eval runs out of memory.
            prediction_loss_only=True,
            dataloader_num_workers=0,
            # Every trainable tensor takes part in each step, so DDP need not search the graph for unused ones.
            ddp_find_unused_parameters=False,
            save_total_limit=None,
        )
        trainer_class, callback_class = _trainer_parts()
        if self.runner is not None:
            from engine.fast import PackedCollator

            collator: Any = PackedCollator()
        else:
            # Multiples of 8 suit GPU tensor cores; on a CPU every padded position is wasted work.
            collator = PadCollator(tokenizer.pad_token_id, 8 if on_gpu else None)
        trainer = trainer_class(
            job=self,
            model=model,
            args=args,
            train_dataset=examples.train,
            eval_dataset=examples.eval or None,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[callback_class(self, info), *(callbacks or [])],
        )
        trainer.remove_callback(PrinterCallback)
        self.stop.training = True
        if distributed.any_rank(self.stop.requested):
            raise StopRequested()
        trainer.train(resume_from_checkpoint=str(self.resume_checkpoint) if self.resume_checkpoint else None)
        stopped = self.stop.requested and self.global_step < self.max_steps
        if has_eval and not stopped and trainer.state.global_step and self.last_eval_step != self.global_step:
            trainer.evaluate()
        shutil.rmtree(staging, ignore_errors=True)
        status = "stopped" if stopped else "finished"
        self.writer.emit(
            RunFinished(
                status=status,
                step=self.global_step,
                final_loss=self.last_loss,
                elapsed_s=round(time.monotonic() - self.started, 2),
                checkpoint=str(self.last_checkpoint or latest_checkpoint(self.run_dir) or ""),
                outputs={"checkpoint": str(self.last_checkpoint or latest_checkpoint(self.run_dir) or "")},
            )
        )
        log.info("run %s %s at step %d", self.run_dir.name, status, self.global_step)
        return status

    def _report_cuts(self, examples: Examples, total: int, max_length: int) -> None:
        if examples.truncated:
            self._warn(
                f"{examples.truncated} of {total} rows are longer than data.max_length={max_length} tokens; "
                "their answers were cut to fit (raise data.max_length to keep them whole)."
            )
        if examples.dropped:
            self._warn(
                f"{examples.dropped} of {total} rows were skipped: their prompt alone fills "
                f"data.max_length={max_length} tokens."
            )

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.writer.emit(Log(message=message, level="warning"))

    def _info(self, message: str) -> None:
        log.info("%s", message)
        self.writer.emit(Log(message=message, level="info"))

    # -- hooks called from the Trainer ----------------------------------------------------------------------

    def count_tokens(self, inputs: dict[str, Any]) -> None:
        """Count the non-pad tokens of a micro-batch (for trained tokens per second)."""
        from engine.fast import EXAMPLES_KEY

        batch = inputs.get(EXAMPLES_KEY)
        if batch is not None:
            self.tokens_since_log += batch.num_tokens
            return
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens_since_log += int(mask.sum())

    def before_step(self, step: int) -> None:
        """Called before each micro-batch of optimizer step `step`."""
        if self.fault is not None:
            self.fault.at_step(step)

    def save_checkpoint(self, save: Any, step: int) -> None:
        """Save into a staging folder, then rename it to checkpoints/step_<n> (never onto one)."""
        final = checkpoint_path(self.run_dir, step)
        if final.exists():
            log.info("checkpoint %s exists already; keeping it as it is", final.name)
            self.last_checkpoint = final
            return
        staging = Path(save.output_dir)
        try:
            save()
            # Every rank's files are in the staging folder before rank 0 alone renames it into place.
            distributed.barrier()
            if distributed.is_main_process():
                written = staging / f"checkpoint-{step}"
                _fsync_tree(written)
                os.replace(written, final)
                _fsync_dir(final.parent)
            distributed.barrier()
        except Exception as exc:
            # Judged before the partial folder is removed: its space would hide a disk that was full.
            full = is_disk_full(exc, final.parent)
            shutil.rmtree(staging / f"checkpoint-{step}", ignore_errors=True)
            if full:
                previous = self.last_checkpoint or latest_checkpoint(self.run_dir)
                raise disk_full_error(
                    f"checkpoint {final.name}",
                    folder=final.parent,
                    needed_bytes=tree_bytes(previous) if previous else None,
                ) from exc
            raise
        self.last_checkpoint = final
        self.writer.emit(CheckpointSaved(step=step, path=str(final)))
        log.info("checkpoint saved: %s", final)

    def emit_step(self, state: Any, logs: dict[str, Any]) -> None:
        """A step event from the Trainer's log of the latest optimizer step."""
        import torch

        now = time.monotonic()
        elapsed_window = max(now - self.last_log_time, 1e-6)
        # Every rank counts its own micro-batches: the job's throughput is their sum.
        tokens = distributed.total(self.tokens_since_log)
        tokens_per_s = tokens / elapsed_window
        self.tokens_since_log, self.last_log_time = 0, now
        remaining = max(state.max_steps - state.global_step, 0)
        eta = sum(self.step_seconds) / len(self.step_seconds) * remaining if self.step_seconds else None
        gpu = None
        if self.device.startswith("cuda"):
            # Replayed CUDA graphs work in a pool of their own, which the allocator's peak does not count.
            peak = self.runner.peak_memory_bytes() if self.runner is not None else None
            gpu = (peak if peak is not None else torch.cuda.max_memory_allocated()) / 2**30
        self.last_loss = _number(logs.get("loss"))
        self.writer.emit(
            Step(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=round(float(state.epoch or 0.0), 4),
                loss=self.last_loss,
                learning_rate=_number(logs.get("learning_rate")),
                grad_norm=_number(logs.get("grad_norm")),
                tokens_per_s=round(tokens_per_s, 1),
                tokens=tokens,
                gpu_mem_gib=round(gpu, 3) if gpu is not None else None,
                eta_s=round(eta, 1) if eta is not None else None,
                elapsed_s=round(now - self.started, 2),
            )
        )

    def mark_step_end(self) -> None:
        """Record one optimizer step's duration for the ETA."""
        now = time.monotonic()
        if self.last_step_time is not None:
            self.step_seconds.append(now - self.last_step_time)
        self.last_step_time = now


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _version_dependent_arguments(
    arguments_class: type, recipe: Recipe, *, checkpointing: bool = True
) -> dict[str, Any]:
    """Checkpointing and length-grouping options under the names this transformers version uses.

    `checkpointing=False` leaves the Trainer's activation checkpointing off whatever the recipe says.
    """
    fields = {field.name for field in dataclasses.fields(arguments_class)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    enabled = checkpointing and recipe.train.gradient_checkpointing
    # Non-reentrant checkpointing needs no input gradients, which frozen (LoRA) embeddings would not provide.
    options: dict[str, Any] = {
        name: enabled,
        f"{name}_kwargs": {"use_reentrant": False} if enabled else None,
    }
    if "train_sampling_strategy" in fields:
        options["train_sampling_strategy"] = "group_by_length" if recipe.train.group_by_length else "random"
    else:
        options["group_by_length"] = recipe.train.group_by_length
    return options


def _mixed_precision(recipe: Recipe, device: str) -> dict[str, bool]:
    """Autocast flags: adapters over a 16-bit base on a GPU compute in bf16 (fp16 where bf16 is missing)."""
    import torch

    if not device.startswith("cuda") or recipe.train.method == "full" or recipe.model.dtype == "float32":
        # Full fine-tuning trains the weights in the dtype they were loaded in; CPUs compute in float32.
        return {"bf16": False, "fp16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def _optimizer(name: str, device: str) -> str:
    # Paged and 8-bit optimizers live in bitsandbytes' CUDA kernels; fused AdamW needs a GPU too.
    if device.startswith("cuda"):
        return name
    if name != "adamw_torch" and name != "sgd":
        log.info("optimizer %s needs a GPU; using adamw_torch on %s", name, device)
        return "adamw_torch"
    return name


class _SaveCall:
    """The Trainer's own checkpoint save, bound to the staging folder it writes checkpoint-<n>/ into."""

    def __init__(self, function: Any, output_dir: str) -> None:
        self.function = function
        self.output_dir = output_dir

    def __call__(self) -> None:
        self.function()


def _trainer_parts() -> tuple[type, type]:
    """The Trainer subclass and the event callback, built lazily so transformers loads only to train."""
    from transformers import Trainer, TrainerCallback

    from engine.fast import EXAMPLES_KEY

    class TunedeckTrainer(Trainer):
        """Counts tokens, injects test faults and saves checkpoints atomically as step_<n>; on the packed path,
        hands each micro-batch to the job's runner and optimizes its one flat adapter tensor."""

        def __init__(self, *args: Any, job: TrainingJob, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.job = job

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            if self.job.sample_order is not None:
                return list(self.job.sample_order)
            return super()._get_train_sampler(*args, **kwargs)

        def create_optimizer(self, model: Any = None) -> Any:
            runner = self.job.runner
            if runner is None or self.optimizer is not None:
                return super().create_optimizer(model)
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args, model if model is not None else self.model
            )
            # Every adapter tensor is a view into one flat buffer: bitsandbytes' paged optimizers synchronise
            # the GPU after each tensor they update, so one tensor instead of hundreds saves that many syncs.
            groups = [{"params": runner.optimizer_parameters(), "weight_decay": self.args.weight_decay}]
            self.optimizer = optimizer_class(groups, **optimizer_kwargs)
            return self.optimizer

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            if self.job.runner is None:
                return super().get_batch_samples(epoch_iterator, num_batches, device)
            batches = list(itertools.islice(epoch_iterator, num_batches))
            # The step's answer tokens: the packed loss of every micro-batch is divided by this count.
            count = sum(batch[EXAMPLES_KEY].num_targets for batch in batches)
            if self.args.world_size > 1:
                import torch

                return batches, self.accelerator.gather(torch.tensor([count], device=device)).sum()
            return batches, count

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if self.job.logits_window:
                inputs = answer_window(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            self.job.count_tokens(inputs)
            self.job.before_step(self.state.global_step + 1)
            runner = self.job.runner
            if runner is None:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            return runner.backward_examples(inputs[EXAMPLES_KEY].examples, num_items_in_batch)

        def prediction_step(
            self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
        ) -> tuple[Any, None, None]:
            runner = self.job.runner
            if runner is None:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            return runner.eval_loss(inputs[EXAMPLES_KEY].examples).detach(), None, None

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            try:
                super()._load_optimizer_and_scheduler(checkpoint)
            except ValueError as exc:
                # The packed path optimizes one flat adapter tensor, the padded path one tensor per adapter
                # weight: a checkpoint of one cannot seed the other's optimizer.
                if "loaded state dict" not in str(exc):
                    raise
                packed = self.job.runner is not None
                raise TrainingError(
                    f"Checkpoint {Path(str(checkpoint)).name} was saved on "
                    f"{'padded batches' if packed else 'packs'}, and this attempt trains on "
                    f"{'packs' if packed else 'padded batches'}, so its optimizer state does not fit.",
                    next_step="Resume where the run trained before (the packed path needs a CUDA GPU with "
                    "bfloat16, or a CPU), or start a new run.",
                ) from exc

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            parent_save = super()._save_checkpoint
            self.job.save_checkpoint(
                _SaveCall(lambda: parent_save(model, trial), self.args.output_dir), self.state.global_step
            )

    class EventCallback(TrainerCallback):
        """Turns the Trainer's lifecycle into run_started, step and eval events; asks for saves and stops."""

        def __init__(self, job: TrainingJob, info: dict[str, Any]) -> None:
            self.job = job
            self.info = info

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            job = self.job
            job.max_steps, job.global_step = state.max_steps, state.global_step
            resumed = checkpoint_step(job.resume_checkpoint) if job.resume_checkpoint else None
            job.writer.emit(
                RunStarted(
                    run_id=job.run_dir.name,
                    total_steps=state.max_steps,
                    device=distributed.device_label(job.device),
                    pid=distributed.launcher_pid(),
                    resumed_from_step=resumed,
                    **self.info,
                )
            )
            job.last_log_time = job.last_step_time = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            job = self.job
            job.global_step = state.global_step
            job.mark_step_end()
            if state.global_step >= state.max_steps:
                control.should_save = True  # the final checkpoint, whatever save_steps says
            if distributed.any_rank(job.stop.requested):
                control.should_save = True
                control.should_training_stop = True

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                self.job.emit_step(state, logs)

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            loss = _number((metrics or {}).get("eval_loss"))
            if loss is not None:
                self.job.last_eval_step = state.global_step
                self.job.writer.emit(Eval(step=state.global_step, eval_loss=loss))

    return TunedeckTrainer, EventCallback


# ----------------------------------------------------------------------------------------------------
# The process


def _setup_logging(log_path: Path) -> None:
    """Log to stderr, and to train.log unless stderr already is that file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    try:
        same = os.path.samestat(os.fstat(2), os.stat(log_path))
    except OSError:
        same = False
    if not same:
        handlers.append(logging.FileHandler(log_path, encoding="utf-8"))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    # bitsandbytes warns on import that optional CPU kernels (a hub download) are missing; none are needed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def failure_of(exc: BaseException, log_path: Path) -> EngineError:
    """The EngineError to report for any exception that ended training."""
    from engine.modeling import is_out_of_memory, training_oom_error

    if isinstance(exc, EngineError):
        return exc
    if is_out_of_memory(exc):
        return training_oom_error(exc)
    if is_disk_full(exc, log_path.parent):
        return disk_full_error("the run folder", folder=log_path.parent)
    first_line = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
    detail = f": {first_line}" if first_line else ""
    return TrainingError(
        f"Training stopped on an unexpected {type(exc).__name__}{detail}.",
        next_step=f"See the traceback in {log_path}; resume from the last checkpoint once it is fixed.",
    )


def main(argv: list[str] | None = None) -> int:
    """Train one run folder; exit 0 when it finished or stopped on request, non-zero when it failed."""
    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the run folder (runs/<id>/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.expanduser().resolve()
    stream = claim_stdout()
    # Of a distributed run's ranks only rank 0 reports; the launcher's pid stays in the pid file.
    reports = distributed.is_main_process()
    writer = EventWriter(stream, run_dir / RUN_EVENTS_FILE) if reports else EventWriter()
    log_path = run_dir / RUN_LOG_FILE
    _setup_logging(log_path)
    distributed.label_logging()
    stop = StopSignal(immediate=not distributed.is_distributed())
    stop.install()
    log.info("training %s (resume=%s, pid %d)", run_dir.name, args.resume, os.getpid())
    job = TrainingJob(run_dir, writer, stop, resume=args.resume)
    try:
        # Inside the try: a full disk already at start must end as run_failed, like any later failure.
        if not distributed.is_distributed():
            atomic_write_text(run_dir / RUN_PID_FILE, f"{os.getpid()}\n")
        distributed.join()
        job.run()
        return 0
    except StopRequested:
        writer.emit(
            RunFinished(
                status="stopped",
                step=job.global_step,
                final_loss=job.last_loss,
                elapsed_s=round(time.monotonic() - job.started, 2),
                checkpoint=str(latest_checkpoint(run_dir) or ""),
            )
        )
        log.info("stopped before training began")
        return 0
    except BaseException as exc:  # every failure becomes one run_failed event; the traceback goes to the log
        error = failure_of(exc, log_path)
        if isinstance(exc, EngineError):
            log.error("%s: %s", error.title, error)
        else:
            log.exception("training failed")
        if not distributed.report_failure(error):  # the launcher reports the first failure of any rank
            writer.emit(RunFailed.of(error, log_path))
        return 3 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        writer.close()


if __name__ == "__main__":
    sys.exit(main())
