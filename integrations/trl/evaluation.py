"""Protocol metrics while training: held-out mIoU, Acc@τ and F1@τ of greedy generations (docs/method.md §8).

:class:`~differad_rl.integrations.trl.trainer.DifferADGRPOTrainer` calls :class:`ProtocolEvaluation`
from its ``evaluate`` / ``evaluation_loop`` hooks, so the numbers appear wherever TRL's eval metrics do
(``eval_strategy="steps"`` every ``eval_steps``, a manual ``trainer.evaluate()``, ``metric_for_best_model``)::

    eval_differad/miou  eval_differad/acc@0.3  eval_differad/f1@0.3  eval_differad/precision@0.3
    eval_differad/recall@0.3  eval_differad/invalid_rate  eval_differad/n
    eval_differad/anomalous/{miou,acc@0.3,invalid_rate}  eval_differad/normal/{miou,acc@0.3,invalid_rate}

(``eval_<name>_differad/…`` for a dict of eval datasets; a value whose denominator is 0 — e.g. F1 when
every target is normal and answered by the zero box — is NaN in the protocol and left out of the log).

**What is measured.** The eval dataset's rows are turned back into pair records
(:func:`records_from_rows`): ``id``, ``boxes`` (else ``solution``), ``image_size``, ``category`` and the
two image FILES of ``images`` (reference first). Rows made by
:func:`~differad_rl.integrations.trl.dataset.to_trl_dataset` or ``pairs_to_rows(..., load_images=False)``
have them; rows holding in-memory PIL images do not and are refused at start-up. The records are then
run through exactly what ``differad-rl predict`` + ``differad-rl eval`` do:
:func:`differad_rl.integrations.qwen_vl.predict.generate_predictions` (the protocol's prompt — the same
instruction for every row, not the row's drawn training instruction — left padding, greedy, batches of
``protocol_eval_batch_size``, ``protocol_eval_max_new_tokens`` tokens) and
:func:`differad_rl.eval.protocol.evaluate_records` on the lines read back by ``read_predictions``
(``EvalConfig(reasoning=True)`` for the ``"reasoning"`` prompt: the ``<answer>`` tag is required). So the
logged values equal a separate predict + eval of the same weights (tested).

**Several processes.** Each rank generates its contiguous shard of the records; the prediction lines
(small dicts) are gathered to every rank with ``accelerate.utils.gather_object`` and every rank scores
the whole set — identical metrics everywhere (``metric_for_best_model`` is read on every rank), equal to
one process. Generation runs inside TRL's ``unwrap_model_for_generation`` (DeepSpeed ZeRO-3 weights are
gathered; ZeRO-3 without ``ds3_gather_for_generation`` and FSDP are refused at start-up, since their
per-forward collectives would hang on shards of unequal length).

**TRL's own eval path** is unchanged and runs first: GRPOTrainer's ``evaluate`` samples
``num_generations_eval`` completions per prompt and logs ``eval_loss`` / ``eval_reward`` / … on the
same rows; the protocol metrics are added to the same log entry.

``protocol_eval`` (config): ``None`` (default) = on when the eval dataset has the pair columns
(``id``, ``image_size``, ``images`` and ``boxes`` or ``solution``), else off; ``True`` = required (a
dataset that cannot give pair records raises ``ValueError`` when the trainer is built, naming the row
and the field); ``False`` = off.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from differad_rl.data.records import PairRecord
from differad_rl.eval.protocol import EvalConfig, EvalResult, evaluate_records, read_predictions

__all__ = [
    "PAIR_COLUMNS",
    "PROTOCOL_PREFIX",
    "ProtocolEvaluation",
    "has_pair_columns",
    "protocol_log_metrics",
    "records_from_rows",
    "score_lines",
]

#: Prefix of the logged protocol metrics (after TRL's ``eval_``).
PROTOCOL_PREFIX = "differad/"

#: Columns an eval row needs for the protocol (``boxes`` or ``solution`` for the ground truth).
PAIR_COLUMNS: tuple[str, ...] = ("id", "image_size", "images")


# ------------------------------------------------------------------------------- rows → records
def _column_names(dataset: Any) -> list[str] | None:
    """Column names of a ``datasets.Dataset`` / list of dicts; None when they cannot be read
    without consuming the data (an ``IterableDataset`` without features)."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        first = dataset[0] if len(dataset) else {}
        return list(first) if isinstance(first, Mapping) else []
    return None


def has_pair_columns(dataset: Any) -> bool:
    """True when ``dataset`` has :data:`PAIR_COLUMNS` and ``boxes`` or ``solution``."""
    names = _column_names(dataset)
    if not names:
        return False
    return all(c in names for c in PAIR_COLUMNS) and ("boxes" in names or "solution" in names)


def _undecoded(dataset: Any) -> Any:
    """A ``datasets.Dataset`` with image decoding switched off (paths instead of PIL images)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - trl depends on datasets
        return dataset
    if not isinstance(dataset, datasets.Dataset) or "images" not in dataset.features:
        return dataset
    feat = dataset.features["images"]
    inner = getattr(feat, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        was_disabled = are_progress_bars_disabled()
        disable_progress_bars()
        try:
            return dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
        finally:
            if not was_disabled:
                enable_progress_bars()
    return dataset


def _image_path(img: Any) -> str | None:
    """The file of one ``images`` entry: a path, ``datasets``' ``{"path", "bytes"}``, or a PIL image
    opened from a file (``.filename``); None for in-memory images."""
    if isinstance(img, (str, os.PathLike)):
        return os.fspath(img)
    if isinstance(img, Mapping):
        path = img.get("path")
        return str(path) if path and os.path.isfile(str(path)) else None
    name = getattr(img, "filename", None)
    return str(name) if isinstance(name, str) and name else None


def records_from_rows(rows: Any, *, source: str = "eval_dataset") -> list[PairRecord]:
    """Pair records from TRL rows (:func:`~differad_rl.integrations.trl.dataset.pairs_to_rows` format).

    ``boxes`` (every box; ``[]`` normal) is the ground truth, else ``solution`` (``[0, 0, 0, 0]`` =
    normal); ``image_size`` gives width/height; ``images`` must be ``[reference, target]`` FILES;
    ``category`` defaults to ``"all"``. The images are checked like ``differad-rl predict`` does
    (exist, target size = ``image_size``).

    Raises:
        ValueError: naming ``source``, the row and the field — a missing column, in-memory images,
            a duplicate id, a malformed box, a missing image file.
    """
    from differad_rl.integrations.qwen_vl.predict import check_images

    names = _column_names(rows)
    if names is None:
        raise ValueError(
            f"{source}: an IterableDataset has no listable rows; protocol evaluation (protocol_eval) needs a "
            "map-style datasets.Dataset or a list of rows (to_trl_dataset(pairs)); or set protocol_eval=False"
        )
    for col in PAIR_COLUMNS:
        if col not in names:
            raise ValueError(
                f"{source}: no {col!r} column (columns: {sorted(names)}); protocol evaluation (protocol_eval) "
                "needs the rows of to_trl_dataset(pairs) — id, boxes/solution, image_size, images — "
                "or set protocol_eval=False"
            )
    if "boxes" not in names and "solution" not in names:
        raise ValueError(f"{source}: neither a 'boxes' nor a 'solution' column; protocol_eval needs the ground truth")
    records: list[PairRecord] = []
    seen: set[str] = set()
    for i, row in enumerate(_undecoded(rows)):
        rid = row.get("id")
        where = f"{source} row {rid!r}" if rid not in (None, "") else f"{source} row #{i}"
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"{where}: field 'id' must be a non-empty string, got {rid!r}")
        if rid in seen:
            raise ValueError(f"{where}: duplicate id; protocol metrics need one row per pair")
        seen.add(rid)
        size = row.get("image_size")
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"{where}: field 'image_size' must be [width, height], got {size!r}")
        images = row.get("images")
        if not isinstance(images, (list, tuple)) or len(images) != 2:
            n = 0 if images is None else len(images) if hasattr(images, "__len__") else "?"
            raise ValueError(f"{where}: field 'images' must be [reference, target], got {n} image(s)")
        paths = [_image_path(img) for img in images]
        if None in paths:
            raise ValueError(
                f"{where}: field 'images' holds in-memory images, not files; protocol evaluation "
                "(protocol_eval) reads the image files like differad-rl predict — build the eval dataset with "
                "to_trl_dataset(pairs) or pairs_to_rows(pairs, load_images=False), or set protocol_eval=False"
            )
        boxes = row.get("boxes")
        if boxes is None:
            sol = row.get("solution")
            if sol is None:
                raise ValueError(f"{where}: no 'boxes' nor 'solution' (use [0, 0, 0, 0] for a normal target)")
            boxes = [list(sol)] if any(float(c) != 0.0 for c in sol) else []
        category = row.get("category") or "all"
        try:
            records.append(PairRecord(id=rid, reference=paths[0], target=paths[1], boxes=[list(b) for b in boxes],
                                      width=size[0], height=size[1], category=str(category), split="eval"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not records:
        raise ValueError(f"{source}: no rows; protocol evaluation needs at least one pair (or protocol_eval=False)")
    check_images(records, source=source)
    return records


# ------------------------------------------------------------------------------- metrics → log
def _tau(t: float) -> str:
    return f"{t:g}"


def protocol_log_metrics(result: EvalResult | Mapping[str, Any], prefix: str = PROTOCOL_PREFIX) -> dict[str, float]:
    """Flat log entries of an :class:`EvalResult` (or its ``metrics`` dict); NaN values are left out.

    Keys (τ = the result's ``iou_threshold``, written ``0.3``): ``miou``, ``acc@τ``, ``f1@τ``,
    ``precision@τ``, ``recall@τ``, ``invalid_rate``, ``n``, and ``anomalous/…`` / ``normal/…`` with
    ``miou``, ``acc@τ``, ``invalid_rate`` — each after ``prefix``.
    """
    metrics = result.metrics if isinstance(result, EvalResult) else result
    t = _tau(float(metrics["iou_threshold"]))
    overall = metrics["overall"]
    out: dict[str, float] = {
        "miou": overall["miou"],
        f"acc@{t}": overall["acc"],
        f"f1@{t}": overall["f1"],
        f"precision@{t}": overall["precision"],
        f"recall@{t}": overall["recall"],
        "invalid_rate": overall["invalid_rate"],
        "n": overall["n"],
    }
    for kind in ("anomalous", "normal"):
        part = metrics[kind]
        out[f"{kind}/miou"] = part["miou"]
        out[f"{kind}/acc@{t}"] = part["acc"]
        out[f"{kind}/invalid_rate"] = part["invalid_rate"]
    return {prefix + k: float(v) for k, v in out.items() if v is not None and not math.isnan(float(v))}


# ------------------------------------------------------------------------------- the trainer side
class ProtocolEvaluation:
    """The trainer's protocol evaluator (built by :meth:`from_trainer`, used by the trainer's hooks).

    Records are derived and checked once per eval dataset (at start-up for ``trainer.eval_dataset``);
    :attr:`last_lines` / :attr:`last_result` keep the latest evaluation's gathered prediction lines and
    :class:`EvalResult` (e.g. for a callback that saves them).
    """

    def __init__(self, enabled: bool, required: bool, predict_config: Any, eval_config: EvalConfig,
                 family: str | None) -> None:
        self.enabled = enabled
        self.required = required
        self.predict_config = predict_config
        self.eval_config = eval_config
        self.family = family
        self._records: dict[int, list[PairRecord] | None] = {}
        self._target: Any = None
        self.last_lines: list[dict[str, Any]] = []
        self.last_result: EvalResult | None = None

    # ---------------------------------------------------------------- set-up
    @classmethod
    def from_trainer(cls, trainer: Any) -> ProtocolEvaluation:
        """Read the config, and with protocol evaluation on check the set-up and the eval datasets.

        Raises:
            ValueError: ``protocol_eval=True`` without an eval dataset, an eval dataset that cannot give
                pair records (auto mode: one that has the pair columns but is otherwise unusable), a
                processor that does not pad on the left, a model outside the Qwen-VL families, FSDP,
                ZeRO-3 without ``ds3_gather_for_generation``.
        """
        from differad_rl.integrations.qwen_vl.predict import PredictConfig

        args = trainer.args
        mode = getattr(args, "protocol_eval", None)
        off = cls(False, False, None, EvalConfig(reasoning=True), None)
        if mode is False:
            return off
        eval_dataset = trainer.eval_dataset
        if eval_dataset is None:
            if mode is True:
                raise ValueError("protocol_eval=True needs an eval_dataset (to_trl_dataset(held_out_pairs))")
            return off
        datasets = dict(eval_dataset) if isinstance(eval_dataset, dict) else {"": eval_dataset}
        if mode is None and not all(has_pair_columns(ds) for ds in datasets.values()):
            return off  # auto: not pair rows (e.g. a text-only eval set) → TRL's eval only
        max_new = getattr(args, "protocol_eval_max_new_tokens", None)
        prompt = getattr(args, "protocol_eval_prompt", "reasoning")
        pcfg = PredictConfig(
            batch_size=int(getattr(args, "protocol_eval_batch_size", 8)),
            max_new_tokens=int(max_new if max_new is not None else args.max_completion_length),
            prompt=prompt,
        )
        self = cls(True, mode is True, pcfg, EvalConfig(reasoning=prompt == "reasoning"), None)
        self._check_setup(trainer)
        for name, ds in datasets.items():
            self.records_for(ds, source="eval_dataset" + (f"[{name!r}]" if name else ""))
        return self

    def _check_setup(self, trainer: Any) -> None:
        from differad_rl.integrations.qwen_vl.loading import check_left_padding, model_family

        fix = "or set protocol_eval=False"
        try:
            check_left_padding(trainer.processing_class)
        except ValueError as exc:
            raise ValueError(f"protocol_eval: {exc}; {fix}") from None
        try:
            self.family = model_family(trainer.accelerator.unwrap_model(trainer.model))
        except ValueError as exc:
            raise ValueError(f"protocol_eval: {exc}; {fix}") from None
        if getattr(trainer, "is_fsdp_enabled", False):
            raise ValueError(f"protocol_eval: greedy protocol generation is not supported under FSDP; {fix}")
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3 and not trainer.args.ds3_gather_for_generation:
            raise ValueError(
                "protocol_eval: DeepSpeed ZeRO-3 with ds3_gather_for_generation=False would hang on shards of "
                f"unequal length; set ds3_gather_for_generation=True {fix}"
            )

    def records_for(self, dataset: Any, *, source: str = "eval_dataset") -> list[PairRecord]:
        """The (cached) pair records of ``dataset``; see :func:`records_from_rows`."""
        key = id(dataset)
        cached = self._records.get(key)
        if cached is None:
            cached = records_from_rows(dataset, source=source)
            self._records[key] = cached
        return cached

    # ---------------------------------------------------------------- hooks
    @contextmanager
    def target(self, trainer: Any, eval_dataset: Any) -> Any:
        """Within ``trainer.evaluate(eval_dataset)``: remember which dataset is being evaluated (a
        dict is left to ``Trainer.evaluate``, which calls ``evaluate`` again per dataset)."""
        ds = trainer.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(ds, str) and isinstance(trainer.eval_dataset, dict):
            ds = trainer.eval_dataset[ds]
        previous = self._target
        self._target = None if isinstance(ds, dict) or not self.enabled else ds
        try:
            yield
        finally:
            self._target = previous

    def metrics(self, trainer: Any, metric_key_prefix: str) -> dict[str, float]:
        """Protocol metrics of the dataset being evaluated, keyed ``<metric_key_prefix>_differad/…``
        ({} when off or outside ``evaluate``)."""
        if self._target is None:
            return {}
        records = self.records_for(self._target)
        result = self.run(trainer, records)
        return {f"{metric_key_prefix}_{k}": v for k, v in protocol_log_metrics(result).items()}

    # ---------------------------------------------------------------- the work
    def run(self, trainer: Any, records: Sequence[PairRecord]) -> EvalResult:
        """Predict this rank's shard of ``records``, gather every rank's lines, score them all."""
        from accelerate.utils import gather_object
        from trl.models import unwrap_model_for_generation

        from differad_rl.integrations.qwen_vl.predict import generate_predictions

        acc = trainer.accelerator
        rank, world = acc.process_index, acc.num_processes
        n = len(records)
        shard = list(records[rank * n // world:(rank + 1) * n // world])
        bs = int(self.predict_config.batch_size)
        processor = trainer.processing_class
        lines: list[dict[str, Any]] = []
        with unwrap_model_for_generation(trainer.model_wrapped, acc,
                                         gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as model:
            name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
            for start in range(0, len(shard), bs):
                lines += generate_predictions(model, processor, shard[start:start + bs], self.predict_config,
                                              model_name=name, family=self.family)
        if world > 1:
            lines = list(gather_object(lines))
        self.last_lines = lines
        self.last_result = score_lines(lines, records, self.eval_config)
        return self.last_result


def score_lines(lines: Sequence[Mapping[str, Any]], records: Sequence[PairRecord],
                config: EvalConfig | None = None) -> EvalResult:
    """Score ``differad-rl predict`` lines against ``records`` exactly as ``differad-rl eval`` does:
    the lines are written to a temporary JSONL and read back with ``read_predictions``."""
    import json

    with tempfile.TemporaryDirectory(prefix="differad-eval-") as tmp:
        path = Path(tmp) / "predictions.jsonl"
        path.write_text("".join(json.dumps(dict(line), ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
        preds = read_predictions(path)
    return evaluate_records(preds, records, config if config is not None else EvalConfig(reasoning=True),
                            source="eval_dataset")

