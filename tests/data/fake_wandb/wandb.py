"""A stand-in for the wandb package (tests only: put this folder on PYTHONPATH).  It records what
the generated train.py asks of W&B in DIR/fake-wandb.jsonl, one JSON line per call."""

import json
import os
import uuid


class util:  # noqa: N801 - wandb.util
    @staticmethod
    def generate_id():
        return uuid.uuid4().hex[:8]


class Run:
    def __init__(self, path, run_id):
        self.path, self.id, self.url = path, run_id, None

    def _write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, data, step=None):
        self._write({"call": "log", "step": step, "data": data})

    def finish(self):
        self._write({"call": "finish"})


def init(project=None, entity=None, name=None, tags=None, dir=None, id=None, resume=None, config=None):  # noqa: A002
    run = Run(os.path.join(dir, "fake-wandb.jsonl"), id)
    run._write({"call": "init", "project": project, "entity": entity, "name": name, "tags": tags, "id": id,
                "resume": resume, "config": config})
    return run
