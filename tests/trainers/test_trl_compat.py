"""The TRL / transformers behaviour the trainers rely on (``diffgr2_trl/trainers/_trl_compat.py``).

An upgrade of TRL that renames, reorders or adds a required parameter to a method we override fails here, in one
test, instead of passing arguments into the wrong slots somewhere in a training run.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from diffgr2_trl.trainers._trl_compat import TRL_METHODS_RELIED_ON


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("cls", "method", "params"), TRL_METHODS_RELIED_ON, ids=lambda v: str(v))
def test_overridden_trl_methods_keep_their_signatures(cls, method, params):
    fn = getattr(_resolve(cls), method, None)
    assert fn is not None, f"{cls}.{method} is gone from the installed TRL; update diffgr2_trl/trainers."
    sig = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in sig[: len(params)]] == list(params), (cls, method, [p.name for p in sig])
    required_after = [p.name for p in sig[len(params):] if p.default is p.empty
                      and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not required_after, f"{cls}.{method} now requires {required_after}; our override does not pass them."


def test_every_trl_method_the_trainers_override_is_listed():
    from diffgr2_trl.trainers import BlockDiffusionTrainer, DiffusionGRPOTrainer, OnPolicyDistillationTrainer

    listed = {(c, m) for c, m, _ in TRL_METHODS_RELIED_ON}
    for ours, base in ((BlockDiffusionTrainer, "trl.SFTTrainer"), (OnPolicyDistillationTrainer, "trl.DistillationTrainer"),
                       (DiffusionGRPOTrainer, "trl.GRPOTrainer")):
        parent = _resolve(base)
        overridden = {name for name, v in vars(ours).items() if inspect.isfunction(v) and hasattr(parent, name)
                      and name != "__init__"}
        assert overridden <= {m for c, m in listed if c == base}, (ours.__name__, overridden)
