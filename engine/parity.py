"""The parity report: greedy answers of the adapter (Hugging Face) and of each GGUF (llama.cpp) side by side.

For up to N training and N held-out questions of the run's own dataset, it records each answer, its agreement
with the adapter's and with the reference answer (difflib ratio), tokens/s, and runaway generation (the token
limit reached without an end-of-turn token, the usual sign of a wrong chat template or EOS). GGUF answers go
through `Llama.create_chat_completion`, so they use the chat template stored in the GGUF.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import logging
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ExportError

if TYPE_CHECKING:
    from engine.export import ExportPlan, StageClock
    from engine.recipes import Recipe
    from engine.workspace import Workspace

log = logging.getLogger(__name__)

# Two answers "agree" when difflib's ratio reaches this (greedy decoding of the same weights gives 1.0; a
# quantized file may differ in a word or two of a long answer and still count).
AGREEMENT_THRESHOLD = 0.9
TRAIN_SPLIT = "train"
HELD_OUT_SPLIT = "held-out"
MIN_NEW_TOKENS = 32
MAX_NEW_TOKENS = 256


@dataclasses.dataclass
class ParityQuestion:
    """One question of the check, with the reference answer and the split it came from."""

    question: str
    reference: str
    split: str
    system: str = ""

    def messages(self, system_prompt: str = "") -> list[dict[str, str]]:
        """The chat messages the model is asked (as engine.template.pair_messages builds them in training)."""
        system = self.system or system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": self.question}
        ]


@dataclasses.dataclass
class Answer:
    """One generated answer."""

    text: str
    tokens: int
    seconds: float
    runaway: bool
    # The prompt and generated token ids (adapter answers only): the GGUFs are teacher-forced along them.
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    ids: list[int] = dataclasses.field(default_factory=list)
    # Share of the adapter's answer tokens this model also ranks first, given the same prefix (GGUFs only).
    token_agreement: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def similarity(first: str, second: str) -> float:
    """difflib's ratio of two answers after trimming surrounding whitespace (1.0 means identical)."""
    return difflib.SequenceMatcher(None, first.strip(), second.strip(), autojunk=False).ratio()


def _spread(indices: list[int], limit: int) -> list[int]:
    """Up to `limit` of `indices`, evenly spaced (the whole dataset is represented, not just its start)."""
    if limit <= 0 or len(indices) <= limit:
        return indices if limit > 0 else []
    step = len(indices) / limit
    return [indices[int(i * step)] for i in range(limit)]


def select_questions(
    run_dir: Path, recipe: Recipe, workspace: Workspace, *, per_split: int = 30
) -> list[ParityQuestion]:
    """Up to `per_split` training and held-out questions each of the run's dataset, split as training did."""
    from engine.dataset import load_pairs
    from engine.launch import read_run_meta, resolve_dataset
    from engine.train import split_indices

    path: Path | None = None
    try:
        recorded = (read_run_meta(run_dir).get("dataset") or {}).get("path")
        path = Path(recorded) if recorded else None
    except Exception:
        path = None
    if path is None or not path.is_file():
        try:
            path = resolve_dataset(workspace, recipe.data.dataset)
        except Exception:
            log.warning("the run's dataset is gone; the parity check has no questions")
            return []
    pairs = load_pairs(path)
    train_idx, eval_idx = split_indices(len(pairs), recipe.data.eval_fraction, recipe.train.seed)
    chosen = [(i, TRAIN_SPLIT) for i in _spread(train_idx, per_split)]
    chosen += [(i, HELD_OUT_SPLIT) for i in _spread(eval_idx, per_split)]
    return [
        ParityQuestion(pairs[i].question, pairs[i].answer, split, getattr(pairs[i], "system", "") or "")
        for i, split in chosen
    ]


def _answer_budget(tokenizer: Any, questions: list[ParityQuestion]) -> int:
    longest = max(
        (len(tokenizer(q.reference, add_special_tokens=False)["input_ids"]) for q in questions), default=0
    )
    return max(MIN_NEW_TOKENS, min(MAX_NEW_TOKENS, int(longest * 1.5) + 16))


ADAPTER_BATCH = 8


def adapter_answers(
    plan: ExportPlan, questions: list[ParityQuestion], clock: StageClock, *, max_new_tokens: int | None
) -> tuple[list[Answer], int]:
    """Greedy answers of the unmerged adapter (base + LoRA, as chat serves it); also the token budget used."""
    from engine.modeling import load_for_inference

    if plan.is_adapter:
        model, tokenizer = load_for_inference(
            plan.base, plan.checkpoint_dir, device="cpu", dtype=plan.merge_dtype, workspace=plan.workspace
        )
    else:
        model, tokenizer = load_for_inference(None, plan.checkpoint_dir, device="cpu", dtype=plan.merge_dtype)
    budget = max_new_tokens or _answer_budget(tokenizer, questions)
    conversations = [q.messages(plan.recipe.data.system_prompt) for q in questions]
    answers = greedy_batch(
        model, tokenizer, conversations, budget, on_done=lambda n: clock.update(n, "adapter")
    )
    del model
    gc.collect()
    return answers, budget


def greedy_batch(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    *,
    batch_size: int = ADAPTER_BATCH,
    on_done: Any = None,
) -> list[Answer]:
    """Greedy answers in left-padded batches (CPU generation is several times faster batched), each with its
    token count and whether it ran to the limit without an end-of-turn token."""
    import torch
    from transformers import GenerationConfig

    from engine.generation import prompt_ids, stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    encoded = [prompt_ids(tokenizer, conversation) for conversation in conversations]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[Answer | None] = [None] * len(encoded)
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        rows = [[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk]
        masks = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk]
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks), generation_config=config
            )
        seconds = (time.perf_counter() - began) / len(chunk)
        for generated, index in zip(output[:, width:].tolist(), chunk, strict=True):
            cut = next((at for at, token in enumerate(generated) if token in stops), None)
            text = tokenizer.decode(
                generated[: cut if cut is not None else len(generated)],
                skip_special_tokens=True,
                clean_up_tokenization_spaces=False,
            )
            tokens = cut + 1 if cut is not None else len(generated)
            runaway = cut is None and len(generated) >= max_new_tokens
            answers[index] = Answer(text, tokens, seconds, runaway, encoded[index], generated[:tokens])
        done += len(chunk)
        if on_done is not None:
            on_done(done)
    return [answer for answer in answers if answer is not None]


def context_size(path: Path, limit: int = 2048) -> int:
    """The context to give llama.cpp: the model's trained length, at most `limit` (answers here are short)."""
    from engine.convert import read_gguf

    trained = read_gguf(path).context_length
    return min(limit, trained) if trained > 0 else limit


def gguf_answers(
    path: Path,
    questions: list[ParityQuestion],
    system_prompt: str,
    *,
    max_new_tokens: int,
    threads: int | None,
    on_answer: Any = None,
    reference: list[Answer] | None = None,
) -> tuple[list[Answer], dict[str, Any]]:
    """Greedy answers of one GGUF through llama.cpp's chat completion (the GGUF's own chat template), and how
    often it ranks the `reference` answers' tokens first when fed their prefixes."""
    from engine.quantize import _llama_cpp, ftype_name

    llama_cpp = _llama_cpp()
    started = time.monotonic()
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context_size(path),
            # A whole prompt plus answer fits one batch, so the teacher-forced pass is a single decode.
            n_batch=context_size(path),
            n_threads=threads or os.cpu_count() or 1,
            seed=0,
            verbose=False,
        )
    except Exception as exc:
        raise ExportError(
            f"llama.cpp could not load {path.name}: {exc}.",
            next_step="See export.log for llama.cpp's log; export again.",
        ) from None
    load_s = time.monotonic() - started
    info = {
        "load_s": round(load_s, 3),
        "llama_cpp_type": ftype_name(int(llama_cpp.llama_model_ftype(llm.model))),
    }
    answers = []
    try:
        for index, question in enumerate(questions):
            begin = time.perf_counter()
            result = llm.create_chat_completion(
                messages=question.messages(system_prompt),  # type: ignore[arg-type]
                temperature=0.0,
                top_p=1.0,
                top_k=1,
                repeat_penalty=1.0,
                max_tokens=max_new_tokens,
                seed=0,
            )
            seconds = time.perf_counter() - begin
            choice = result["choices"][0]  # type: ignore[index]
            tokens = int(result["usage"]["completion_tokens"])  # type: ignore[index]
            text = choice["message"]["content"] or ""
            answers.append(Answer(text, tokens, seconds, choice["finish_reason"] == "length"))
            if reference is not None and reference[index].ids:
                answers[-1].token_agreement = forced_agreement(
                    llm, reference[index].prompt_ids, reference[index].ids
                )
            if on_answer is not None:
                on_answer(index)
    finally:
        llm.close()
    return answers, info


def forced_agreement(llm: Any, prompt: list[int], answer: list[int]) -> float:
    """Share of `answer`'s tokens that `llm` ranks first after the prompt and the answer's own earlier tokens."""
    # Free-running answers drift apart after the first differing token; teacher forcing measures how often the
    # GGUF makes the adapter's choice at every step, whatever came before. One decode of the whole sequence,
    # asking for logits only where an answer token is predicted, keeps this as cheap as prompt processing.
    import ctypes

    import numpy as np

    from engine.quantize import _llama_cpp

    llama_cpp = _llama_cpp()
    tokens = [*prompt, *answer[:-1]]
    first = len(prompt) - 1
    if not answer or first < 0 or len(tokens) > llm.n_ctx():
        return 0.0
    memory = llama_cpp.llama_get_memory(llm.ctx)
    llama_cpp.llama_memory_clear(memory, True)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = int(index >= first)
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(llm.ctx, batch) != 0:
            return 0.0
        vocabulary = llm.n_vocab()
        matches = 0
        for offset, token in enumerate(answer):
            pointer = llama_cpp.llama_get_logits_ith(llm.ctx, first + offset)
            logits = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(vocabulary,)
            )
            matches += int(int(logits.argmax()) == token)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(memory, True)
        # llama-cpp-python's own record of what the cache holds must match the cleared cache.
        llm.reset()
    return matches / len(answer)


def run_parity(
    plan: ExportPlan,
    files: dict[str, Path],
    questions: list[ParityQuestion],
    clock: StageClock,
    *,
    max_new_tokens: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Answer every question with the adapter and with every GGUF in `files`, and summarise the agreement."""
    if not questions:
        return {"questions": 0, "note": "the run's dataset has no questions to check"}
    reference, budget = adapter_answers(plan, questions, clock, max_new_tokens=max_new_tokens)
    per_file: dict[str, list[Answer]] = {}
    infos: dict[str, dict[str, Any]] = {}
    done = len(questions)
    system_prompt = plan.recipe.data.system_prompt
    for kind, path in files.items():
        offset = done

        def tick(index: int, kind: str = kind, offset: int = offset) -> None:
            clock.update(offset + index + 1, f"{kind}: {index + 1}/{len(questions)}")

        per_file[kind], infos[kind] = gguf_answers(
            path,
            questions,
            system_prompt,
            max_new_tokens=budget,
            threads=threads,
            on_answer=tick,
            reference=reference,
        )
        infos[kind]["size_bytes"] = path.stat().st_size
        infos[kind]["file"] = path.name
        done += len(questions)
    summary = summarise(questions, reference, per_file, infos, budget)
    summary["reference_model"] = f"base in {plan.merge_dtype} + adapter, unmerged (as chat serves it)"
    return summary


def _rate(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def summarise(
    questions: list[ParityQuestion],
    reference: list[Answer],
    per_file: dict[str, list[Answer]],
    infos: dict[str, dict[str, Any]],
    budget: int,
) -> dict[str, Any]:
    """The parity section of report.json: per-file summaries and every question's answers."""
    splits = {q.split for q in questions}
    adapter_summary: dict[str, Any] = {
        "reference_similarity": _mean(
            [similarity(a.text, q.reference) for a, q in zip(reference, questions, strict=True)]
        ),
        "runaway": sum(a.runaway for a in reference),
        "tokens_per_s": _mean([a.tokens_per_s for a in reference if a.tokens]),
    }
    summaries: dict[str, Any] = {}
    for kind, answers in per_file.items():
        agree = [
            similarity(a.text, r.text) >= AGREEMENT_THRESHOLD for a, r in zip(answers, reference, strict=True)
        ]
        exact = [a.text.strip() == r.text.strip() for a, r in zip(answers, reference, strict=True)]
        summary: dict[str, Any] = dict(infos.get(kind, {}))
        for split in sorted(splits):
            picked = [i for i, q in enumerate(questions) if q.split == split]
            summary[f"agreement_{split}"] = _rate([agree[i] for i in picked])
            summary[f"exact_{split}"] = _rate([exact[i] for i in picked])
        summary["agreement"] = _rate(agree)
        summary["reference_similarity"] = _mean(
            [similarity(a.text, q.reference) for a, q in zip(answers, questions, strict=True)]
        )
        summary["token_agreement"] = _mean(
            [a.token_agreement for a in answers if a.token_agreement is not None]
        )
        summary["runaway"] = sum(a.runaway for a in answers)
        summary["tokens_per_s"] = _mean([a.tokens_per_s for a in answers if a.tokens])
        summaries[kind] = summary
    rows = []
    for index, question in enumerate(questions):
        row: dict[str, Any] = {
            "split": question.split,
            "question": question.question,
            "reference": question.reference,
            "adapter": reference[index].text,
            "adapter_runaway": reference[index].runaway,
        }
        for kind, answers in per_file.items():
            row[kind] = answers[index].text
            row[f"{kind}_agrees"] = (
                similarity(answers[index].text, reference[index].text) >= AGREEMENT_THRESHOLD
            )
            row[f"{kind}_runaway"] = answers[index].runaway
            row[f"{kind}_token_agreement"] = answers[index].token_agreement
        rows.append(row)
    return {
        "questions": len(questions),
        "by_split": {split: sum(q.split == split for q in questions) for split in sorted(splits)},
        "max_new_tokens": budget,
        "agreement_threshold": AGREEMENT_THRESHOLD,
        "adapter": adapter_summary,
        "files": summaries,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------
# report.md


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(value: Any) -> str:
    return f"{value / 1e6:.1f} MB" if isinstance(value, (int, float)) else "–"


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the files, the checks, the parity table and the answers side by side."""
    lines = [
        f"# Export of {report['run_id']} at step {report['step']}",
        "",
        f"- Base: `{report['base']}` ({report['architecture']}, {report['parameters'] / 1e6:.1f}M "
        f"parameters, {report['method']}); merged in {report['merge_dtype']}, saved in "
        f"{report['saved_dtype']}",
        f"- Converter: {report['converter']['source']} `{report['converter']['root']}`; tokenizer "
        f"{report['converter']['tokenizer']['kind']}",
        f"- Chat: EOS `{report['chat']['eos_token']}`, BOS `{report['chat']['bos_token'] or '–'}` "
        f"(template writes BOS: {report['chat']['template_writes_bos']}); Modelfile template translated: "
        f"{report['chat']['modelfile_template']}",
    ]
    lines += [f"- Fixed: {change}" for change in report["chat"]["changes"]]
    lines += [f"- Warning: {warning}" for warning in report["warnings"]]
    lines += [f"- Note: {note}" for note in report.get("notes", [])]
    lines += ["", "## Files", "", "| file | type (llama.cpp) | size | weight tensors |", "|---|---|---|---|"]
    for check in report["files"].values():
        tensors = ", ".join(f"{k} {v}" for k, v in check["tensor_types"].items())
        lines.append(
            f"| {check['file']} | {check['llama_cpp_type']} | {_size(check['size_bytes'])} | {tensors} |"
        )
    parity = report.get("parity") or {}
    if parity.get("questions"):
        split_counts = ", ".join(f"{n} {s}" for s, n in parity["by_split"].items())
        splits = list(parity["by_split"])
        lines += [
            "",
            "## Parity (greedy, adapter vs GGUF)",
            "",
            f"{parity['questions']} questions ({split_counts}),"
            f" at most {parity['max_new_tokens']} new tokens; agreement = difflib ratio ≥ "
            f"{parity['agreement_threshold']} with the adapter's answer. Adapter: "
            f"{parity.get('reference_model', 'base + adapter')}; GGUF: llama.cpp chat completion with the "
            "GGUF's own chat template; next-token agreement = share of the adapter's answer tokens the GGUF "
            "also ranks first when fed the same prefix (teacher-forced); tok/s includes prompt processing "
            "(the adapter's is batched).",
            "",
        ]
        header = [
            "file",
            *[f"agrees ({s})" for s in splits],
            "next-token agreement",
            "vs reference",
            "runaway",
            "tok/s",
            "size",
        ]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        adapter = parity["adapter"]
        lines.append(
            "| adapter (HF) | "
            + " | ".join(["–"] * (len(splits) + 1))
            + f" | {_pct(adapter['reference_similarity'])} | {adapter['runaway']} | "
            f"{adapter['tokens_per_s'] or 0:.1f} | – |"
        )
        for kind, summary in parity["files"].items():
            cells = [_pct(summary.get(f"agreement_{s}")) for s in splits] + [
                _pct(summary.get("token_agreement"))
            ]
            lines.append(
                f"| {kind} | " + " | ".join(cells) + f" | {_pct(summary['reference_similarity'])} | "
                f"{summary['runaway']} | {summary['tokens_per_s'] or 0:.1f} | "
                f"{_size(summary.get('size_bytes'))} |"
            )
        kinds = list(parity["files"])
        lines += [
            "",
            "## Answers",
            "",
            "| split | question | reference | adapter | " + " | ".join(kinds) + " |",
            "|" + "---|" * (4 + len(kinds)),
        ]
        for row in parity["rows"]:
            cells = [
                row["split"],
                _cell(row["question"], 100),
                _cell(row["reference"]),
                _cell(row["adapter"]),
            ]
            for kind in kinds:
                mark = "" if row[f"{kind}_agrees"] else "✗ "
                mark += "(runaway) " if row[f"{kind}_runaway"] else ""
                cells.append(mark + _cell(row[kind]))
            lines.append("| " + " | ".join(cells) + " |")
    elif parity:
        lines += ["", f"Parity check: {parity.get('note', 'skipped')}."]
    else:
        lines += ["", "Parity check: skipped (--no-parity)."]
    durations = report.get("durations_s") or {}
    if durations:
        lines += ["", "## Time", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in durations.items()]
    return "\n".join(lines) + "\n"
