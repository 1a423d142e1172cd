"""The face/detail pass (ADetailer's order of operations, Bing-su/adetailer read for the facts).

After the first pass (and the hires fix), on each final image, for each ``detailer`` entry (tab) in order:

1. detect on the image as it is now (the previous tab's result): ``core.detectors`` (boxes, scores, masks);
2. keep the regions scoring at least ``confidence`` whose box area is between ``mask_min_ratio`` and
   ``mask_max_ratio`` of the image, then (``mask_k_largest``) the k largest, in ADetailer's order (the
   detector's, the k largest by ascending area); an inpainting job (whole picture) keeps only the regions that
   touch its own mask, as ADetailer does;
3. each region's mask (the segmentation mask, else its box filled), shifted by ``x_offset`` / ``y_offset``
   (right / up; pixels shifted out are gone, where ADetailer wraps them round), dilated (``dilate_erode`` > 0)
   or eroded (< 0) by a square of that side, regions left empty dropped, then merged / merged and inverted;
4. region by region, the image is inpainted with that mask by ``core.pipeline.generate`` as an ordinary
   inpainting job: the region's prompt (``[SEP]`` splits one prompt per region, the last one repeating;
   empty = the job's prompt; ``[PROMPT]`` inserts it; ``[SKIP]`` skips the region), ``denoise``,
   ``mask_blur``, "only masked" with ``inpaint_padding`` worked at ``inpaint_width`` x ``inpaint_height``
   (0 = the job's size, as ADetailer's ``p.width``), masked content "original", the job's sampler, schedule
   and model, ``steps`` / ``cfg`` when set, and seed = the image's seed + the region's index (ADetailer's
   default). Each region's result is the next region's image.

LoRAs: a detail prompt without LoRA tags keeps the job's LoRAs merged. One with tags (``<lora:face:0.7>``)
runs its regions with those LoRAs and the job's ``loras`` list, in place of the job prompt's tags, as
ADetailer's prompts do (A1111 activates the LoRAs of each pass's own prompt); ``use_loras`` (the runner's
``core.lora.patch.activate``) merges them for the region, only what changed, and the job's set is merged back
after the pass.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from core.detailer_args import Detailer
from core.detectors import Detection, Detector, load_detector
from core.errors import RequestError
from core.inpaint import to_image, to_tensor
from core.lora.tags import LoraRef, prompt_loras, strip_tags
from core.request import MAX_SEED, GenerationRequest

log = logging.getLogger(__name__)

REGION_LABEL = "(detail pass region)"  # the init_image / mask "path" of a region job: the images are passed in
_SEP = re.compile(r"\s*\[SEP\]\s*")
_SKIP = re.compile(r"^\s*\[SKIP\]\s*$")


# ------------------------------------------------------------------------------------------ masks


def box_area(box: tuple[float, float, float, float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def select(detections: list[Detection], d: Detailer, size: tuple[int, int]) -> list[Detection]:
    """Step 2: the confidence threshold, the area ratios and the k largest."""
    area = size[0] * size[1]
    kept = [x for x in detections if x.score >= d.confidence]
    kept = [x for x in kept if d.mask_min_ratio <= box_area(x.box) / area <= d.mask_max_ratio]
    if d.mask_k_largest and len(kept) > d.mask_k_largest:
        order = sorted(range(len(kept)), key=lambda i: box_area(kept[i].box))  # stable, like argsort's result
        kept = [kept[i] for i in order[-d.mask_k_largest:]]
    return kept


def region_mask(detection: Detection, size: tuple[int, int]) -> Image.Image:
    """The region's ``L`` mask at the image's size: its segmentation mask, else its box filled (corners
    included, as PIL draws a rectangle and ADetailer makes its box masks)."""
    if detection.mask is not None:
        mask = detection.mask.convert("L")
        return mask if mask.size == size else mask.resize(size, Image.Resampling.NEAREST)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(detection.box, fill=255)
    return mask


def shift(mask: torch.Tensor, x: int, y: int) -> torch.Tensor:
    """``mask`` ``[1, 1, H, W]`` moved ``x`` px right and ``y`` px up; what moves out is dropped."""
    if not x and not y:
        return mask
    height, width = mask.shape[-2:]
    out = torch.zeros_like(mask)
    dy = -y
    src_y, dst_y = slice(max(-dy, 0), min(height - dy, height)), slice(max(dy, 0), min(height + dy, height))
    src_x, dst_x = slice(max(-x, 0), min(width - x, width)), slice(max(x, 0), min(width + x, width))
    if src_y.start < src_y.stop and src_x.start < src_x.stop:
        out[..., dst_y, dst_x] = mask[..., src_y, src_x]
    return out


def dilate_erode(mask: torch.Tensor, value: int) -> torch.Tensor:
    """A square structuring element of side ``|value|`` anchored at its centre (OpenCV's default): dilation for
    a positive value, erosion for a negative one (the image's border never erodes)."""
    if value == 0:
        return mask
    size = abs(value)
    before, after = size // 2, size - 1 - size // 2
    if value > 0:
        return F.max_pool2d(F.pad(mask, (before, after, before, after), value=0.0), size, stride=1)
    return -F.max_pool2d(F.pad(-mask, (after, before, after, before), value=-1.0), size, stride=1)


def region_masks(detections: list[Detection], d: Detailer, size: tuple[int, int]) -> list[Image.Image]:
    """Steps 2-3: the binary ``L`` masks (255 = repaint) of the regions to inpaint, in order."""
    masks = []
    for found in select(detections, d, size):
        mask = (to_tensor(region_mask(found, size)) > 0.5).float()
        mask = dilate_erode(shift(mask, d.x_offset, d.y_offset), d.dilate_erode)
        if bool(mask.any()):
            masks.append(mask)
    if masks and d.mask_merge_invert != "none":
        merged = torch.stack(masks).amax(dim=0)
        masks = [1 - merged if d.mask_merge_invert == "merge_and_invert" else merged]
    return [to_image(m) for m in masks]


def inside_job_mask(masks: list[Image.Image], mask_path: str) -> list[Image.Image]:
    """An inpainting job's (whole picture) regions that touch its own mask, as ADetailer keeps them: the pass
    does not repaint what the job was told to keep."""
    from core.masks import binary, load_mask

    job_mask, _ = load_mask(mask_path)
    if masks and job_mask.size != masks[0].size:
        job_mask = binary(job_mask.resize(masks[0].size, Image.Resampling.LANCZOS))
    keep = to_tensor(job_mask) > 0.5
    return [m for m in masks if bool((keep & (to_tensor(m) > 0.5)).any())]


# ------------------------------------------------------------------------------------------ prompts


def region_prompts(text: str, job_prompt: str) -> list[str]:
    """ADetailer's prompt rules: ``[SEP]`` separates the regions' prompts; an empty one is the job's prompt,
    ``[PROMPT]`` inserts the job's prompt."""
    prompts = _SEP.split(text)
    return [job_prompt if not p else p.replace("[PROMPT]", job_prompt) for p in prompts]


def region_request(request: GenerationRequest, d: Detailer, prompt: str, negative: str, seed: int,
                   multiple: int = 8) -> GenerationRequest:
    """The inpainting job of one region (the image and mask are handed to ``generate`` as images); an
    ``inpaint_width`` / ``inpaint_height`` is rounded up to the family's pixel ``multiple`` (Flux: 16). Its
    LoRAs: the region prompts' tags with the job's ``loras`` list, else (no tags) all of the job's."""

    def size(value: int, job: int) -> int:
        return -(-value // multiple) * multiple if value else job

    tags = prompt_loras(prompt, negative)
    return dataclasses.replace(
        request,
        prompt=strip_tags(prompt), negative_prompt=strip_tags(negative),
        loras=(*request.loras, *tags) if tags else request.lora_refs(),
        init_image=REGION_LABEL, mask=REGION_LABEL, denoise=d.denoise, mask_blur=d.mask_blur,
        inpaint_area="only_masked" if d.inpaint_only_masked else "whole", only_masked_padding=d.inpaint_padding,
        masked_content="original", invert_mask=False, outpaint=None, hires=None, refiner=None, detailer=(),
        steps=d.steps or request.steps, cfg=request.cfg if d.cfg is None else d.cfg,
        width=size(d.inpaint_width, request.width), height=size(d.inpaint_height, request.height),
        batch_size=1, batch_count=1, seed=seed,
    )


# ------------------------------------------------------------------------------------------ the pass


def detail_image(
    model: Any, request: GenerationRequest, image: Image.Image, seed: int, *,
    generate: Callable[..., list[tuple[Image.Image, int]]], detector: Callable[[str], Detector] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None, first_step: int = 0,
    use_loras: Callable[[Sequence[LoraRef]], Any] | None = None, **kwargs: Any,
) -> tuple[Image.Image, int]:
    """``image`` (made with ``seed``) after every detail pass of ``request``; (the image, steps run).
    ``generate``: ``core.pipeline.generate``; ``detector(name)``: the detector of a name (default
    ``core.detectors.load_detector`` without a model registry); ``on_step`` gets steps counted on from
    ``first_step``; ``use_loras(refs)`` merges a region's LoRAs when its prompt's tags change them."""
    find = detector or load_detector
    done = 0
    loras = getattr(model, "loras", None)  # the LoRAs merged into the model (core.lora.patch.LoraPatcher)
    try:
        for index, d in enumerate(request.detailer):
            detections = find(d.model)(image, d.confidence)
            masks = region_masks(detections, d, image.size)
            if request.is_inpaint and request.mask and request.inpaint_area == "whole" and request.outpaint is None:
                masks = inside_job_mask(masks, request.mask)
            if not masks:
                log.info("detailer[%d] (%s): nothing detected", index, d.model)
                continue
            log.info("detailer[%d] (%s): %d region%s", index, d.model, len(masks), "" if len(masks) == 1 else "s")
            prompts = region_prompts(d.prompt, request.prompt)
            negatives = region_prompts(d.negative_prompt, request.negative_prompt)
            for j, mask in enumerate(masks):
                prompt, negative = prompts[min(j, len(prompts) - 1)], negatives[min(j, len(negatives) - 1)]
                if _SKIP.match(prompt):
                    continue
                region = region_request(request, d, prompt, negative, (seed + j) % (MAX_SEED + 1),
                                        getattr(getattr(model, "spec", None), "pixel_multiple", 8))
                if loras is not None and region.lora_refs() != loras.requested:
                    if use_loras is None:
                        raise RequestError(f"detailer[{index}].prompt", d.prompt,
                                           "LoRA tags only where the job runs with a model registry to find them")
                    use_loras(region.lora_refs())
                offset = first_step + done

                def step(s: int, total: int, x0: torch.Tensor, offset: int = offset) -> None:
                    if on_step is not None:
                        on_step(offset + s, offset + total, x0)

                image = generate(model, region, init=image, mask=mask, on_step=step, **kwargs)[0][0]
                done += region.steps if region.denoise > 0 else 0
    finally:
        if use_loras is not None and loras is not None and loras.requested != request.lora_refs():
            use_loras(request.lora_refs())  # the job's own set again, for its other images
    return image, done
