"""Cases on disk (corpus entries, stored findings) and the deterministic case generator.

A stored case is a directory: ``model.onnx``, its side files, an optional ``links.txt`` (``name -> target`` per
line, recreated as symlinks when the case is written) and an optional ``finding.json`` describing it.
Case number ``index`` of a campaign with seed ``seed`` depends on nothing else, so any finding can be
regenerated from the two numbers (and the corpus).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import onnx

from fuzz.mutate import mutate
from fuzz.seeds import MODEL_FILE, Case, seed_cases

LINKS_FILE = "links.txt"
FINDING_FILE = "finding.json"
_NOT_SIDE_FILES = {MODEL_FILE, LINKS_FILE, FINDING_FILE}


def read_case(directory: Path) -> Case:
    """The case stored in ``directory`` (see the module docstring)."""
    files = tuple(
        (str(path.relative_to(directory)), path.read_bytes())
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.name not in _NOT_SIDE_FILES
    )
    links: tuple[tuple[str, str], ...] = ()
    links_file = directory / LINKS_FILE
    if links_file.is_file():
        pairs = (line.split(" -> ", 1) for line in links_file.read_text().splitlines() if " -> " in line)
        links = tuple((name, target) for name, target in pairs)
    return Case((directory / MODEL_FILE).read_bytes(), files, links)


def write_case(case: Case, directory: Path, finding: dict[str, object] | None = None) -> None:
    """Store ``case`` in the empty or new ``directory``; symlinks are described in ``links.txt``, not made."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in case.files:
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    if case.links:
        (directory / LINKS_FILE).write_text("".join(f"{name} -> {target}\n" for name, target in case.links))
    (directory / MODEL_FILE).write_bytes(case.model_bytes)
    if finding is not None:
        (directory / FINDING_FILE).write_text(json.dumps(finding, indent=2, sort_keys=True) + "\n")


def _case_from_onnx_file(path: Path) -> Case:
    """A corpus ``.onnx`` file with the external-data files it names that sit beside it."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and "/" not in entry.value and (path.parent / entry.value).is_file():
                names.add(entry.value)
    return Case(path.read_bytes(), tuple((name, (path.parent / name).read_bytes()) for name in sorted(names)))


def load_corpus(directory: Path | None) -> list[tuple[str, Case]]:
    """The built-in seeds plus, from ``directory``, every ``*.onnx`` file and every case directory, by name."""
    cases = sorted(seed_cases().items())
    if directory is None:
        return cases
    extra = []
    for path in sorted(directory.iterdir()):
        if path.is_dir() and (path / MODEL_FILE).is_file():
            extra.append((f"corpus/{path.name}", read_case(path)))
        elif path.is_file() and path.suffix == ".onnx":
            extra.append((f"corpus/{path.name}", _case_from_onnx_file(path)))
    return cases + extra


def generate(seed: int, index: int, corpus: list[tuple[str, Case]]) -> tuple[str, Case]:
    """Case ``index`` of campaign ``seed``: one corpus entry mutated by ``random.Random(f"{seed}:{index}")``."""
    rng = random.Random(f"{seed}:{index}")
    name, base = corpus[rng.randrange(len(corpus))]
    return name, mutate(base, rng)
