"""LoRA through peft: a LoRA student trains only its adapters and is saved merged (= base + adapter)
and as an adapter; its checkpoints hold the adapter only, resume and export; a teacher (or student)
given as an adapter on a base model is merged in at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_config_dict
from dist_worker import truncate
from minillm.config import config_from_dict
from minillm.errors import UserError
from minillm.trainer import train
from test_resume import weights

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["c_attn"]}


def lora_config(task: dict[str, Path], out: Path, **train_over: Any) -> dict[str, Any]:
    d = tiny_config_dict(task, out, "minillm", student={"lora": dict(LORA)},
                         train={"batch_size": 2, "grad_accum": 2, "max_steps": 3, "save_every": 2, "eval_every": 3, **train_over},
                         minillm={"rollouts_per_step": 8, "ppo_epochs": 2})
    d["data"]["pretrain"] = str(task["pretrain"])
    return d


@pytest.fixture(scope="module")
def lora_run(tiny_task: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(config_from_dict(lora_config(tiny_task, tmp_path_factory.mktemp("lora") / "run")))


def test_only_the_adapters_train(lora_run: Path, tiny_task: dict[str, Path]) -> None:
    base, merged = weights(tiny_task["student"]), weights(lora_run / "final")
    assert merged.keys() == base.keys()  # a plain GPT-2 folder, no peft names
    adapted = {k for k in base if ".attn.c_attn.weight" in k}
    assert adapted
    for k in base:
        if k in adapted:
            assert not torch.equal(merged[k], base[k]), k  # B left 0: training moved the adapter
        else:
            torch.testing.assert_close(merged[k], base[k], rtol=0, atol=0)  # every base weight frozen
    adapter = weights(lora_run / "final" / "adapter")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert json.loads((lora_run / "final" / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_merged_export_equals_base_plus_adapter(lora_run: Path, tiny_task: dict[str, Path]) -> None:
    """final/ = W + (alpha / r) B A, in float64 by hand (GPT-2's Conv1D stores W as (in, out)), and
    = peft's own merge of final/adapter onto the base; the merged model computes what base + adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, merged, adapter = weights(tiny_task["student"]), weights(lora_run / "final"), weights(lora_run / "final" / "adapter")
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    a, b = adapter[f"{prefix}.lora_A.weight"].double(), adapter[f"{prefix}.lora_B.weight"].double()
    w = base["transformer.h.0.attn.c_attn.weight"].double() + (LORA["alpha"] / LORA["r"]) * (b @ a).T
    torch.testing.assert_close(merged["transformer.h.0.attn.c_attn.weight"].double(), w, rtol=1e-6, atol=1e-7)

    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_task["student"]), lora_run / "final" / "adapter")
    ids = torch.randint(3, 50, (2, 12))
    with torch.no_grad():
        expect = with_adapter(input_ids=ids).logits
        theirs = with_adapter.merge_and_unload().state_dict()
        got = AutoModelForCausalLM.from_pretrained(lora_run / "final")(input_ids=ids).logits
    for k, v in merged.items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_checkpoints_hold_the_adapter_resume_and_export(lora_run: Path, tiny_task: dict[str, Path], tmp_path: Path) -> None:
    from minillm.export import export

    ckpt = lora_run / "checkpoints" / "step_00000002" / "model"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["adapter_model.safetensors"]  # the base is not copied
    out = tmp_path / "resumed"
    truncate(lora_run, out, 2)
    train(config_from_dict(lora_config(tiny_task, out)))
    ref, got = weights(lora_run / "final"), weights(out / "final")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7)
    exported = export(lora_run, tmp_path / "hf")  # the step-3 checkpoint
    for k, v in weights(exported).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    assert (exported / "adapter" / "adapter_config.json").is_file()


def test_teacher_given_as_an_adapter_is_merged(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from minillm.models import load_models

    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_task["teacher"]), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    torch.manual_seed(0)
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: B is no longer 0
    tuned.save_pretrained(tmp_path / "adapter")
    cfg = config_from_dict(tiny_config_dict(tiny_task, tmp_path / "run", "kd", teacher={"adapter": str(tmp_path / "adapter")}))
    teacher = load_models(cfg, need_teacher=True).teacher
    expect = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_task["teacher"]), tmp_path / "adapter").merge_and_unload()
    assert type(teacher).__name__ == "GPT2LMHeadModel" and not any(p.requires_grad for p in teacher.parameters())
    base = weights(tiny_task["teacher"])
    changed = 0
    for k, v in expect.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[k], v, rtol=0, atol=0)
        changed += k in base and not torch.equal(v, base[k])
    assert changed == 4  # c_attn and c_fc of both layers


def test_lora_mistakes_are_user_errors(tiny_task: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="teacher.lora.r: the teacher is frozen"):
        config_from_dict(tiny_config_dict(tiny_task, tmp_path / "a", "kd", teacher={"lora": {"r": 4}})).validate_for_training()
    with pytest.raises(UserError, match=r"teacher.adapter: .* holds no adapter_config.json"):
        from minillm.models import load_models

        load_models(config_from_dict(tiny_config_dict(tiny_task, tmp_path / "b", "kd", teacher={"adapter": str(tmp_path)})), True)
    with pytest.raises(UserError, match="student.lora.target_modules"):
        train(config_from_dict(tiny_config_dict(tiny_task, tmp_path / "c", "sft", student={"lora": {"r": 2, "target_modules": ["nope"]}})))
