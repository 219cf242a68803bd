"""Safety: no shell and no code built from strings, weights loaded as safetensors (pickles never run), remote code
only when the recipe opts in, and paths a user types kept inside the workspace where the TUI says they are.

Static rules are checked over engine/ and tui/ with the ast module (and proven to catch planted violations);
behavioural tests load hostile folders whose pickles and custom code would leave a marker file if they ran.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("crashkit")

from crashkit.plugin import Trials, family  # noqa: E402
from tuikit import mounted, notifications, wait_for  # noqa: E402

from engine.errors import ModelError  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

pytest_plugins = ["crashkit.plugin", "crashkit.fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(REPO_ROOT / "engine").rglob("*.py"), *(REPO_ROOT / "tui").rglob("*.py")])

SHELL_FUNCTIONS = (
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "create_subprocess_shell",
    "pty.spawn",
)
PROCESS_FUNCTIONS = (
    "subprocess.run",
    "subprocess.Popen",
    "subprocess.call",
    "subprocess.check_call",
    "subprocess.check_output",
    "create_subprocess_exec",
)
UNPICKLERS = (
    "pickle.load",
    "pickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
)


def dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain ('' for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class Scanner(ast.NodeVisitor):
    """Collects `file:line: rule` violations of one module."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.violations: list[str] = []
        self.functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    def flag(self, node: ast.AST, rule: str) -> None:
        self.violations.append(f"{self.name}:{getattr(node, 'lineno', 0)}: {rule}")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def _false_default_params(self) -> set[str]:
        """Parameters of the enclosing functions that default to False."""
        names = set()
        for function in self.functions:
            args = function.args
            positional = args.posonlyargs + args.args
            for arg, default in zip(
                positional[len(positional) - len(args.defaults) :], args.defaults, strict=True
            ):
                if _is_const(default, False):
                    names.add(arg.arg)
            for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                if _is_const(default, False):
                    names.add(arg.arg)
        return names

    def _local_dicts(self) -> dict[str, ast.Dict]:
        """Dict literals assigned to a name in the enclosing function (kwargs built before a call)."""
        found: dict[str, ast.Dict] = {}
        if self.functions:
            for node in ast.walk(self.functions[-1]):
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else []
                )
                if isinstance(getattr(node, "value", None), ast.Dict):
                    for target in targets:
                        if isinstance(target, ast.Name):
                            found[target.id] = node.value
        return found

    def _remote_code_ok(self, value: ast.AST) -> bool:
        if _is_const(value, False):
            return True
        if isinstance(value, ast.Name) and value.id in self._false_default_params():
            return True
        # The recipe's own opt-in (recipe.model.trust_remote_code, default False).
        return dotted(value).endswith("model.trust_remote_code") and dotted(value).startswith("recipe")

    def _keywords(self, node: ast.Call) -> dict[str, ast.AST]:
        """Keyword arguments, including those passed through **name of a dict literal built in the function."""
        found = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        dicts = self._local_dicts()
        for kw in node.keywords:
            if kw.arg is None and isinstance(kw.value, ast.Name) and kw.value.id in dicts:
                literal = dicts[kw.value.id]
                for key, value in zip(literal.keys, literal.values, strict=True):
                    if isinstance(key, ast.Constant) and isinstance(key.value, str):
                        found.setdefault(key.value, value)
        return found

    def visit_Call(self, node: ast.Call) -> None:
        name = dotted(node.func)
        keywords = self._keywords(node)
        if "shell" in keywords and not _is_const(keywords["shell"], False):
            self.flag(node, "shell=True")
        if name.endswith(SHELL_FUNCTIONS):
            self.flag(node, f"{name} runs a shell")
        if (
            name.endswith(PROCESS_FUNCTIONS)
            and node.args
            and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp))
        ):
            self.flag(node, f"{name} with a command string instead of an argument list")
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
            self.flag(node, f"{node.func.id}() of a string")
        if name.endswith(UNPICKLERS):
            self.flag(node, f"{name} unpickles")
        if name.endswith("torch.load") and not _is_const(keywords.get("weights_only"), True):
            self.flag(node, "torch.load without weights_only=True")
        if name.endswith(("np.load", "numpy.load")) and _is_const(keywords.get("allow_pickle"), True):
            self.flag(node, "numpy.load(allow_pickle=True)")
        if "trust_remote_code" in keywords and not self._remote_code_ok(keywords["trust_remote_code"]):
            self.flag(node, "trust_remote_code not tied to the recipe's opt-in (default False)")
        loads_weights = name.endswith(".from_pretrained") and (
            "ForCausalLM" in name or name.startswith("AutoModel")
        )
        if loads_weights and not (
            _is_const(keywords.get("use_safetensors"), True) or "gguf_file" in keywords
        ):
            self.flag(node, f"{name} without use_safetensors=True")
        self.generic_visit(node)


def scan(source: str, name: str = "<source>") -> list[str]:
    """Every violation of the rules above in `source`."""
    scanner = Scanner(name)
    scanner.visit(ast.parse(source))
    return scanner.violations


PLANTED = """
import os, subprocess, pickle, torch
from transformers import AutoModelForCausalLM
def bad(user, flag=True):
    os.system("ls " + user)
    subprocess.run(f"ls {user}", shell=True)
    eval(user)
    pickle.loads(user)
    torch.load(user)
    AutoModelForCausalLM.from_pretrained(user, trust_remote_code=True)
    AutoModelForCausalLM.from_pretrained(user, trust_remote_code=flag, use_safetensors=True)
def fine(user, remote=False):
    subprocess.run(["ls", user])
    torch.load(user, weights_only=True)
    kwargs = {"use_safetensors": True, "trust_remote_code": remote}
    AutoModelForCausalLM.from_pretrained(user, **kwargs)
    model.eval()
"""


@family("safety")
def test_engine_and_tui_use_no_shell_no_pickles_and_no_unasked_remote_code(trials: Trials) -> None:
    found = scan(PLANTED)
    rules = [
        "runs a shell",
        "shell=True",
        "command string",
        "eval()",
        "unpickles",
        "weights_only=True",
        "trust_remote_code",
        "use_safetensors=True",
    ]
    assert all(any(rule in violation for violation in found) for rule in rules), found
    assert not any(f":{line}:" in v for v in found for line in range(13, 19)), (
        "the fine() half is not flagged"
    )
    assert len(SOURCES) > 30
    violations = [
        v
        for path in SOURCES
        for v in scan(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))
    ]
    assert violations == []
    trials.case(len(rules))


# -- Pickles never run ------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates `marker` (what a hostile .bin file could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return builtins.open, (str(self.marker), "w")


def hostile_pickle(path: Path, marker: Path) -> None:
    import torch

    torch.save({"weight": Payload(marker)}, path)


@family("safety")
def test_pickled_weights_are_refused_or_never_unpickled(
    tiny_model_dir: Path, tmp_path: Path, trials: Trials
) -> None:
    from engine.modeling import check_model_folder, load_for_inference

    marker = tmp_path / "pickle-ran"
    # The payload is real: an unsafe load would run it.
    hostile_pickle(tmp_path / "probe.bin", marker)
    import torch

    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert marker.exists()
    marker.unlink()

    # A base model folder that holds only a pickle.
    base = tmp_path / "pickled-base"
    shutil.copytree(tiny_model_dir, base)
    (base / "model.safetensors").unlink()
    hostile_pickle(base / "pytorch_model.bin", marker)
    with pytest.raises(ModelError, match=r"no \.safetensors weights"):
        check_model_folder(base)
    with pytest.raises(ModelError, match=r"no \.safetensors weights"):
        load_for_inference(str(base), device="cpu")
    trials.case()

    # A full fine-tuning checkpoint that holds only a pickle.
    full = tmp_path / "pickled-checkpoint"
    shutil.copytree(base, full)
    with pytest.raises(ModelError, match=r"no \.safetensors weights"):
        load_for_inference(None, adapter_dir=full, device="cpu")
    trials.case()

    # A LoRA adapter folder whose weights are a pickle (as old peft versions wrote them).
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "base_model_name_or_path": str(tiny_model_dir),
            }
        )
    )
    hostile_pickle(adapter / "adapter_model.bin", marker)
    with pytest.raises(Exception, match=r"(?i)weights only load failed|unpickl|unsupported global"):
        load_for_inference(str(tiny_model_dir), adapter_dir=adapter, device="cpu")
    trials.case()
    assert not marker.exists(), "a pickle from a model folder ran"


# -- Remote code only when the recipe opts in ------------------------------------------------------------------


@pytest.fixture
def custom_code_model(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The tiny model with a config that points at custom code which, if imported, creates a marker file."""
    folder = tmp_path / "custom-code-model"
    marker = tmp_path / "remote-code-ran"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "custom-llama"  # no built-in class: only the folder's own code could load it
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "configuration_custom.CustomConfig",
    }
    (folder / "config.json").write_text(json.dumps(config))
    yield folder, marker


@family("safety")
def test_remote_code_runs_only_when_the_recipe_opts_in(
    custom_code_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, trials: Trials
) -> None:
    import transformers

    from engine.modeling import load_for_inference, load_model, load_tokenizer
    from engine.recipes import recipe_from_dict

    folder, marker = custom_code_model
    default = recipe_from_dict(
        {"model": {"base": str(folder), "dtype": "float32"}, "train": {"device": "cpu"}}
    )
    assert default.model.trust_remote_code is False
    tokenizer = load_tokenizer(folder, trust_remote_code=default.model.trust_remote_code)
    with pytest.raises(ModelError, match=r"(?i)custom code|trust_remote_code"):
        load_model(folder, default, tokenizer, device="cpu")
    with pytest.raises(ModelError, match=r"(?i)custom code|trust_remote_code"):
        load_for_inference(str(folder), device="cpu")
    assert not marker.exists(), "custom code from a model folder ran without the recipe's opt-in"
    trials.case()

    # With the opt-in, the flag reaches transformers (recorded here rather than running the code).
    seen: list[object] = []

    def record(*args: object, **kwargs: object) -> None:
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("recorded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    opted_in = recipe_from_dict(
        {
            "model": {"base": str(folder), "dtype": "float32", "trust_remote_code": True},
            "train": {"device": "cpu"},
        }
    )
    for recipe in (default, opted_in):
        with pytest.raises(RuntimeError, match="recorded"):
            load_model(folder, recipe, tokenizer, device="cpu")
    assert seen == [False, True]
    trials.case()


# -- Paths the user types ---------------------------------------------------------------------------------------


@family("safety")
def test_new_dataset_names_stay_inside_datasets(workspace: Workspace, trials: Trials) -> None:
    from tui.dataset_doc import new_dataset_path

    for name in ("../../escape", "/etc/passwd", "..", "sub/dir/name", "~/x"):
        path = new_dataset_path(workspace.datasets_dir, name)
        assert path.parent == workspace.datasets_dir and workspace.inside(path) == path.resolve(), (
            name,
            path,
        )
        trials.case()


@family("safety")
def test_tui_dataset_export_stays_inside_the_workspace_and_replaces_nothing(
    tiny_workspace: Workspace, tmp_path: Path, trials: Trials
) -> None:
    from textual.widgets import Input

    from tui.app import create_app
    from tui.engine_client import EngineClient
    from tui.screens.dataset import DatasetView
    from tui.screens.modals import PromptScreen

    other = tiny_workspace.datasets_dir / "other.jsonl"
    other.write_text('{"question": "Keep me?", "answer": "Yes."}\n')
    kept = other.read_bytes()
    outside = tmp_path / "outside.jsonl"
    attempts = {"../outside.jsonl": outside, str(outside): outside, "datasets/other.jsonl": other}

    async def export_to(typed: list[str]) -> None:
        app = create_app(engine=EngineClient(tiny_workspace), initial_tab="dataset")
        async with app.run_test(size=(100, 30)) as pilot:
            view = await mounted(app, pilot, DatasetView)
            await wait_for(pilot, lambda: view.document is not None, what="the dataset to open")
            for text in typed:
                shown = len(notifications(app))
                await pilot.press("x")
                await wait_for(
                    pilot, lambda: isinstance(app.screen, PromptScreen) and app.screen.query("#prompt-input")
                )
                app.screen.query_one("#prompt-input", Input).value = text
                await pilot.press("enter")
                await wait_for(
                    pilot, lambda n=shown: len(notifications(app)) > n, what=f"an answer to {text}"
                )

    asyncio.run(export_to(list(attempts)))
    trials.case(len(attempts))
    assert not outside.exists(), "an export was written outside the workspace"
    assert other.read_bytes() == kept, "an export silently replaced another dataset"
