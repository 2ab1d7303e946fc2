"""LoRA and full fine-tuning on the engine with a masked attention policy, and the micro VLM's save/load path."""

from __future__ import annotations

import json

import pytest
import torch
from vlm_tiny import images, tiny_llava_onevision, tiny_qwen_vl

from stitchkit.engine import TrainConfig
from stitchkit.vlm import AttentionPolicy, load_vlm
from stitchkit.vlm.finetune import FinetuneConfig, Sample, collate_for, finetune, merge_lora, response_loss, vlm_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def samples() -> list[Sample]:
    ims = images(6)
    return [
        Sample(ims[:2], "how many shapes?", "two"),
        Sample(ims[2:3], "what colour is this?", "red"),
        Sample(ims[3:6], "which shape is in every image?", "star"),
        Sample(ims[1:3], "how many shapes are there in the images?", "three"),
    ]


def masked_loss(vlm, data, policy) -> float:
    vlm.policy = policy
    with torch.no_grad():
        return float(vlm_loss(vlm.model, collate_for(vlm)(data)))


@pytest.mark.parametrize("build", [tiny_llava_onevision, tiny_qwen_vl], ids=["llava_onevision", "qwen2_vl"])
def test_loss_on_kept_logits_equals_the_loss_on_every_position(build):
    vlm = load_vlm(*build())
    batch = collate_for(vlm)(samples())  # responses of different lengths, left-padded rows
    with torch.no_grad():
        full = response_loss(vlm.model(**batch["inputs"]).logits, batch["labels"])
        assert float(vlm_loss(vlm.model, batch)) == pytest.approx(float(full), abs=1e-5)


@pytest.mark.parametrize("build", [tiny_llava_onevision, tiny_qwen_vl], ids=["llava_onevision", "qwen2_vl"])
def test_lora_step_changes_only_adapter_weights_with_the_mask_on(build):
    model, processor = build()
    vlm = load_vlm(model, processor)
    data = samples()
    masked = AttentionPolicy(masked_layers="default")
    expected_first = masked_loss(vlm, data, masked)
    assert abs(expected_first - masked_loss(vlm, data, AttentionPolicy())) > 1e-4  # the mask changes the loss
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    cfg = FinetuneConfig(method="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, policy=masked,
                         train=TrainConfig(steps=2, batch_size=4, lr=1e-2, mixed_precision="no"))  # fmt: skip
    result = finetune(vlm, data, cfg, None)
    # Step 0 sees the whole (4-sample) dataset with the untrained adapters: exactly the masked model's loss.
    assert result.losses[0] == pytest.approx(expected_first, abs=1e-5)

    changed = {name for name, p in vlm.model.named_parameters() if not torch.equal(p, before.get(_base_name(name), p * 0 + 1e9))}
    new = {name for name, _ in vlm.model.named_parameters() if _base_name(name) not in before}
    assert changed and changed <= new  # every parameter that moved is a LoRA / saved-projector parameter
    assert any("lora_B" in name for name in changed)
    assert any("modules_to_save" in name for name in changed)
    for name, p in vlm.model.named_parameters():
        if _base_name(name) in before and "modules_to_save" not in name:
            assert torch.equal(p, before[_base_name(name)]), name

    merge_lora(vlm)
    assert not any("lora" in name for name, _ in vlm.model.named_parameters())
    assert isinstance(vlm.generate(images(2), "how many shapes?", max_new_tokens=2), str)


def test_lora_initialisation_depends_on_the_training_seed_only():
    """LoRA's A matrices come from the global RNG: whatever state the process is in, the same training seed gives
    the same adapters (before, the first arm a process fine-tuned started from an unseeded state)."""
    from stitchkit.vlm.finetune import prepare

    def adapters(noise_seed: int, seed: int = 0) -> dict[str, torch.Tensor]:
        vlm = load_vlm(*tiny_llava_onevision())
        torch.manual_seed(noise_seed)  # the state a process happens to be in
        prepare(vlm, FinetuneConfig(method="lora", lora_r=4, train=TrainConfig(steps=1, batch_size=1, seed=seed)))
        return {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_A" in n}

    first, second = adapters(noise_seed=1), adapters(noise_seed=2)
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    other = adapters(noise_seed=1, seed=1)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_full_finetuning_trains_the_language_model_not_the_vision_tower(tmp_path):
    model, processor = tiny_llava_onevision()
    vlm = load_vlm(model, processor)
    vision_before = {n: p.detach().clone() for n, p in model.model.vision_tower.named_parameters()}
    lm_before = {n: p.detach().clone() for n, p in model.model.language_model.named_parameters()}
    cfg = FinetuneConfig(method="full", policy=AttentionPolicy(masked_layers="all"),
                         train=TrainConfig(steps=2, batch_size=2, lr=1e-2, mixed_precision="no", checkpoint_every=1))  # fmt: skip
    result = finetune(vlm, samples(), cfg, tmp_path / "ft")
    assert len(result.losses) == 2 and (tmp_path / "ft" / "done.json").is_file()
    assert all(torch.equal(p, vision_before[n]) for n, p in model.model.vision_tower.named_parameters())
    assert sum(not torch.equal(p, lm_before[n]) for n, p in model.model.language_model.named_parameters()) > 10


def test_micro_vlm_saves_and_loads_as_a_hugging_face_llava_onevision(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from stitchkit.vlm.micro import MicroVLMRecipe, answer_accuracy, make_samples, micro_model, vocabulary

    recipe = MicroVLMRecipe(vision="random", train=TrainConfig(steps=1, batch_size=2))
    model, processor = micro_model(recipe)
    vlm = load_vlm(model, processor)
    size = processor.image_processor.size["height"]
    data = make_samples(12, 0, size, recipe.data)
    assert min(len(s.images) for s in data) == 1 and max(len(s.images) for s in data) >= 2  # single and multi-image
    batch = vlm.encode([s.images for s in data[:4]], [s.prompt for s in data[:4]], [s.response for s in data[:4]])
    assert (batch.labels != -100).sum() > 0

    tokenizer = processor.tokenizer
    for word in vocabulary():  # every vocabulary word is one token
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    first = [tokenizer(" " + i, add_special_tokens=False)["input_ids"][0] for i in ("ar413", "fl346", "sk943")]
    assert len(set(first)) == 3  # ID strings: their first token is their first letter

    vlm.save_pretrained(tmp_path / "micro")
    config = json.loads((tmp_path / "micro" / "processor_config.json").read_text())
    assert config["processor_class"] == "LlavaOnevisionProcessor" and config["num_image_tokens"] == 16
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "micro").eval()
    AutoTokenizer.from_pretrained(tmp_path / "micro")
    AutoImageProcessor.from_pretrained(tmp_path / "micro")
    again = load_vlm(str(tmp_path / "micro"))
    assert type(again.model) is LlavaOnevisionForConditionalGeneration
    prompts = [s.prompt for s in data[:3]]
    assert again.generate([s.images for s in data[:3]], prompts, 4) == vlm.generate([s.images for s in data[:3]], prompts, 4)
    del reloaded
    result = answer_accuracy(vlm, make_samples(4, 1, size, recipe.data, {"count": 1}))
    assert 0 <= result["accuracy"] <= 1 and result["samples"] == 4


def test_micro_vlm_loads_with_auto_processor_when_torchvision_is_installed(tmp_path):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    from stitchkit.vlm.micro import MicroVLMRecipe, micro_model

    model, processor = micro_model(MicroVLMRecipe(vision="random", train=TrainConfig(steps=1, batch_size=2)))
    load_vlm(model, processor).save_pretrained(tmp_path)
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "LlavaOnevisionProcessor"
