"""Exact diagnostics against dense computation; merge and vanilla-peft export equivalence."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model

from structlora import StructLoraConfig, get_structlora_model
from structlora.diagnostics import factors_by_family, gradient_cosines, update_diagnostics
from structlora.lowrank import (cos_adj, cos_penalty, cosine_matrix, drift_energy, frob_inner, gram_matrix,
                                laplacian_penalty, singular_values, svd_factors)
from toy import randomize_lora, tiny_bert, toy_batch


def structured(**kw):
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                           gate="concrete", graph="hybrid", **kw)
    sm = get_structlora_model(tiny_bert(layers=4), cfg)
    randomize_lora(sm)
    with torch.no_grad():  # a mix of open, partly open and closed gates
        for gate in sm.gates.values():
            gate.logits.copy_(torch.linspace(-3, 3, gate.logits.numel()).reshape(gate.logits.shape))
    return sm.eval()


def dense(f):
    b, a = f
    return b @ a


@pytest.fixture(scope="module")
def families():
    return factors_by_family(structured())


def test_inner_products_energy_and_cosines_match_dense(families):
    for members in families.values():
        factors = [f for _, f in members]
        ws = [dense(f) for f in factors]
        g_dense = torch.stack([torch.stack([(wi * wj).sum() for wj in ws]) for wi in ws])
        torch.testing.assert_close(gram_matrix(factors), g_dense, rtol=1e-5, atol=1e-7)
        e_dense = sum(((ws[l + 1] - ws[l]) ** 2).sum() for l in range(len(ws) - 1))
        torch.testing.assert_close(drift_energy(factors), e_dense, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(laplacian_penalty(factors), e_dense, rtol=1e-5, atol=1e-7)
        flat = torch.stack([w.flatten() for w in ws])
        cos_dense = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
        torch.testing.assert_close(cosine_matrix(factors), cos_dense, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cos_adj(factors), cos_dense.diagonal(1).mean(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cos_penalty(factors), (1 - cos_dense.diagonal(1)).sum(), rtol=1e-4, atol=1e-5)


def test_singular_values_and_svd_export_match_dense(families):
    for members in families.values():
        for _, f in members:
            w = dense(f)
            ref = torch.linalg.svdvals(w)
            sv = singular_values(*f)
            torch.testing.assert_close(sv, ref[: sv.numel()], rtol=1e-4, atol=1e-6)
            b, a, err = svd_factors(*f, rank=2)
            s = ref[ref > 0]
            expected = float((s[2:].pow(2).sum() / s.pow(2).sum()).sqrt())
            assert err == pytest.approx(expected, rel=1e-3, abs=1e-6)
            assert float(torch.linalg.norm(w - b @ a) / torch.linalg.norm(w)) == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_zero_update_has_cosine_zero():
    z = (torch.zeros(5, 2), torch.randn(2, 3))
    x = (torch.randn(5, 2), torch.randn(2, 3))
    assert float(cosine_matrix([z, x])[0, 1]) == 0.0


def test_gradient_cosines_exact_and_sketch_match_dense():
    peft_model = get_peft_model(tiny_bert(layers=3), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                task_type="SEQ_CLS"))
    randomize_lora(peft_model)
    batches = [toy_batch(n=4, seed=s) for s in range(2)]
    # dense reference: dL/dW of the frozen base weights, summed over batches
    peft_model.eval()
    bases = {n: m.base_layer for n, m in peft_model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    for m in bases.values():
        m.weight.requires_grad_(True)
    for b in batches:
        peft_model(**b).loss.backward()
    grads = {n: m.weight.grad.clone() for n, m in bases.items()}
    for m in bases.values():
        m.weight.requires_grad_(False)
        m.weight.grad = None
    exact = gradient_cosines(peft_model, batches, method="exact")
    sketch = gradient_cosines(peft_model, batches, method="sketch", sketch_dim=4096)
    for key, cos in exact.items():
        names = [n for n in grads if n.endswith(key.rsplit(".", 1)[-1])]
        flat = torch.stack([grads[n].flatten() for n in names])
        ref = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
        torch.testing.assert_close(cos, ref, rtol=1e-3, atol=1e-4)
        assert (sketch[key] - ref).abs().max() < 0.15  # JL sketch: unbiased, error ~ 1/sqrt(p)


def test_merge_and_unload_equals_eval_outputs():
    sm = structured()
    batch = toy_batch()
    with torch.no_grad():
        expected = sm(input_ids=batch["input_ids"]).logits
        merged = sm.merge_and_unload()
        got = merged(input_ids=batch["input_ids"]).logits
    assert "Lora" not in "".join(type(m).__name__ for m in merged.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


VANILLA = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForSequenceClassification
    from peft import PeftModel
    base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    assert "structlora" not in sys.modules
    ids = torch.load(sys.argv[3])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[4])
""")


@pytest.mark.parametrize("compress", [None, 2])
def test_exported_adapter_loads_in_vanilla_peft(tmp_path, compress):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert(layers=4).save_pretrained(base_dir)
    sm = structured()
    batch = toy_batch()
    with torch.no_grad():
        expected = sm(input_ids=batch["input_ids"]).logits
    summary = sm.save_pretrained(str(adapter_dir), compress_rank=compress)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == summary["ranks"]
    torch.save(batch["input_ids"], tmp_path / "ids.pt")
    script = tmp_path / "vanilla.py"
    script.write_text(VANILLA)
    proc = subprocess.run([sys.executable, str(script), str(base_dir), str(adapter_dir), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    if compress is None:
        assert summary["max_relative_error"] == 0.0
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        # closed gates (linspace logits) are dropped: fewer directions than (deg+1) r
        full = 2 * (2 * 8 + 2 * 12)  # two families of 4 layers: (deg + 1) r directions per module
        assert sum(summary["ranks"].values()) < full
    else:
        assert max(summary["ranks"].values()) <= 2 and summary["max_relative_error"] > 0


def test_update_diagnostics_on_plain_lora_and_structlora():
    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert update_diagnostics(peft_model)["drift_energy"] == 0.0  # B = 0 at init
    randomize_lora(peft_model)
    d = update_diagnostics(peft_model)
    assert d["drift_energy"] > 0 and -1 <= d["cos_adj"] <= 1
    assert update_diagnostics(torch.nn.Linear(2, 2)) == {}
    sd = update_diagnostics(structured())
    assert {"drift_energy", "cos_adj", "update_norm"} <= set(sd)
    # StructLoRA runs also carry the evidence of both stages
    assert {"eta", "eta_max", "mix_dev", "edges", "similarity_edges", "mean_gate", "closed_directions",
            "uncoord_drift_energy", "uncoord_cos_adj"} <= set(sd)
    assert 0 < sd["eta"] < sd["eta_max"] and sd["mix_dev"] > 0


def test_report_lists_every_module():
    sm = structured()
    report = sm.structlora_report().to_pandas()
    assert len(report) == 8 and set(report["family"].str.rsplit(".", n=1).str[-1]) == {"query", "value"}
    assert (report["kept"] <= report["r"]).all() and (report["kept"] < report["r"]).any()
    _ = frob_inner  # exported name used by notebooks


def test_bias_all_with_a_classification_head_saves_a_state_that_loads_back(tmp_path):
    """bias="all": peft saves a head's bias under its canonical key and as raw wrapper copies; the training
    state loads back (from_pretrained, resume) and gives the same eval outputs."""
    from dist_train import toy_bert

    from structlora import StructLoraConfig, StructLoraModel, get_structlora_model

    torch.manual_seed(0)
    cfg = StructLoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")
    sm = get_structlora_model(toy_bert(lora=False), cfg)
    with torch.no_grad():
        for n, p in sm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))      # trained-looking factors, biases and head
    sm.save_training_state(tmp_path)
    back = StructLoraModel.from_pretrained(toy_bert(lora=False), tmp_path, is_trainable=True)
    batch = {"input_ids": torch.randint(0, 16, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    sm.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, sm(**batch).logits)
