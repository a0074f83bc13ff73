"""Every public function of ``medattn_fast.functional`` has a real signature (no ``*args`` /
``**kwargs``; every parameter named and annotated) and a docstring that documents every
parameter, states what it returns and names no internal document."""
from __future__ import annotations

import inspect
import re

import pytest

import medattn_fast.functional as MF

FUNCTIONS = [name for name in MF.__all__ if inspect.isfunction(getattr(MF, name))]


def test_every_op_is_public():
    assert set(FUNCTIONS) == {"position_attention", "channel_attention", "gaussian_axial_attention",
                              "gaussian_axial_from_scores", "window_attention", "external_attention",
                              "attention_gate"}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_signature_names_and_types_every_parameter(name):
    signature = inspect.signature(getattr(MF, name))
    for param in signature.parameters.values():
        assert param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD), f"{name}: *{param.name}"
        assert param.annotation is not inspect.Parameter.empty, f"{name}: {param.name} has no type"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return type"
    assert "backend" in signature.parameters and signature.parameters["backend"].kind == param.KEYWORD_ONLY


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstring_documents_every_parameter(name):
    doc = inspect.getdoc(getattr(MF, name))
    assert "Args:" in doc and "Returns:" in doc, name
    args = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
    documented = set(re.findall(r"^\s{0,4}([\w, ]+):", args, flags=re.M))
    names = {n.strip() for entry in documented for n in entry.split(",")}
    missing = set(inspect.signature(getattr(MF, name)).parameters) - names
    assert not missing, f"{name}: undocumented parameters {sorted(missing)}"
    assert not re.search(r"[D]ESIGN\.md|[s]eed 0\d\d", doc), f"{name} cites an internal document"
