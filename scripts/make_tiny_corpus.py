"""Build specs/data/tiny-alpaca.jsonl: a small alpaca-style corpus from Python's own docstrings.

The embedded default must train with no network, so the corpus ships in the repository.  Its
records have alpaca's columns (instruction, input, output, text) so the same data code serves
tatsu-lab/alpaca.  Text: docstrings of the Python standard library (PSF license).  Deterministic:
the same Python version gives the same file.  Run: python scripts/make_tiny_corpus.py
"""

import importlib
import inspect
import json
import pathlib

MODULES = [
    "json",
    "os",
    "os.path",
    "re",
    "string",
    "textwrap",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "shutil",
    "random",
    "statistics",
    "math",
    "heapq",
    "bisect",
    "datetime",
    "calendar",
    "csv",
    "argparse",
    "logging",
    "subprocess",
    "tempfile",
    "glob",
    "fnmatch",
    "difflib",
    "hashlib",
    "base64",
    "zlib",
    "gzip",
    "tarfile",
    "zipfile",
    "copy",
    "pprint",
    "enum",
    "dataclasses",
    "typing",
    "contextlib",
    "abc",
    "inspect",
    "threading",
    "queue",
    "sched",
    "socket",
    "urllib.parse",
    "html",
    "email.message",
    "uuid",
    "decimal",
    "fractions",
    "operator",
    "struct",
    "array",
    "io",
    "time",
]
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


def records():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 80:
                continue
            doc = doc.strip()[:1200]
            kind = "class" if inspect.isclass(obj) else "function"
            instruction = f"Explain what the {kind} `{module_name}.{name}` does."
            yield {
                "instruction": instruction,
                "input": "",
                "output": doc,
                "text": PROMPT.format(instruction=instruction, output=doc),
            }


def main():
    out = pathlib.Path(__file__).resolve().parents[1] / "specs" / "data" / "tiny-alpaca.jsonl"
    rows = list(records())
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} records, {out.stat().st_size:,} bytes to {out}")


if __name__ == "__main__":
    main()
