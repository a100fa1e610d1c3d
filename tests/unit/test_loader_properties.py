"""Property tests: any input either loads as a Spec or raises tpplan's own error, never anything else."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpplan.core.errors import TpplanError
from tpplan.core.layouts import Layout, parse_layout
from tpplan.spec.loader import load_spec_text
from tpplan.spec.rules import STYLE_NAMES
from tpplan.spec.schema import Spec

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def loads_or_tpplan_error(text: str) -> None:
    try:
        spec = load_spec_text(text)
    except TpplanError as exc:
        message = str(exc)
        assert message and "Traceback" not in message
    else:
        assert isinstance(spec, Spec)


@SETTINGS
@given(st.text(max_size=400))
def test_any_text(text):
    loads_or_tpplan_error(text)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["shard(1)", "shard(-1)", "replicate", "shard(x)", "node", "auto", *STYLE_NAMES]),
)
keys = st.one_of(
    st.sampled_from(
        [
            "name",
            "model",
            "plan",
            "match",
            "style",
            "mesh",
            "tp",
            "dp",
            "train",
            "launch",
            "fixups",
            "config",
            "input_layouts",
            "output_layouts",
            "use_local_output",
            "seq_length",
            "extends",
            "op",
            "attr",
        ]
    ),
    st.text(max_size=8),
)
data = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=25,
)


@SETTINGS
@given(data)
def test_any_yaml_data(value):
    loads_or_tpplan_error(yaml.safe_dump(value))


rule = st.fixed_dictionaries(
    {
        "match": st.sampled_from(["lm_head", "model.layers.*.mlp", "a..b", "", "x[y"]),
        "style": st.sampled_from([*STYLE_NAMES, "colwse", 3]),
    },
    optional={
        "input_layouts": st.one_of(
            st.sampled_from(["shard(1)", "replicate", "shard(x)"]),
            st.lists(st.sampled_from(["shard(1)", None]), max_size=3),
        ),
        "desired_input_layouts": st.one_of(
            st.sampled_from(["replicate", "bogus"]),
            st.lists(st.sampled_from(["replicate", None]), max_size=3),
        ),
        "output_layouts": st.sampled_from(["shard(-1)", "replicate", 1, None]),
        "use_local_output": st.sampled_from([True, False, "yes", 0]),
        "plan": st.lists(
            st.fixed_dictionaries({"match": st.just("x"), "style": st.just("colwise")}), max_size=2
        ),
    },
)
spec_like = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["ok", "../x", "", 5]),
        "model": st.sampled_from(
            [{"name": "a/b"}, {"config": {"model_type": "llama"}, "pretrained": False}, {}, "x"]
        ),
        "plan": st.lists(rule, max_size=4),
    },
    optional={
        "mesh": st.fixed_dictionaries({}, optional={"tp": scalars, "dp": scalars}),
        "train": st.dictionaries(
            st.sampled_from(["seq_length", "lr", "batch_size", "max_steps", "bogus"]), scalars, max_size=3
        ),
    },
)


@SETTINGS
@given(spec_like)
def test_spec_shaped_data(value):
    loads_or_tpplan_error(yaml.safe_dump(value))


@SETTINGS
@given(st.text(max_size=30))
def test_layout_parser_raises_only_value_error(text):
    try:
        layout = parse_layout(text)
    except ValueError as exc:
        assert "layout" in str(exc)
    else:
        assert parse_layout(str(layout)) == layout


@given(st.one_of(st.none(), st.integers(-8, 8)))
def test_layout_round_trip(dim):
    layout = Layout(dim)
    assert parse_layout(str(layout)) == layout
    assert parse_layout(f"  SHARD( {dim} )" if dim is not None else "Replicate") == layout


def test_colon_numbers_stay_text_not_base_60():
    spec = load_spec_text("name: x\nmodel: {name: a/b}\nplan: [{match: lm_head, style: colwise}]\nlaunch: {nnodes: 1:4}\n")
    assert spec.launch.nnodes == "1:4"
