"""Run a Qwen-VL on pair records with the evaluation protocol and write a predictions JSONL
(``differad-rl predict``; docs/method.md §8).

Every model gets the same prompt: the protocol's instruction (the first of
:data:`differad_rl.prompts.INSTRUCTIONS`) with the reference image first and the target second;
only the format hint changes — ``prompt="reasoning"`` (the method's system prompt and
``<think>…</think><answer>…</answer>``, what a DifferAD-trained checkpoint writes) or
``prompt="qwen"`` (a stock Qwen-VL: ``(x1,y1),(x2,y2)``, the chat template's default system prompt).

Generation is Hugging Face ``model.generate``, batched with LEFT padding (forced and checked by
:mod:`differad_rl.integrations.qwen_vl.loading`), greedy by default (``temperature=0``) or sampled with
``temperature`` / ``top_p`` (no top-k, no repetition penalty: the same decoding for every model),
bf16 weights on a GPU. One line per pair::

    {"id": "brick/scratch/003", "output": "<think>…</think><answer>(12,40),(88,95)</answer>",
     "model": "/abs/path/checkpoint", "family": "qwen2_5_vl", "space": "qwen2_5_vl",
     "image_size": [900, 700],        # the target image as stored (width, height)
     "input_size": [896, 700],        # the target as the processor resized it: image_grid_thw × patch size
     "settings": {"prompt": "reasoning", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 256,
                  "min_pixels": 3136, "max_pixels": 12845056}}

``differad-rl eval`` converts Qwen2.5-VL boxes back with ``input_size`` (nothing to guess).

**Resumable.** Ids already in ``out`` are skipped; lines are appended batch by batch, each batch
flushed and fsync'ed, so an interrupted run loses at most the batch in flight. A last line without
its newline (a crash mid-write) is detected and dropped before appending. An ``out`` written by
another model, family or with other settings is refused.

**Bad input** raises one ``ValueError`` naming the thing before anything is written: an unknown
family, a folder without a processor, missing images, a target image whose size disagrees with
its record, a split with no records, an ``out`` from another run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from differad_rl import prompts as _prompts
from differad_rl.data.records import PairRecord, load_pairs
from differad_rl.eval.protocol import select_split

__all__ = [
    "PROMPTS",
    "PredictConfig",
    "PredictResult",
    "check_images",
    "generate_predictions",
    "predict",
    "predict_records",
    "protocol_messages",
    "read_existing",
]

#: Prompt formats: the format hint of :data:`differad_rl.prompts.FORMAT_HINTS` each one uses.
PROMPTS: dict[str, str] = {"reasoning": "reasoning", "qwen": "qwen"}


@dataclass(frozen=True)
class PredictConfig:
    """Decoding and prompt options (defaults: the protocol's greedy decoding).

    Attributes:
        batch_size: pairs per ``generate`` call (≥ 1).
        max_new_tokens: generation length cap (≥ 1).
        temperature: 0 = greedy; > 0 samples.
        top_p: nucleus mass when sampling, in (0, 1].
        seed: seeds sampling (torch's generator, once per run).
        prompt: ``"reasoning"`` (DifferAD-style checkpoints) or ``"qwen"`` (stock models).
    """

    batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    prompt: str = "reasoning"

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 1")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if not float(self.temperature) >= 0.0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.prompt not in PROMPTS:
            raise ValueError(f"--prompt {self.prompt!r}: expected one of {tuple(PROMPTS)}")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0

    def settings(self) -> dict[str, Any]:
        """What a predictions line records (and a resumed run must repeat)."""
        return {
            "prompt": self.prompt,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p) if not self.greedy else 1.0,
            "max_new_tokens": int(self.max_new_tokens),
        }


@dataclass
class PredictResult:
    """What one run did: ``written`` new lines, ``skipped`` ids already in ``out``, of ``total`` pairs."""

    out: Path
    model: str
    family: str
    written: int
    skipped: int
    total: int
    dropped_torn_line: bool = False
    lines: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------- prompt
def protocol_messages(prompt: str = "reasoning") -> list[dict[str, Any]]:
    """The chat messages of the evaluation protocol: [system,] user ``[image, image, instruction]``.

    The instruction is the same for every model (``build_prompt(hint, rng=None)``); reference image
    first, target second. ``"reasoning"`` adds the method's system prompt; ``"qwen"`` leaves the
    chat template's default.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt={prompt!r}: expected one of {tuple(PROMPTS)}")
    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "image"},
                    {"type": "text", "text": _prompts.build_prompt(PROMPTS[prompt], rng=None)}],
    }
    if prompt == "reasoning":
        return [{"role": "system", "content": [{"type": "text", "text": _prompts.SYSTEM_PROMPT}]}, user]
    return [user]


# ------------------------------------------------------------------------------- input checks
def check_images(records: Sequence[PairRecord], *, source: str = "pairs") -> None:
    """Every reference and target file exists and each target is ``width × height`` (headers only).

    Raises:
        ValueError: naming the first few offending ids, the file and the count.
    """
    from PIL import Image

    missing: list[str] = []
    wrong: list[str] = []
    for r in records:
        for role, path in (("reference", r.reference), ("target", r.target)):
            if not os.path.isfile(path):
                missing.append(f"{r.id!r} ({role} {path})")
        if os.path.isfile(r.target):
            try:
                with Image.open(r.target) as im:
                    size = im.size
            except OSError as exc:
                missing.append(f"{r.id!r} (target {r.target} unreadable: {exc})")
                continue
            if tuple(size) != (r.width, r.height):
                wrong.append(f"{r.id!r} (target is {size[0]}x{size[1]}, record says {r.width}x{r.height})")
    if missing:
        more = f" … ({len(missing)} in all)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing images: {'; '.join(missing[:3])}{more}")
    if wrong:
        more = f" … ({len(wrong)} in all)" if len(wrong) > 3 else ""
        raise ValueError(f"{source}: target size differs from the record: {'; '.join(wrong[:3])}{more}")


# ------------------------------------------------------------------------------- resume
@dataclass
class _Existing:
    ids: set[str]
    header: dict[str, Any] | None  # model / family / settings of the first line
    keep_bytes: int | None  # truncate to this length before appending (a torn last line), else None


def read_existing(out: str | os.PathLike[str]) -> _Existing:
    """Ids already predicted in ``out`` and the run they came from; a torn last line is reported in
    ``keep_bytes`` (nothing is modified here).

    Raises:
        ValueError: ``out`` is a folder, or a complete line is not a predictions object.
    """
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"--out {p}: is a folder; give the predictions JSONL file to write")
    if not p.exists():
        return _Existing(set(), None, None)
    data = p.read_bytes()
    keep: int | None = None
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1  # drop the torn last line (0 = the whole file)
        data = data[:keep]
    ids: set[str] = set()
    header: dict[str, Any] | None = None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            raise ValueError(f"--out {p}:{lineno}: not a JSON line; not a predictions file of differad-rl predict") from None
        if not isinstance(obj, dict) or "id" not in obj or "output" not in obj:
            raise ValueError(f"--out {p}:{lineno}: not a differad-rl predict line (needs 'id' and 'output')")
        run = {k: obj.get(k) for k in ("model", "family", "settings")}
        if header is None:
            header = run
        elif run != header:
            raise ValueError(f"--out {p}:{lineno}: lines from different runs in one file ({run} vs {header})")
        ids.add(str(obj["id"]))
    return _Existing(ids, header, keep)


def _check_same_run(out: Path, header: dict[str, Any] | None, run: dict[str, Any]) -> None:
    """Refuse to append to an ``out`` whose lines came from another model, family or settings
    (only the keys and settings present in ``run`` are compared)."""
    if header is None:
        return
    for key, want in run.items():
        have = header.get(key)
        if key == "settings":
            have = have if isinstance(have, dict) else {}
            for k, v in want.items():
                if have.get(k) != v:
                    raise ValueError(
                        f"--out {out}: written with {k}={have.get(k)!r}, this run has {k}={v!r}; "
                        "choose another --out (or delete it) to start over"
                    )
        elif have != want:
            what = "another model" if key == "model" else f"another {key}"
            raise ValueError(
                f"--out {out}: written by {what} ({key}={have!r}; this run: {want!r}); "
                "choose another --out (or delete it) to start over"
            )


# ------------------------------------------------------------------------------- generation
def _open_rgb(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def generate_predictions(
    model: Any,
    processor: Any,
    records: Sequence[PairRecord],
    config: PredictConfig | None = None,
    *,
    model_name: str = "",
    family: str | None = None,
) -> list[dict[str, Any]]:
    """Generate one predictions line per record (one batch; nothing written).

    Returns the line dictionaries of the module docstring, in record order. The processor is
    called with ``padding_side="left"``; ``input_size`` is the target's ``image_grid_thw`` × the
    image processor's patch size.
    """
    import torch
    from transformers import GenerationConfig

    from differad_rl.integrations.qwen_vl.loading import check_left_padding, model_family, pixel_budget

    cfg = config if config is not None else PredictConfig()
    if not records:
        return []
    check_left_padding(processor)
    fam = family or model_family(model)
    tok = processor.tokenizer
    text = processor.apply_chat_template(protocol_messages(cfg.prompt), tokenize=False, add_generation_prompt=True)
    images: list[Any] = []
    for r in records:
        images += [_open_rgb(r.reference), _open_rgb(r.target)]
    inputs = processor(text=[text] * len(records), images=images, return_tensors="pt", padding=True,
                       padding_side="left")
    patch = int(processor.image_processor.patch_size)
    grid = inputs["image_grid_thw"].tolist()
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    # Every field that changes decoding is set, so a checkpoint's generation_config.json (e.g. the
    # hub's repetition_penalty / top_k) cannot make two models' protocols differ.
    sampling = {"temperature": float(cfg.temperature), "top_p": float(cfg.top_p), "top_k": 0} if not cfg.greedy else {}
    gen = GenerationConfig(
        max_new_tokens=int(cfg.max_new_tokens),
        do_sample=not cfg.greedy,
        num_beams=1,
        repetition_penalty=1.0,
        pad_token_id=tok.pad_token_id,
        **sampling,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=gen)
    finally:
        model.train(was_training)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    lo, hi = pixel_budget(processor)
    settings = {**cfg.settings(), "min_pixels": lo, "max_pixels": hi}
    lines = []
    for i, (r, t) in enumerate(zip(records, texts, strict=True)):
        _, gh, gw = grid[2 * i + 1]  # rows: reference 0, target 0, reference 1, target 1, …
        lines.append({
            "id": r.id,
            "output": t,
            "model": model_name,
            "family": fam,
            "space": fam,
            "image_size": [int(images[2 * i + 1].width), int(images[2 * i + 1].height)],
            "input_size": [int(gw) * patch, int(gh) * patch],
            "settings": settings,
        })
    return lines


def predict_records(
    model: Any,
    processor: Any,
    records: Sequence[PairRecord],
    out: str | os.PathLike[str],
    *,
    model_name: str,
    config: PredictConfig | None = None,
    progress: bool = True,
    keep_lines: bool = False,
) -> PredictResult:
    """Predict the records not yet in ``out`` with an already loaded model and append them.

    Checks before writing anything: the images (:func:`check_images`), that ``out`` came from this
    model / family / settings (:func:`read_existing`). Each batch is appended, flushed and fsync'ed.

    Args:
        model, processor: e.g. from :func:`differad_rl.integrations.qwen_vl.loading.load_model_and_processor`.
        records: pair records (already split-selected).
        out: the predictions JSONL (created with its parent folders).
        model_name: recorded in every line and compared on resume.
        config: decoding / prompt options.
        progress: show a tqdm progress bar.
        keep_lines: also return the new lines in :attr:`PredictResult.lines`.
    """
    import torch
    from tqdm.auto import tqdm

    from differad_rl.integrations.qwen_vl.loading import check_left_padding, model_family, pixel_budget

    cfg = config if config is not None else PredictConfig()
    out_path = Path(out)
    check_left_padding(processor)
    family = model_family(model)
    ids = [r.id for r in records]
    dup = [k for k, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValueError(f"pairs: duplicate ids {dup[:3]} ({len(dup)} in all)")
    existing = read_existing(out_path)
    lo, hi = pixel_budget(processor)
    run = {"model": model_name, "family": family, "settings": {**cfg.settings(), "min_pixels": lo, "max_pixels": hi}}
    _check_same_run(out_path, existing.header, run)
    todo = [r for r in records if r.id not in existing.ids]
    check_images(todo)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    if existing.keep_bytes is not None:
        os.truncate(out_path, existing.keep_bytes)
    torch.manual_seed(int(cfg.seed))
    written = 0
    kept: list[dict[str, Any]] = []
    with open(out_path, "ab") as fh, tqdm(total=len(todo), desc="predict", unit="pair", disable=not progress) as bar:
        for start in range(0, len(todo), int(cfg.batch_size)):
            batch = todo[start:start + int(cfg.batch_size)]
            lines = generate_predictions(model, processor, batch, cfg, model_name=model_name, family=family)
            fh.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            written += len(lines)
            if keep_lines:
                kept += lines
            bar.update(len(lines))
    return PredictResult(out=out_path, model=model_name, family=family, written=written,
                         skipped=len(records) - len(todo), total=len(records),
                         dropped_torn_line=existing.keep_bytes is not None, lines=kept)


def predict(
    model: str | os.PathLike[str],
    pairs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str | None = None,
    config: PredictConfig | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
    progress: bool = True,
) -> PredictResult:
    """Load ``model`` (hub id, checkpoint folder, tiny folder or ``tiny[:<family>]``) and predict the
    pairs of ``pairs`` (optionally one ``split``) into ``out``; see :func:`predict_records`.

    Args:
        device: ``"cuda"``, ``"cpu"``, … (default: CUDA when available).
        dtype: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"bfloat16"`` or ``"float32"``.
        min_pixels, max_pixels: the image processor's pixel budget (default: the processor's own).

    Raises:
        ValueError / FileNotFoundError: bad input (see the module docstring), before anything is written.
        ImportError: the model's processor needs torchvision and is not a Qwen-VL family the image-only
            fallback covers (see :func:`~differad_rl.integrations.qwen_vl.loading.load_processor`).
    """
    import torch

    from differad_rl.integrations.qwen_vl.loading import load_model_and_processor, model_family, model_name, resolve_model

    cfg = config if config is not None else PredictConfig()
    if dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"--dtype {dtype!r}: expected auto, bfloat16 or float32")
    records = select_split(load_pairs(pairs), split, source=str(pairs))
    out_path = Path(out)
    existing = read_existing(out_path)
    todo = [r for r in records if r.id not in existing.ids]
    check_images(todo, source=str(pairs))
    name = model_name(model)
    path = resolve_model(model, cache_dir=cache_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    family = model_family(path)
    _check_same_run(out_path, existing.header, {"model": name, "family": family, "settings": cfg.settings()})
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = dtype == "bfloat16" or (dtype == "auto" and str(dev).startswith("cuda"))
    net, processor = load_model_and_processor(path, min_pixels=min_pixels, max_pixels=max_pixels, bf16=bf16,
                                              training=False, attn_implementation=attn_implementation, device=dev)
    return predict_records(net, processor, records, out_path, model_name=name, config=cfg, progress=progress)
