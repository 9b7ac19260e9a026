"""transformers format: a directory `CLIPVisionModel[WithProjection]` or `SiglipVisionModel` loads offline,
with a `preprocessor_config.json` for `AutoImageProcessor`.

The image processor is CLIPImageProcessor for both tower kinds, because it reproduces our eval transform
(shorter side to image_size with the same interpolation and antialiasing, centre crop); SiglipImageProcessor would
squash non-square images instead. One difference no processor setting removes is written into the model card
(CROP_NOTE).
"""

from __future__ import annotations

from pathlib import Path

from open_clip.transformer import VisionTransformer
from torch import nn

from contrastive.encoders import preprocess_from_config
from contrastive.errors import ConfigError
from contrastive.export.base import EXPORT_FORMATS, Exported
from contrastive.export.hf_towers import clip_vision, siglip2_vision, siglip_vision
from contrastive.models.naflex import is_naflex_tower

# PIL resampling codes, as transformers' image processors store them.
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
CROP_NOTE = (
    "`AutoImageProcessor` loads a CLIPImageProcessor that resizes exactly as our evaluation does (shorter side to "
    "{size}, {interpolation}, antialiased). Its centre crop starts at floor((side - {size}) / 2), where ours "
    "(torchvision's, as open_clip's) starts at that value rounded half to even: where the resized longer side "
    "exceeds {size} by 4k + 3 pixels, the processor's crop sits one pixel further up or left than ours; for "
    "every other excess (square images included) both crops coincide."
)


NAFLEX_NOTE = (
    "`AutoImageProcessor` loads a Siglip2ImageProcessor: it resizes each image, keeping its aspect ratio, to the "
    "largest patch grid within `max_num_patches` (pass another value per call for another sequence length) and "
    "pads to that length, as our NaFlex pipeline does (tests/test_naflex.py compares them)."
)


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ConfigError("--format transformers needs the transformers package: pip install transformers") from error
    return transformers


def build_hf_vision_model(visual: nn.Module) -> nn.Module:
    """The transformers vision model holding exactly `visual`'s function (eval mode, fp32)."""
    transformers = _transformers()
    if isinstance(visual, VisionTransformer):
        config_kwargs, weights = clip_vision(visual)
        with_projection = "projection_dim" in config_kwargs
        model_class = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
        config = transformers.CLIPVisionConfig(**config_kwargs)
    elif is_naflex_tower(visual):
        config_kwargs, weights = siglip2_vision(visual)
        model_class, config = transformers.Siglip2VisionModel, transformers.Siglip2VisionConfig(**config_kwargs)
    elif hasattr(visual, "trunk"):
        config_kwargs, weights = siglip_vision(visual)
        model_class, config = transformers.SiglipVisionModel, transformers.SiglipVisionConfig(**config_kwargs)
    else:
        raise ConfigError(f"the {type(visual).__name__} image tower has no transformers counterpart; "
                         f"use --format open_clip or --format bundle")
    model = model_class(config)
    # The in-memory prefix of the vision transformer differs between transformers versions ("vision_model." or "").
    anchor = "embeddings.patch_embedding.weight"
    prefix = next(key[: -len(anchor)] for key in model.state_dict() if key.endswith(anchor))
    named = {(name if name.startswith("visual_projection.") else prefix + name): value
             for name, value in weights.items()}
    model.load_state_dict(named, strict=True)
    return model.eval()


def save_image_processor(model: nn.Module, out: Path) -> None:
    transformers = _transformers()
    preprocess = preprocess_from_config(model.cfg)
    if preprocess.patch_size is not None:  # NaFlex: Siglip2ImageProcessor's resize to a grid is ours
        side = preprocess.image_size // preprocess.patch_size
        transformers.Siglip2ImageProcessor(
            patch_size=preprocess.patch_size, max_num_patches=side * side,
            resample=_PIL_RESAMPLE[preprocess.interpolation], do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=preprocess.mean, image_std=preprocess.std, do_convert_rgb=True,
        ).save_pretrained(out)
        return
    processor = transformers.CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": preprocess.image_size},
        resample=_PIL_RESAMPLE[preprocess.interpolation],
        do_center_crop=True,
        crop_size={"height": preprocess.image_size, "width": preprocess.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=preprocess.mean,
        image_std=preprocess.std,
        do_convert_rgb=True,
    )
    processor.save_pretrained(out)


@EXPORT_FORMATS.register("transformers")
def export_transformers(model: nn.Module, out: Path) -> Exported:
    hf_model = build_hf_vision_model(model.visual)
    hf_model.save_pretrained(out)
    save_image_processor(model, out)
    preprocess = preprocess_from_config(model.cfg)
    class_name = type(hf_model).__name__
    return Exported(
        format="transformers",
        architecture=f"transformers `{class_name}` ({hf_model.config.model_type}), "
                     f"{hf_model.config.num_hidden_layers} layers, width {hf_model.config.hidden_size}",
        usage=(f"from transformers import AutoImageProcessor, {class_name}\n"
               f"model = {class_name}.from_pretrained(EXPORT_DIR)\n"
               f"processor = AutoImageProcessor.from_pretrained(EXPORT_DIR)\n"
               f"outputs = model(**processor(images=images, return_tensors='pt'), output_hidden_states=True)\n"
               f"patch_tokens = outputs.hidden_states[-2]{'[:, 1:]' if 'CLIP' in class_name else ''}"
               f"  # LLaVA's choice"),
        preprocessing_note=(NAFLEX_NOTE if preprocess.patch_size is not None else
                            CROP_NOTE.format(size=preprocess.image_size, interpolation=preprocess.interpolation)),
    )
