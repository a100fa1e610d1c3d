"""Reading a training checkpoint as data, never as code.

torch.distributed.checkpoint (DCP) keeps a checkpoint's index in ``.metadata``, a pickle, and
reads it with ``pickle.load``; it reads non-tensor values (an optimizer's ``lr``, ``betas``) with
``torch.load(weights_only=False)``.  Either runs code from the file: a checkpoint someone hands
you could run anything on load.  The two classes here replace those two reads:

- :class:`SafeCheckpointReader` unpickles ``.metadata`` with an allow-list of the classes DCP's
  metadata is made of (read from ``torch.distributed.checkpoint.metadata`` and from what a real
  ``.metadata`` references: the metadata dataclasses, ``_StorageInfo``, ``torch.Size``, torch
  dtypes and layouts, ``pathlib`` paths), then checks its shape: every shard a plain file name
  inside the checkpoint folder, present, a regular file, large enough for what is read from it.
- :class:`SafeLoadPlanner` reads non-tensor values with ``torch.load(weights_only=True)``.

Anything else is refused with :class:`CheckpointRefused` saying why.  Tensors are read by DCP
with ``torch.load(weights_only=True)`` already.

These classes are printed verbatim into the generated ``train.py`` (its resume path) and used by
``tpplan export``: module level they need only ``torch`` and ``dcp``
(``torch.distributed.checkpoint``); everything else is imported inside them.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp


class CheckpointRefused(ValueError):
    """A checkpoint that is not plain DCP data (a pickle that would run code, a shard outside its
    folder or missing, corrupt metadata): it is not loaded."""


class SafeCheckpointReader(dcp.FileSystemReader):
    """``dcp.FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list of classes and
    checked before use (a checkpoint is data, never code)."""

    MAX_METADATA_BYTES = 1 << 30
    ALLOWED_CLASSES = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},  # and every torch dtype (torch.float32, ...): see find_class
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
        "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    }

    def read_metadata(self, *args, **kwargs):
        import importlib
        import io
        import os
        import pickle
        import stat

        from torch.distributed.checkpoint.metadata import StorageMeta

        allowed = self.ALLOWED_CLASSES
        rank = kwargs.get("rank")
        path = os.path.join(str(self.path), ".metadata" if rank is None else f"__{rank}.metadata")

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if name in allowed.get(module, ()):
                    return getattr(importlib.import_module(module), name)
                if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                    return getattr(torch, name)
                raise CheckpointRefused(
                    f"{path} refers to {module}.{name}, which checkpoint metadata never holds: "
                    "loading it could run code, so it is not loaded"
                )

            def persistent_load(self, pid):
                raise CheckpointRefused(f"{path} holds a persistent reference: not checkpoint metadata")

        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointRefused(f"{path} is not a regular file")
            with open(path, "rb") as f:
                data = f.read(self.MAX_METADATA_BYTES + 1)
        except OSError as exc:
            raise CheckpointRefused(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > self.MAX_METADATA_BYTES:
            raise CheckpointRefused(f"{path} is larger than {self.MAX_METADATA_BYTES:,} bytes")
        try:
            metadata = Unpickler(io.BytesIO(data)).load()
        except CheckpointRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to parse: corrupt metadata
            raise CheckpointRefused(
                f"{path} is not valid checkpoint metadata ({type(exc).__name__}: {exc})"
            ) from None
        self.check_metadata(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def check_metadata(self, metadata, path):
        """The shape of DCP metadata: tensor entries with sizes and chunks, and shards that are
        plain files in the checkpoint folder, present and long enough."""
        import os
        import stat

        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            Metadata,
            MetadataIndex,
            TensorStorageMetadata,
        )

        def refuse(why):
            raise CheckpointRefused(f"{path}: {why}")

        def is_size(value):
            return isinstance(value, torch.Size) and all(isinstance(n, int) and n >= 0 for n in value)

        if not isinstance(metadata, Metadata):
            refuse(f"holds a {type(metadata).__name__}, not DCP metadata")
        if not isinstance(metadata.state_dict_metadata, dict):
            refuse("state_dict_metadata is not a mapping")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(key, str):
                refuse(f"a state-dict key is a {type(key).__name__}, not a string")
            if isinstance(entry, TensorStorageMetadata):
                if not is_size(entry.size) or not isinstance(entry.properties.dtype, torch.dtype):
                    refuse(f"{key}: the tensor's size or dtype is not valid")
                if not isinstance(entry.chunks, list) or not all(
                    isinstance(c, ChunkStorageMetadata)
                    and is_size(c.offsets)
                    and is_size(c.sizes)
                    and len(c.offsets) == len(c.sizes) == len(entry.size)
                    for c in entry.chunks
                ):
                    refuse(f"{key}: the tensor's chunks are not valid")
            elif not isinstance(entry, BytesStorageMetadata):
                refuse(f"{key}: a {type(entry).__name__} is not a DCP storage entry")
        if not isinstance(metadata.storage_data, dict):
            refuse("storage_data is not a mapping")
        folder = os.path.dirname(path)
        needed: dict[str, int] = {}
        for index, where in metadata.storage_data.items():
            if not isinstance(index, MetadataIndex) or not isinstance(where, _StorageInfo):
                refuse("storage_data holds entries that are not DCP storage records")
            name = where.relative_path
            if (
                not isinstance(name, str)
                or name in ("", ".", "..")
                or os.path.basename(name) != name
                or "\0" in name
            ):
                refuse(f"{index.fqn}: shard {name!r} is not a file name inside the checkpoint folder")
            offset, length = where.offset, where.length
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (offset, length)):
                refuse(f"{index.fqn}: the byte range of shard {name!r} is not valid")
            descriptors = where.transform_descriptors
            if descriptors is not None and not all(isinstance(d, str) for d in descriptors):
                refuse(f"{index.fqn}: the transforms of shard {name!r} are not valid")
            needed[name] = max(needed.get(name, 0), offset + length)
        for name, end in sorted(needed.items()):
            shard = os.path.join(folder, name)
            try:
                info = os.stat(shard)
            except OSError:
                info = None
            if info is None:
                refuse(f"shard {name} is missing (the checkpoint is incomplete)")
            elif not stat.S_ISREG(info.st_mode):
                refuse(f"shard {name} is not a regular file")
            elif info.st_size < end:
                refuse(
                    f"shard {name} holds {info.st_size:,} bytes but the metadata reads up to byte {end:,} "
                    "(a truncated or corrupt shard)"
                )


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """``dcp.DefaultLoadPlanner`` that reads non-tensor values (an optimizer's lr, betas, ...) with
    ``torch.load(weights_only=True)``: plain data only."""

    def load_bytes(self, read_item, value):
        import pickle

        from torch.distributed.checkpoint._traverse import set_element

        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointRefused(
                f"the checkpoint value {read_item.dest_index.fqn} is not plain data: {exc}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def checkpoint_mismatch(metadata, shapes, tied=None):
    """Why a checkpoint (its DCP ``metadata``) cannot fill a model whose state dict has ``shapes``
    (name -> shape, the model's tensors stored under ``model.<name>``), in one line; None when it
    can.  The first tensor whose size differs is named with both sizes.  With ``tied`` (the model's
    groups of tied names, one stored name standing for its group) the model's tensors the
    checkpoint lacks, and the checkpoint's the model lacks, are named too."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = metadata.state_dict_metadata
    for name, shape in shapes.items():
        entry = stored.get(f"model.{name}")
        if entry is None:
            continue
        have = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else None
        if have != tuple(shape):
            return (
                f"the checkpoint's {name} is {'not a tensor' if have is None else list(have)}; "
                f"the model's is {list(shape)}"
            )
    if tied is None:
        return None
    group_of = {name: names for names in tied for name in names}
    missing = [
        name
        for name in shapes
        if f"model.{name}" not in stored and not any(f"model.{n}" in stored for n in group_of.get(name, ()))
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"the checkpoint lacks the model's {', '.join(missing[:3])}{more}"
    names = [key.partition(".")[2] for key in stored if key.startswith("model.")]
    extra = [name for name in names if name not in shapes]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"the checkpoint holds {', '.join(extra[:3])}{more}, which the model does not have"
    return None
