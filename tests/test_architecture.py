"""The seams the package layout promises (docs/architecture.md), checked on the source.

- only `pipeline/format/layout.py` spells a path inside a dataset;
- `tokenizers/` imports nothing from `pipeline/`;
- no two modules import each other, directly or through others (module-level imports);
- every engine, shard format and codec is reachable through its registry.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The design card's folders, as the one import name lays them out.
PACKAGES = {"tokshard": REPO / "tokshard", "tokshard.pipeline": REPO / "pipeline",
            "tokshard.tokenizers": REPO / "tokenizers", "tokshard.schemas": REPO / "schemas",
            "tokshard.jobs": REPO / "jobs"}
LAYOUT = REPO / "pipeline" / "format" / "layout.py"


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()


def _strings(tree: ast.AST):
    """String constants that are not docstrings (f-string pieces included)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


# What a dataset-relative path looks like: a dataset folder with a slash, or a dataset file name.
DATASET_PATH = re.compile(r"(^|/)(shards|samples|codec|tokenizer|_work|units)/|"
                          r"^(manifest|labels|timings)\.parquet$|^(job\.json|state\.bin)$")


def test_only_the_layout_spells_dataset_paths():
    offenders = []
    for path in MODULES.values():
        if path == LAYOUT:
            continue
        for node in _strings(ast.parse(path.read_text())):
            if DATASET_PATH.search(node.value):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offenders, "dataset paths spelled outside format/layout.py:\n" + "\n".join(offenders)
    # The check itself sees what it looks for.
    layout = [n.value for n in _strings(ast.parse(LAYOUT.read_text()))]
    assert any(DATASET_PATH.search(s) for s in layout)


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Modules of this package that `module` imports (module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:    # `if TYPE_CHECKING:` blocks do not run
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n and n != module:
                found.add(n)
    return found


def test_tokenizers_import_nothing_from_the_pipeline():
    bad = {name: sorted(i for i in _imports(path, name, top_level_only=False) if i.startswith("tokshard.pipeline"))
           for name, path in MODULES.items() if name.startswith("tokshard.tokenizers")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_cycles():
    # A module importing its own package's __init__ is how Python imports a submodule,
    # not a dependency on the package's contents: those edges are left out.
    graph = {name: {i for i in _imports(path, name, top_level_only=True) if not name.startswith(i + ".")}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert graph["tokshard.pipeline.convert.job"]      # the graph is not empty


def test_registries_reach_every_engine_format_and_codec():
    from tokshard.pipeline.convert.config import CHOICES
    from tokshard.pipeline.convert.engines import ENGINES, get_engine
    from tokshard.pipeline.convert.engines.base import Engine
    from tokshard.pipeline.format.codecs import CODECS, TokenCodec
    from tokshard.pipeline.format.shards import SHARD_FORMATS, ShardFormat, get_format

    assert set(ENGINES) == {"local", "ray"} and CHOICES["engine"] == tuple(ENGINES)
    assert isinstance(get_engine("local"), Engine) and type(get_engine("local")).name == "local"
    assert set(SHARD_FORMATS) == {"parquet", "wds"} and CHOICES["format"] == tuple(SHARD_FORMATS)
    assert all(isinstance(get_format(n), ShardFormat) and get_format(n).name == n for n in SHARD_FORMATS)
    assert set(CODECS) == {"raw", "bitpack", "zstd", "zstd-dict", "rans-unigram", "rans-ctx"}
    assert all(issubclass(c, TokenCodec) and c.name == n for n, c in CODECS.items())
    with pytest.raises(Exception, match="unknown engine"):
        get_engine("spark")


def test_retry_policy_retries_only_transient_failures():
    from tokshard.errors import SourceError, UsageError
    from tokshard.pipeline.convert.engines.retry import RetryPolicy

    policy = RetryPolicy(2)
    assert policy.again(OSError("connection reset"), 0) and policy.again(TimeoutError(), 1)
    assert not policy.again(OSError("connection reset"), 2)         # out of attempts
    for deterministic in (UsageError("bad --where"), SourceError("no image column"), ValueError("bad config"),
                          KeyError("x")):
        assert not policy.again(deterministic, 0)
        assert policy.failure(deterministic, 0).transient is False

    class Wrapped(Exception):                                        # an engine's wrapper (Ray's RayTaskError)
        def __init__(self, cause: BaseException):
            super().__init__(str(cause))
            self.cause = cause
    assert not policy.again(Wrapped(UsageError("bad")), 0) and policy.again(Wrapped(OSError("io")), 0)
    assert policy.failure(Wrapped(UsageError("bad predicate")), 0).error == "UsageError: bad predicate"


def test_a_deterministic_unit_failure_is_not_retried(tmp_path, photo_tars, tokenizer_dir, monkeypatch):
    """A predicate that fails on the samples' data fails each unit once, and says it was not retried."""
    from collections import Counter

    from conftest import convert_config

    import tokshard.pipeline.convert.stages as stages
    from tokshard.errors import JobError
    from tokshard.pipeline.convert.job import convert

    calls = Counter()
    real = stages.select_records

    def counted(records, where):
        calls[where] += 1
        return real(records, where)

    monkeypatch.setattr(stages, "select_records", counted)
    # Valid SQL, but the samples' metadata has no such column: the unit fails on its data.
    cfg = convert_config([photo_tars], tmp_path / "out", tokenizer_dir)
    cfg.where = "no_such_field > 1"
    with pytest.raises(JobError, match="not retried"):
        convert(cfg, quiet=True)
    assert calls["no_such_field > 1"] == 3           # three units, one attempt each
