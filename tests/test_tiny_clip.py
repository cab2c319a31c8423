"""The demo teacher: a short contrastive pretraining run learns, and its file loads through open_clip's path."""

from __future__ import annotations

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from dho_pipeline.teacher.open_clip_teacher import register_model_configs
from dho_pipeline.teacher.templates import TEMPLATES
from dho_pipeline.teacher.tiny_clip import (
    MODEL_NAME,
    zero_shot_accuracy,
)


def test_pretrained_file_reloads_with_the_same_zero_shot_accuracy(fmnist, trained_teacher_file):
    source, templates, path = fmnist, TEMPLATES["fashion-mnist"], trained_teacher_file
    assert not list(path.parent.glob("*.tmp"))

    register_model_configs()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    assert tokenizer.context_length == 16
    in_memory = open_clip.create_model(MODEL_NAME)
    in_memory.load_state_dict(torch.load(path, weights_only=True))
    loaded, _, _ = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(path))
    preprocess = open_clip.get_model_preprocess_cfg(loaded)  # what the pipeline normalises with
    assert (preprocess["mean"], preprocess["std"]) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    test = slice(0, 1000)
    images, labels = source.images["test"][test], source.labels["test"][test]
    accuracy = zero_shot_accuracy(loaded, tokenizer, images, labels, source.class_names, templates)
    assert accuracy == zero_shot_accuracy(in_memory, tokenizer, images, labels, source.class_names, templates)
    assert accuracy > 0.5, f"zero-shot accuracy {accuracy:.3f} (about 0.74 measured; chance is 0.1)"
