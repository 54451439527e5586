"""Every bad input to the Python API is refused before compute with an error that names the
culprit: one table, each case (call, error type, a regex the message must match)."""

import math

import pytest
import torch
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf

P = NORMS["llama"]
D = 32
L0 = "model.layers.0.post_attention_layernorm"


class World:
    """One tiny model, tokenizer and steering shared by every case (built once)."""

    def __init__(self):
        self.model, self.tok = tiny_model("llama"), tiny_tokenizer()
        g = torch.Generator().manual_seed(0)
        self.st = lf.Steering(
            {
                f"model.layers.{i}.post_attention_layernorm": (
                    1 + 0.2 * torch.randn(D, generator=g),
                    0.2 * torch.randn(D, generator=g),
                )
                for i in range(3)
            },
            {"model": lf.model_fingerprint(self.model)},
        )
        self.calls = 0

    def train(self, **kw):
        args = dict(modules=P, steps=1, progress=False)
        args.update(kw)
        src, tgt = args.pop("source", SOURCE), args.pop("target", TARGET)
        return lf.train(self.model, args.pop("tok", self.tok), src, tgt, **args)


@pytest.fixture(scope="module")
def w():
    return World()


def z():
    return torch.randn(2, 3, D)


ones, zeros = torch.ones(D), torch.zeros(D)
NAN = float("nan")
INF = float("inf")

CASES = [
    # --- lf.train: data -----------------------------------------------------------------------
    ("train source is one string", lambda w: w.train(source="you fool"), TypeError, "source.*one str"),
    ("train target is a dict", lambda w: w.train(target={"a": 1}), TypeError, "target.*dict"),
    ("train source empty", lambda w: w.train(source=[]), ValueError, "source: empty list"),
    (
        "train source has empty entry",
        lambda w: w.train(source=["ok", " "]),
        ValueError,
        r"source: entries \[1\]",
    ),
    ("train source has non-string", lambda w: w.train(source=["ok", 3]), ValueError, r"entries \[1\]"),
    ("train source is an int", lambda w: w.train(source=5), TypeError, "source.*int"),
    ("train without tokenizer", lambda w: w.train(tok=None), ValueError, "tokenizer is needed"),
    ("train tokenizer not callable", lambda w: w.train(tok=object()), TypeError, "tokenizer must be"),
    # --- lf.train: settings -----------------------------------------------------------------
    ("train lr nan", lambda w: w.train(lr=NAN), ValueError, "lr must be finite"),
    ("train lr inf", lambda w: w.train(lr=INF), ValueError, "lr must be finite"),
    ("train lr zero", lambda w: w.train(lr=0.0), ValueError, "lr must be > 0"),
    ("train lr negative", lambda w: w.train(lr=-1.0), ValueError, "lr must be > 0"),
    ("train lr string", lambda w: w.train(lr="0.1"), TypeError, "lr must be a real number"),
    ("train steps negative", lambda w: w.train(steps=-1), ValueError, "steps must be >= 0"),
    ("train steps float", lambda w: w.train(steps=2.5), TypeError, "steps must be an integer"),
    ("train batch_size zero", lambda w: w.train(batch_size=0), ValueError, "batch_size must be >= 1"),
    ("train sparsity negative", lambda w: w.train(sparsity=-0.1), ValueError, "sparsity must be >= 0"),
    ("train sparsity nan", lambda w: w.train(sparsity=NAN), ValueError, "sparsity must be finite"),
    ("train l1 inf", lambda w: w.train(l1=INF), ValueError, "l1 must be finite"),
    ("train group negative", lambda w: w.train(group=-1.0), ValueError, "group must be >= 0"),
    (
        "train control_weight nan",
        lambda w: w.train(control_weight=NAN),
        ValueError,
        "control_weight must be finite",
    ),
    ("train optimizer unknown", lambda w: w.train(optimizer="lbfgs"), ValueError, "optimizer must be one of"),
    ("train reduction unknown", lambda w: w.train(reduction="mean"), ValueError, "reduction must be one of"),
    ("train init unknown", lambda w: w.train(init="random"), ValueError, "init must be one of"),
    ("train init wrong type", lambda w: w.train(init=3), TypeError, "init must be None"),
    ("train gate unknown", lambda w: w.train(gate="always"), ValueError, "gate must be one of"),
    ("train gate_kind unknown", lambda w: w.train(gate_kind="tanh"), ValueError, "gate_kind must be one of"),
    ("train e2e without control", lambda w: w.train(gate="e2e"), ValueError, "needs control"),
    ("train max_length zero", lambda w: w.train(max_length=0), ValueError, "max_length must be >= 1"),
    (
        "train max_length past positions",
        lambda w: w.train(max_length=10_000),
        ValueError,
        "max_length=10000 exceeds the model's max_position_embeddings=128",
    ),
    (
        "train checkpoint_every without path",
        lambda w: w.train(checkpoint_every=1),
        ValueError,
        "checkpoint_path",
    ),
    ("train modules regex invalid", lambda w: w.train(modules="(("), ValueError, "not a valid regex"),
    (
        "train modules match nothing",
        lambda w: w.train(modules=r".*post_attn_norm"),
        ValueError,
        "matches no module.*nearby names",
    ),
    (
        "train loss module before the maps",
        lambda w: w.train(
            modules=r"model\.layers\.2\.post_attention_layernorm",
            loss_modules=r"model\.layers\.0\.input_layernorm",
        ),
        ValueError,
        r"loss_modules \['model.layers.0.input_layernorm'\] run before the first steered",
    ),
    ("train backend unknown", lambda w: w.train(backend="cuda"), ValueError, "backend must be one of"),
    (
        "train init steering misses a module",
        lambda w: w.train(init=lf.Steering({L0: (ones, zeros)})),
        ValueError,
        "init steering has no map for module 'model.layers.1",
    ),
    (
        "train on something not a model",
        lambda w: lf.train("gpt2", w.tok, SOURCE, TARGET, modules=P),
        TypeError,
        "expected a torch.nn.Module",
    ),
    # --- Steering construction and files ------------------------------------------------------
    ("steering empty", lambda w: lf.Steering({}), ValueError, "at least one module map"),
    ("steering map not a pair", lambda w: lf.Steering({L0: ones}), ValueError, "must be a pair"),
    (
        "steering shapes differ",
        lambda w: lf.Steering({L0: (ones, torch.zeros(3))}),
        ValueError,
        r"omega \(32,\) and bias \(3,\)",
    ),
    (
        "steering 2-D omega",
        lambda w: lf.Steering({L0: (torch.ones(2, 3), torch.zeros(2, 3))}),
        ValueError,
        "must both be",
    ),
    (
        "steering nan omega",
        lambda w: lf.Steering({L0: (torch.full((D,), NAN), zeros)}),
        ValueError,
        "map for 'model.layers.0.post_attention_layernorm': omega not finite",
    ),
    (
        "steering inf bias",
        lambda w: lf.Steering({L0: (ones, torch.full((D,), INF))}),
        ValueError,
        "bias not finite",
    ),
    (
        "steering integer tensors",
        lambda w: lf.Steering({L0: (torch.ones(D, dtype=torch.long), zeros)}),
        TypeError,
        "floating-point",
    ),
    (
        "steering gate without map",
        lambda w: lf.Steering({L0: (ones, zeros)}, gates={"x": {"w": ones, "c": torch.zeros(1)}}),
        ValueError,
        "gate for 'x', which has no map",
    ),
    (
        "steering gate kind unknown",
        lambda w: lf.Steering(
            {L0: (ones, zeros)}, gates={L0: {"w": ones, "c": torch.zeros(1), "kind": "tanh"}}
        ),
        ValueError,
        "gate kind",
    ),
    (
        "steering gate nan",
        lambda w: lf.Steering({L0: (ones, zeros)}, gates={L0: {"w": ones * NAN, "c": torch.zeros(1)}}),
        ValueError,
        "gate for .*not finite",
    ),
    (
        "steering inverse of zero omega",
        lambda w: lf.Steering({L0: (zeros, zeros)}).inverse(),
        ValueError,
        "no inverse",
    ),
    (
        "steering load missing",
        lambda w: lf.Steering.load("/nonexistent/s.safetensors"),
        FileNotFoundError,
        "does not exist",
    ),
    # --- attach / apply ------------------------------------------------------------------------
    (
        "attach strength nan",
        lambda w: w.st.attach(w.model, strength=NAN),
        ValueError,
        "strength must be finite",
    ),
    (
        "attach strength inf",
        lambda w: w.st.attach(w.model, strength=INF),
        ValueError,
        "strength must be finite",
    ),
    (
        "attach strength string",
        lambda w: w.st.attach(w.model, strength="1"),
        TypeError,
        "strength must be a real number",
    ),
    (
        "attach strength dict nan",
        lambda w: w.st.attach(w.model, strength={L0: NAN}),
        ValueError,
        r"strength\['model.layers.0.post_attention_layernorm'\] must be finite",
    ),
    (
        "attach strength key unknown",
        lambda w: w.st.attach(w.model, strength={"nothing": 1.0}),
        ValueError,
        "matches no steered module",
    ),
    (
        "attach strength regexes disagree",
        lambda w: w.st.attach(w.model, strength={r".*layers\.0\..*": 0.5, r".*post_attention.*": 2.0}),
        ValueError,
        r"both match module 'model\.layers\.0\.post_attention_layernorm'",
    ),
    (
        "attach strength tensor",
        lambda w: w.st.attach(w.model, strength=torch.ones(1)),
        TypeError,
        "per-token strength",
    ),
    (
        "attach wrong dims",
        lambda w: lf.Steering({L0: (torch.ones(7), torch.zeros(7))}).attach(w.model),
        ValueError,
        "has 32 coordinates but its map has 7",
    ),
    (
        "attach missing module",
        lambda w: lf.Steering({"model.layers.9.x": (ones, zeros)}).attach(w.model),
        ValueError,
        "missing from LlamaForCausalLM",
    ),
    ("attach other model", lambda w: w.st.attach(tiny_model("qwen2")), ValueError, "trained on model"),
    (
        "attach inverse with zero omega",
        lambda w: lf.Steering({L0: (zeros, zeros)}).attach(w.model, strength=-1, strict=False),
        ValueError,
        r"omega is 0 at coordinates \[0, 1",
    ),
    (
        "attach twice",
        lambda w: _attach_twice(w),
        lf.AlreadySteeredError,
        "already carry an attached steering",
    ),
    # --- functional ----------------------------------------------------------------------------
    (
        "affine_steer strength nan",
        lambda w: lf.affine_steer(z(), ones, zeros, NAN),
        ValueError,
        "strength must be finite",
    ),
    (
        "affine_steer omega shape",
        lambda w: lf.affine_steer(z(), torch.ones(3), zeros),
        ValueError,
        r"omega must have shape \(32,\)",
    ),
    (
        "affine_steer integer z",
        lambda w: lf.affine_steer(torch.ones(2, D, dtype=torch.long), ones, zeros),
        TypeError,
        "floating-point",
    ),
    (
        "affine_steer channel_dim",
        lambda w: lf.affine_steer(z(), ones, zeros, channel_dim=5),
        ValueError,
        "out of range",
    ),
    (
        "gated_steer strength inf",
        lambda w: lf.gated_steer(z(), ones, zeros, zeros, torch.zeros(1), INF),
        ValueError,
        "strength must be finite",
    ),
    (
        "gated_steer gate unknown",
        lambda w: lf.gated_steer(z(), ones, zeros, zeros, torch.zeros(1), gate="tanh"),
        ValueError,
        "gate must be one of",
    ),
    (
        "gated_steer gate_c shape",
        lambda w: lf.gated_steer(z(), ones, zeros, zeros, torch.zeros(2)),
        ValueError,
        "gate_c",
    ),
    (
        "sliced_wasserstein 3-D",
        lambda w: lf.sliced_wasserstein(torch.randn(4, 3, 2), torch.randn(4, 3)),
        ValueError,
        "must be 2-D",
    ),
    (
        "sliced_wasserstein dims differ",
        lambda w: lf.sliced_wasserstein(torch.randn(4, 3), torch.randn(4, 5)),
        ValueError,
        "coordinate dims differ",
    ),
    (
        "TargetProfile n zero",
        lambda w: lf.TargetProfile(torch.randn(4, 3), 0),
        ValueError,
        "n .*must be >= 1",
    ),
    (
        "linear_act_map one sample",
        lambda w: lf.linear_act_map(torch.randn(1, 3), torch.randn(4, 3)),
        ValueError,
        "at least 2 source",
    ),
    # --- fit_gates -------------------------------------------------------------------------------
    (
        "fit_gates threshold nan",
        lambda w: lf.fit_gates(w.model, w.tok, SOURCE, TARGET, w.st, threshold=NAN),
        ValueError,
        "threshold must be finite",
    ),
    (
        "fit_gates threshold negative",
        lambda w: lf.fit_gates(w.model, w.tok, SOURCE, TARGET, w.st, threshold=-1),
        ValueError,
        "threshold must be >= 0",
    ),
    (
        "fit_gates k zero",
        lambda w: lf.fit_gates(w.model, w.tok, SOURCE, TARGET, w.st, k=0),
        ValueError,
        "k must be >= 1",
    ),
    (
        "fit_gates l2 nan",
        lambda w: lf.fit_gates(w.model, w.tok, SOURCE, TARGET, w.st, l2=NAN),
        ValueError,
        "l2 must be finite",
    ),
    (
        "fit_gates on_low unknown",
        lambda w: lf.fit_gates(w.model, w.tok, SOURCE, TARGET, w.st, on_low="drop"),
        ValueError,
        "on_low must be one of",
    ),
    (
        "fit_gates not a steering",
        lambda w: lf.fit_gates(w.model, w.tok, SOURCE, TARGET, {"a": 1}),
        TypeError,
        "steering must be a lineas_fast.Steering",
    ),
    (
        "fit_gates control one string",
        lambda w: lf.fit_gates(w.model, w.tok, SOURCE, "calm", w.st),
        TypeError,
        "control.*one str",
    ),
    # --- fit_linear_act ----------------------------------------------------------------------------
    (
        "fit_linear_act source dict",
        lambda w: lf.fit_linear_act(w.model, w.tok, {"a": 1}, TARGET, modules=P),
        TypeError,
        "source.*dict",
    ),
    (
        "fit_linear_act modules match nothing",
        lambda w: lf.fit_linear_act(w.model, w.tok, SOURCE, TARGET, modules="zz"),
        ValueError,
        "matches no module",
    ),
]


def _attach_twice(w):
    h = w.st.attach(w.model)
    try:
        w.st.attach(w.model)
    finally:
        h.remove()


def test_the_table_is_large_and_its_names_unique():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,call,error,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_culprit(w, name, call, error, match, monkeypatch):
    """The error type and a message naming the culprit; and no forward of the model ran
    (refused before compute), and nothing stayed attached."""
    forwards = []
    h = w.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(error, match=match):
            call(w)
    finally:
        h.remove()
    early = ("loss module before the maps",)  # needs one short pass to know the order
    if not any(e in name for e in early):
        assert forwards == [], f"{name}: the model ran {len(forwards)} forward(s) before the error"
    assert not any("forward" in m.__dict__ for m in w.model.modules()), "a map stayed attached"
    assert math.isfinite(sum(float(p.sum()) for p in w.model.parameters()))


FUSE_CASES = [
    (
        "fuse strength nan",
        lambda w: lf.fuse(w.model, w.st, strength=NAN),
        ValueError,
        "strength must be finite",
    ),
    (
        "fuse strength inf",
        lambda w: lf.fuse(w.model, w.st, strength=INF),
        ValueError,
        "strength must be finite",
    ),
    (
        "fuse other model's steering",
        lambda w: lf.fuse(tiny_model("qwen2"), w.st),
        ValueError,
        "trained on model",
    ),
    ("fuse not a steering", lambda w: lf.fuse(w.model, {"a": 1}), TypeError, "fuse needs a Steering"),
    ("fuse empty list", lambda w: lf.fuse(w.model, []), TypeError, "fuse needs a Steering"),
    (
        "fuse wrong dims",
        lambda w: lf.fuse(w.model, lf.Steering({L0: (torch.ones(7), torch.zeros(7))})),
        ValueError,
        "has 32 coordinates but its map has 7",
    ),
    (
        "fuse while attached",
        lambda w: _fuse_attached(w, lf.fuse),
        lf.AlreadySteeredError,
        "carry attached steering maps",
    ),
    (
        "fuse_in_memory strength nan",
        lambda w: lf.fuse_in_memory(w.model, w.st, strength=NAN),
        ValueError,
        "strength must be finite",
    ),
    (
        "fuse_in_memory other model",
        lambda w: lf.fuse_in_memory(tiny_model("qwen2"), w.st),
        ValueError,
        "trained on model",
    ),
    (
        "fuse_in_memory while attached",
        lambda w: _fuse_attached(w, lf.fuse_in_memory),
        lf.AlreadySteeredError,
        "carry attached steering maps",
    ),
]


def _fuse_attached(w, fn):
    h = w.st.attach(w.model)
    try:
        fn(w.model, w.st)
    finally:
        h.remove()


@pytest.mark.parametrize("name,call,error,match", FUSE_CASES, ids=[c[0] for c in FUSE_CASES])
def test_fusion_validates_like_attach_and_leaves_weights_alone(w, name, call, error, match):
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    with pytest.raises(error, match=match):
        call(w)
    after = w.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in w.model.modules())
