"""``DifferADGRPOTrainer``: TRL's ``GRPOTrainer`` with difficulty weights and group resampling.

The algorithms live in the core (:func:`differad_rl.groups.difficulty_weights`,
:func:`differad_rl.groups.degenerate_groups`, :func:`differad_rl.resampling.resample_groups`); this
module only wires them into TRL 1.16's generation step:

1. ``super()._generate_and_score_completions`` generates and scores the local batch; the overridden
   ``_calculate_rewards`` keeps the per-function rewards, gathered over all processes (N × F, N = global
   batch, groups of G = ``num_generations`` contiguous rows).
2. Resampling (``resample_rounds`` = K > 0): the driver judges degeneracy on the gathered localization
   reward — identical on every rank, so every rank regenerates the same global groups in the same
   rounds and every collective is entered by every rank. ``regenerate`` calls ``super()`` again on this
   rank's rows of those groups (padded with filler rows to one common size per rank, so TRL's gathers
   line up), splices the new rows into the batch (prompt tensors re-padded on the left, completion
   tensors on the right, pixel values split by ``image_grid_thw``) and the new rewards into the
   gathered reward matrix. With ``use_vllm`` the sub-batch goes through TRL's vLLM path like any batch
   (colocate: every process samples its own rows; server: the gathered rows, G per prompt), and its
   ``sampling_per_token_logps`` and ``importance_sampling_ratio`` are spliced with the rows; the
   ``sampling/...`` metrics TRL logs for them are redone on the final batch. Afterwards the advantages
   are recomputed from the spliced rewards with TRL's own ``scale_rewards`` /
   ``multi_objective_aggregation`` semantics (:func:`trl_advantages`) and ``num_items_in_batch`` is
   recounted.
3. Weights (``difficulty_weighting``): Â_i = ω_g · A_i, with ω from the gathered localization reward.

4. The peers' strategies (docs/method.md §9), opt-in: ``degeneracy_rule="emit"`` changes the groups step 2
   regenerates; with ``group_filter="dapo"|"easyr1"`` and ``group_filter_refill_rounds`` = R the filtered
   groups are replaced by groups of new prompts from ``train_dataset`` (the step-2 machinery with new
   inputs, at most R rounds); ``advantage_weighting="emit"|"univg"`` and the filter's drop of the groups
   still filtered are applied last by :func:`~differad_rl.integrations.trl.peers.apply_peer_strategies`.

After any regeneration every metric TRL logged for the step is redone on the final batch: reward
metrics, the completions table, completion lengths, ``clipped_ratio``, ``num_tokens`` (the final
batch's tokens; replaced rows and filler rows are not counted) and the reward functions' own
``log_metric`` / ``log_extra`` values (the final rows scored again, only when a reward logged any).

With every feature off the trainer returns ``super()``'s output untouched: it is plain GRPOTrainer.
Only the training batch is changed; evaluation batches are TRL's.

5. Protocol metrics (:mod:`.evaluation`): with an eval dataset of pair rows, every evaluation also logs
   greedy held-out ``eval_differad/miou``, ``acc@0.3``, ``f1@0.3``, … beside TRL's own eval metrics.

Logged per step (``train/differad/...``): ``weight_mean``, ``weight_max``, ``degenerate_before``,
``degenerate_after`` (shares of groups), ``groups_resampled`` (distinct groups), ``regenerations``
(group regenerations over all rounds), ``rounds_used``; with refill ``refills`` (groups replaced by new
prompts) and ``refill_rounds_used``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from differad_rl.groups import degenerate_groups, difficulty_weights
from differad_rl.group_filters import regenerate_groups

from .compat import KNOWN_OUTPUT_KEYS, UnsupportedOutputError, check_output_keys, check_trl_version
from .config import DifferADGRPOConfig, check_vllm_regeneration
from .evaluation import ProtocolEvaluation
from .peers import apply_peer_strategies, filter_rule, peers_active, resample_rule
from .vision import setup_vision

__all__ = ["DifferADGRPOTrainer", "check_dataset_columns", "splice_rows", "trl_advantages"]

check_trl_version()

_METRIC_PREFIX = "differad/"


def trl_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's advantages from the gathered per-function rewards (a copy of its inline code).

    ``sum_then_normalize``: r = Σ_k w_k r_k (NaN-aware; NaN where every function is NaN),
    A = (r − mean_g) / (std + 1e-4) with std per group (``scale_rewards="group"``), over the batch
    (``"batch"``) or A = r − mean_g (``"none"``); std is Bessel-corrected and NaN-aware.
    ``normalize_then_sum``: each function normalised per group, weighted sum, then normalised over the batch.
    NaN advantages (unscorable rows) become 0.

    Args:
        rewards_per_func: (N, F) gathered rewards, groups of ``num_generations`` contiguous rows.
        reward_weights: (F,) weights.
    Returns:
        ``(advantages (N,), is_std_zero (N,) bool)`` — the second as TRL logs ``frac_reward_zero_std``.
    """
    g = num_generations
    weights = reward_weights.to(rewards_per_func.device).unsqueeze(0)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
        if scale_rewards in ("group", "none"):
            if g > 1:
                std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
            else:
                std = torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, g, rewards_per_func.size(1))
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if g > 1 else torch.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.size(1))
        rewards = (reward_k * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    else:
        raise ValueError(
            "multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', "
            f"got {multi_objective_aggregation!r}"
        )
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def _pad_to(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    """Pad ``t`` (B, W, ...) along dim 1 to ``width`` with ``value`` on the left or right."""
    extra = width - t.size(1)
    if extra <= 0:
        return t
    filler = t.new_full((t.size(0), extra, *t.shape[2:]), value)
    return torch.cat([filler, t] if left else [t, filler], dim=1)


def _row_sections(grid_thw: torch.Tensor, num_images: Sequence[int]) -> list[int]:
    """Rows of ``pixel_values`` per sample: Σ over the sample's images of t·h·w."""
    per_image = grid_thw.prod(-1)
    bounds = torch.tensor([0, *num_images], device=per_image.device).cumsum(0)
    cum = torch.cat([per_image.new_zeros(1), per_image.cumsum(0)])
    return (cum[bounds[1:]] - cum[bounds[:-1]]).tolist()


def splice_rows(
    dst: dict[str, Any], src: dict[str, Any], dst_rows: torch.Tensor, pad_token_id: int
) -> dict[str, Any]:
    """Return ``dst`` with rows ``dst_rows`` replaced by the first ``len(dst_rows)`` rows of ``src``.

    Both are outputs of ``GRPOTrainer._generate_and_score_completions``. Prompt tensors are left-padded
    and completion tensors right-padded to the larger of the two widths (so a spliced row's tokens,
    masks and log-probs are the ones of its own sub-batch, just with more padding); ``(B, P + C)``
    token-type tensors are split at P and re-padded the same way; pixel values are split per sample
    by ``image_grid_thw`` / ``num_images`` and reassembled. With vLLM, ``sampling_per_token_logps`` is a
    completion tensor and ``importance_sampling_ratio`` one too when it is per token ((B, C)), a per-row
    value when it is per sequence ((B, 1)); padded ratio positions hold 1. ``num_items_in_batch`` is
    copied from ``dst`` and must be recomputed by the caller (it is a global count). Unknown keys raise.
    """
    check_output_keys(dst)
    check_output_keys(src)
    if set(dst) != set(src):
        raise ValueError(f"cannot splice outputs with different keys: {sorted(set(dst) ^ set(src))}")
    n = int(dst_rows.numel())
    rows = dst_rows.to(dst["prompt_ids"].device)
    p_dst, p_src = dst["prompt_ids"].size(1), src["prompt_ids"].size(1)
    c_dst, c_src = dst["completion_ids"].size(1), src["completion_ids"].size(1)
    p_width, c_width = max(p_dst, p_src), max(c_dst, c_src)
    # TRL's own padding values (the IS ratio of a padded token is exp(0) = 1; it is masked out of the loss)
    pad_values = {"prompt_ids": pad_token_id, "completion_ids": pad_token_id, "tool_mask": 1,
                  "importance_sampling_ratio": 1.0}
    out: dict[str, Any] = {}
    for key, value in dst.items():
        layout = KNOWN_OUTPUT_KEYS[key]
        other = src[key]
        if layout == "right_or_row":  # per token (B, C) or per sequence (B, 1)
            per_token = value.size(-1) == c_dst and other.size(-1) == c_src
            layout = "right" if per_token else "row"
        if layout in ("left", "right"):
            left = layout == "left"
            fill = pad_values.get(key, 0)
            width = p_width if left else c_width
            value, other = _pad_to(value, width, fill, left), _pad_to(other, width, fill, left)
            merged = value.clone()
            merged[rows] = other[:n].to(merged.dtype)
            out[key] = merged
        elif layout == "prompt_completion":
            parts = []
            for t, p in ((value, p_dst), (other, p_src)):
                prompt_part = _pad_to(t[:, :p], p_width, 0, left=True)
                parts.append(torch.cat([prompt_part, t.new_zeros(t.size(0), c_width)], dim=1))
            merged = parts[0].clone()
            merged[rows] = parts[1][:n]
            out[key] = merged
        elif layout == "row":
            merged = value.clone()
            merged[rows] = other[:n].to(merged.dtype)
            out[key] = merged
        elif layout == "recompute":
            out[key] = value
    if "pixel_values" in dst:
        if "image_grid_thw" not in dst or "num_images" not in dst:
            raise UnsupportedOutputError(
                "group resampling splices pixel values by image_grid_thw (Qwen-VL); this batch has "
                f"keys {sorted(dst)}"
            )
        pv_dst = list(torch.split(dst["pixel_values"], _row_sections(dst["image_grid_thw"], dst["num_images"])))
        pv_src = list(torch.split(src["pixel_values"], _row_sections(src["image_grid_thw"], src["num_images"])))
        grid_dst = list(torch.split(dst["image_grid_thw"], list(dst["num_images"])))
        grid_src = list(torch.split(src["image_grid_thw"], list(src["num_images"])))
        num_images = list(dst["num_images"])
        for j, r in enumerate(rows.tolist()):  # list bookkeeping, one entry per spliced row
            pv_dst[r], grid_dst[r], num_images[r] = pv_src[j], grid_src[j], src["num_images"][j]
        out["pixel_values"] = torch.cat(pv_dst, dim=0)
        out["image_grid_thw"] = torch.cat(grid_dst, dim=0)
        out["num_images"] = num_images
    elif "num_images" in dst:
        num_images = list(dst["num_images"])
        for j, r in enumerate(rows.tolist()):
            num_images[r] = src["num_images"][j]
        out["num_images"] = num_images
    return out


class DifferADGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with DifferAD-R1's difficulty weights (§5) and group resampling (§6).

    Same constructor as ``GRPOTrainer``; pass a :class:`DifferADGRPOConfig` as ``args`` (a plain
    ``GRPOConfig`` means both features off). The localization reward is the reward function named by
    ``args.localization_reward`` (its ``__name__``); an unknown name raises ``ValueError`` listing the
    known ones. Group regeneration runs TRL's own single-turn generation, with transformers or with vLLM
    (colocate, or server when each process's generation batch is a multiple or a divisor of G; see
    :func:`~differad_rl.integrations.trl.config.check_vllm_regeneration`): it is refused with
    ``rollout_func``, tools or environments (they generate per prompt or per turn, not per row).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _check_before_build(*args, **kwargs)  # before TRL builds a vLLM engine or waits for a server
        super().__init__(*args, **kwargs)
        cfg = self.args
        self._dw_on = bool(getattr(cfg, "difficulty_weighting", False))
        self._resample_k = int(getattr(cfg, "resample_rounds", 0))
        self._dw_tau = float(getattr(cfg, "difficulty_tau", 0.3))
        self._dw_scope = str(getattr(cfg, "difficulty_scope", "group"))
        self._degenerate_tol = float(getattr(cfg, "degenerate_tol", 1e-6))
        self._last_rewards_per_func: torch.Tensor | None = None
        self._loc_index: int | None = None
        self._peers_on = peers_active(cfg)  # the peers' weightings / group filters (peers.py)
        self._resample_rule = resample_rule(cfg)
        self._refill_rounds = int(getattr(cfg, "group_filter_refill_rounds", 0) or 0)
        self._filter_rule = filter_rule(cfg)
        self._refill_generator = torch.Generator().manual_seed(int(cfg.seed) + 0x5EED)
        self._last_scored: _ScoredRows | None = None
        self._reward_logged = False
        if self._refill_rounds > 0 and not _map_style(self.train_dataset):
            raise ValueError(
                f"group_filter_refill_rounds={self._refill_rounds} draws new prompts by index from train_dataset, "
                f"which is a {type(self.train_dataset).__name__} without len() / indexing; pass a map-style "
                "datasets.Dataset or set group_filter_refill_rounds=0"
            )
        loc_name = getattr(cfg, "localization_reward", None)
        if self._dw_on or self._resample_k > 0 or self._peers_on or loc_name is not None:  # a wrong name fails
            index = self._resolve_localization_reward(loc_name)
            self._loc_index = index if self._dw_on or self._resample_k > 0 or self._peers_on else None
        if self._resample_k > 0 or self._refill_rounds > 0:
            blockers = {
                "rollout_func": getattr(self, "rollout_func", None) is not None,
                "tools": bool(getattr(self, "tools", None)),
                "environment_factory": getattr(self, "environment_factories", None) is not None,
            }
            used = [name for name, on in blockers.items() if on]
            if used:
                raise ValueError(_resample_blocked_message(cfg, used))
        # protocol metrics on eval_dataset (evaluation.py): checked here, run by evaluate/evaluation_loop below
        self._protocol_eval = ProtocolEvaluation.from_trainer(self)
        # frozen vision tower (vision.py): out of autograd; the feature cache, started per generation batch
        self.vision_cache = setup_vision(self)

    def _resolve_localization_reward(self, name: str | None) -> int:
        known = list(self.reward_func_names)
        if name is None:
            if len(known) == 1:
                index = 0
            else:
                raise ValueError(
                    "localization_reward=None is ambiguous with several reward functions; set it to the name of "
                    f"the localization reward, one of {known}"
                )
        elif name not in known:
            raise ValueError(f"localization_reward={name!r} is not a reward function of this trainer; known: {known}")
        else:
            index = known.index(name)
        if known.count(known[index]) > 1:
            raise ValueError(
                f"localization_reward={known[index]!r}: {known.count(known[index])} reward functions have this name "
                f"({known}); TRL logs them under one key and the localization reward would silently be the first. "
                "Give each a distinct name, e.g. get_reward('dclr', processor, name='dclr_enclosing_reward')"
            )
        func = self.reward_funcs[index]
        if _is_text_only_reward(func):
            raise ValueError(
                f"localization_reward={known[index]!r} is the format reward, which judges the text, not the box: "
                "difficulty weights and degeneracy would be judged on it. Name a box reward (dclr_reward, "
                "iou_reward, consistency_reward, multi_box_reward); "
                "differad_rl.integrations.trl.localization_reward_name(names) picks it from a list of names"
            )
        return index

    # ------------------------------------------------------------------------------------------ hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # noqa: D401 - TRL hook
        """TRL's reward computation; keeps the gathered (N, F) matrix and this rank's scored rows."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        self._last_scored = _ScoredRows(list(inputs), list(prompts), list(completions), list(completion_ids_list))
        return rewards_per_func

    def _log_metric(self, name: str, value: float):  # noqa: D401 - TRL hook (reward functions' log_metric)
        self._reward_logged = True
        return super()._log_metric(name, value)

    def _log_completion_extra(self, column: str, values: list):  # noqa: D401 - TRL hook (reward functions' log_extra)
        self._reward_logged = True
        return super()._log_completion_extra(column, values)

    def _generate_and_score_completions(self, inputs):
        if self.vision_cache is not None and self.model.training:  # a new training generation batch:
            self.vision_cache.start_batch()  # the previous one's image features go
        tokens_before = self.state.num_input_tokens_seen
        self._reward_logged = False
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        if mode != "train" or self._loc_index is None:
            return output
        rewards_per_func = self._last_rewards_per_func
        g = self.num_generations
        rank, local_n = self.accelerator.process_index, len(inputs)
        local = slice(rank * local_n, (rank + 1) * local_n)
        loc = torch.nan_to_num(rewards_per_func[:, self._loc_index], nan=0.0)
        metrics = self._metrics[mode]

        batch = _Batch(output, rewards_per_func.clone(), self._last_scored.copy())
        if self._resample_k > 0:
            stats = self._regenerate(batch, self._resample_k, self._resample_rule, mode, new_prompts=False)
            metrics[_METRIC_PREFIX + "degenerate_before"].append(float(stats.degenerate_before))
            metrics[_METRIC_PREFIX + "degenerate_after"].append(float(stats.degenerate_after))
            metrics[_METRIC_PREFIX + "groups_resampled"].append(float(stats.groups_resampled))
            metrics[_METRIC_PREFIX + "regenerations"].append(float(stats.regenerations))
            metrics[_METRIC_PREFIX + "rounds_used"].append(float(stats.rounds_used))
        else:
            share = degenerate_groups(loc, g, tol=self._degenerate_tol).float().mean().item()
            metrics[_METRIC_PREFIX + "degenerate_before"].append(share)
            metrics[_METRIC_PREFIX + "degenerate_after"].append(share)
        if self._refill_rounds > 0:
            stats = self._regenerate(batch, self._refill_rounds, self._filter_rule, mode, new_prompts=True)
            metrics[_METRIC_PREFIX + "refills"].append(float(stats.regenerations))
            metrics[_METRIC_PREFIX + "refill_rounds_used"].append(float(stats.rounds_used))
        if batch.changed:
            self._finish_regeneration(batch, mode, tokens_before)
            output, rewards_per_func = batch.output, batch.rpf
            loc = torch.nan_to_num(rewards_per_func[:, self._loc_index], nan=0.0).to(loc.dtype)

        if self._dw_on:
            weights = difficulty_weights(loc, g, tau=self._dw_tau, scope=self._dw_scope)
            adv = output["advantages"]
            w_local = weights[local].to(device=adv.device, dtype=adv.dtype)
            output["advantages"] = adv * (w_local if adv.dim() == 1 else w_local.unsqueeze(-1))
            metrics[_METRIC_PREFIX + "weight_mean"].append(weights.float().mean().item())
            metrics[_METRIC_PREFIX + "weight_max"].append(weights.float().max().item())
            self._replace_logged_advantages(self._logged_advantages_global(weights))
        if self._peers_on:
            output = apply_peer_strategies(self, inputs, output, loc, mode)
        return output

    # ------------------------------------------------------------------------------------ regeneration
    def _regenerate(self, batch: _Batch, rounds: int, rule: Any, mode: str, *, new_prompts: bool) -> Any:
        """Regenerate, for at most ``rounds`` rounds, the groups ``rule`` selects on the localization reward.

        ``new_prompts=False``: the same prompts again (the method's resampling, EMIT's re-roll);
        ``True``: each selected group is replaced by a group of a new prompt drawn from ``train_dataset``
        (DAPO / EasyR1 refill; :meth:`_draw_rows`). ``batch`` is updated in place (its output, gathered
        rewards, this rank's scored rows and the completions-table rows). Returns the core's
        :class:`~differad_rl.resampling.ResampleStats`.
        """
        g = self.num_generations
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        local_n = len(batch.rows.inputs)
        check_output_keys(batch.output)
        pad_id = self._tokenizer.pad_token_id
        loc = torch.nan_to_num(batch.rpf[:, self._loc_index], nan=0.0)

        def regenerate(groups: torch.Tensor, round_index: int) -> torch.Tensor:
            groups = groups.to(torch.long).cpu()
            offsets = torch.arange(g)
            rows_given = (groups.unsqueeze(1) * g + offsets).reshape(-1)
            rows = torch.sort(rows_given).values  # global rows, ascending
            owner = torch.div(rows, local_n, rounding_mode="floor")
            counts = torch.bincount(owner, minlength=world)  # rows per rank, known to every rank
            per_rank = int(counts.max().item())
            while (per_rank * world) % g:  # TRL views the gathered sub-batch as (-1, G)
                per_rank += 1
            mine = (rows[owner == rank] - rank * local_n).tolist()
            if new_prompts:  # the same draw on every rank: one new dataset row per selected group
                drawn = dict(zip(groups.tolist(), self._draw_rows(int(groups.numel()))))
                mine_inputs = [drawn[(rank * local_n + i) // g] for i in mine]
            else:
                mine_inputs = [batch.rows.inputs[i] for i in mine]
            fill = [batch.rows.inputs[j % local_n] for j in range(per_rank - len(mine))]
            sub_output, sub_rpf, sub_table = self._generate_captured(mine_inputs + fill, mode)
            scored = self._last_scored
            # real rows of the gathered sub-batch, in ascending global order
            starts = torch.arange(world) * per_rank
            real = torch.cat([torch.arange(int(c)) + s for c, s in zip(counts.tolist(), starts.tolist())])
            batch.rpf[rows.to(batch.rpf.device)] = sub_rpf[real.to(sub_rpf.device)].to(batch.rpf.dtype)
            for key, values in sub_table.items():
                for r, j in zip(rows.tolist(), real.tolist()):
                    batch.table.setdefault(key, {})[r] = values[j]
            for k, i in enumerate(mine):
                batch.rows.replace(i, scored, k)
                batch.rows.inputs[i] = mine_inputs[k]
            if mine:
                batch.output = splice_rows(batch.output, sub_output, torch.tensor(mine), pad_id)
            batch.changed = True
            new_loc = batch.rpf[rows_given.to(batch.rpf.device), self._loc_index]
            return torch.nan_to_num(new_loc, nan=0.0)

        _, stats = regenerate_groups(loc, g, regenerate, rounds, rule)
        return stats

    def _draw_rows(self, n: int) -> list[dict[str, Any]]:
        """``n`` rows of ``train_dataset`` for refilled groups: drawn uniformly without replacement (with
        replacement when ``n`` exceeds the dataset) by a generator seeded with ``args.seed``, advanced the
        same way on every process, so every rank draws the same rows. The draws do not advance TRL's sampler."""
        size = len(self.train_dataset)
        if n <= size:
            idx = torch.randperm(size, generator=self._refill_generator)[:n]
        else:
            idx = torch.randint(size, (n,), generator=self._refill_generator)
        return [self.train_dataset[int(i)] for i in idx.tolist()]

    def _generate_captured(
        self, sub_inputs: list[dict[str, Any]], mode: str
    ) -> tuple[dict[str, Any], torch.Tensor, dict[str, list]]:
        """Run ``super()._generate_and_score_completions`` on a sub-batch without touching the step's logs.

        Returns the sub-output, its gathered (world·n, F) rewards and its gathered completions-table
        columns (``prompt``, ``completion``, ``images`` when logged, as TRL logged them). Metrics, the
        completions table and ``num_input_tokens_seen`` are restored to their state before the call (the
        step's counts are redone from the final batch by :meth:`_finish_regeneration`).
        """
        saved_metrics = {k: list(v) for k, v in self._metrics[mode].items()}
        saved_logs = {
            k: list(v) if isinstance(v, deque) else {kk: list(vv) for kk, vv in v.items()}
            for k, v in self._logs.items()
        }
        saved_tokens = self.state.num_input_tokens_seen
        saved_flag = self._reward_logged
        sub_output = super()._generate_and_score_completions(sub_inputs)
        sub_rpf = self._last_rewards_per_func
        n_global = sub_rpf.size(0)
        keys = ["prompt", "completion"]
        if self.log_multimodal and any(k in sub_inputs[0] for k in ("images", "image")):
            keys.append("images")  # TRL logs them then
        table = {k: list(self._logs[k])[-n_global:] for k in keys if len(self._logs[k]) >= n_global}
        self._metrics[mode].clear()
        self._metrics[mode].update({k: v for k, v in saved_metrics.items()})
        self.state.num_input_tokens_seen = saved_tokens
        self._metrics[mode]["num_tokens"] = [saved_tokens]
        self._reward_logged = saved_flag
        for k, v in self._logs.items():
            saved = saved_logs[k]
            if isinstance(v, deque):
                v.clear()
                v.extend(saved)
            else:
                for kk in list(v):
                    v[kk].clear()
                    if kk in saved:
                        v[kk].extend(saved[kk])
                    else:
                        del v[kk]
        return sub_output, sub_rpf, table

    def _finish_regeneration(self, batch: _Batch, mode: str, tokens_before: int) -> None:
        """After regeneration: TRL's advantages and loss-token count from the final batch, and every metric
        of the step that TRL computed on the first generation redone on the final batch:
        reward means / stds, ``frac_reward_zero_std``, the completions table, completion lengths and
        ``clipped_ratio``, ``num_tokens`` (the final batch's tokens: filler rows and replaced rows are not
        counted) and the reward functions' own ``log_metric`` / ``log_extra`` values (by scoring the final
        rows again, only when a reward function logged any)."""
        g = self.num_generations
        rank, local_n = self.accelerator.process_index, len(batch.rows.inputs)
        out, rpf = batch.output, batch.rpf
        advantages, is_std_zero = trl_advantages(
            rpf, self.reward_weights, g, self.scale_rewards, self.multi_objective_aggregation
        )
        local = slice(rank * local_n, (rank + 1) * local_n)
        out["advantages"] = advantages[local].to(out["advantages"].device, out["advantages"].dtype)
        loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        self._relog_after_resampling(mode, rpf, advantages, is_std_zero, batch.table)
        self._relog_completion_stats(mode, batch, tokens_before)
        self._relog_sampling_stats(mode, out)
        self._relog_reward_logs(mode, batch)
        self._last_rewards_per_func = rpf

    def _relog_sampling_stats(self, mode: str, out: dict[str, Any]) -> None:
        """TRL's vLLM ``sampling/...`` metrics (``_generate_and_score_completions``), from the final batch:
        |old − sampling| log-prob difference (mean of the per-process means, max) over the loss tokens whose
        sampling log-prob is known, and the min / mean / max of the importance-sampling ratio (per sequence,
        or over the loss tokens when per token)."""
        ratio = out.get("importance_sampling_ratio")
        if ratio is None or "sampling_per_token_logps" not in out or "old_per_token_logps" not in out:
            return  # TRL logged none (no vLLM, or vllm_importance_sampling_correction=False)
        from trl.trainer.utils import nanmax, nanmin

        device = self.accelerator.device
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        mask = mask.bool()
        delta = torch.abs(out["old_per_token_logps"] - out["sampling_per_token_logps"])
        delta = delta[mask & ~torch.isnan(delta)]
        zero = torch.tensor(0.0, device=device)
        per_sequence = self.vllm_importance_sampling_mode in ("sequence_mask", "sequence_truncate")
        flat = ratio.flatten() if per_sequence else ratio[mask]
        metrics = self._metrics[mode]
        for name, value, across in (  # the per-process value, then TRL's reduction over processes
            ("sampling_logp_difference/mean", delta.mean() if delta.numel() else zero, torch.mean),
            ("sampling_logp_difference/max", delta.max() if delta.numel() else zero, torch.max),
            ("importance_sampling_ratio/min", flat.min() if flat.numel() else zero, nanmin),
            ("importance_sampling_ratio/mean", flat.mean() if flat.numel() else zero, torch.nanmean),
            ("importance_sampling_ratio/max", flat.max() if flat.numel() else zero, nanmax),
        ):
            _replace_last(metrics[f"sampling/{name}"], across(self.accelerator.gather(value.to(device))).item())

    def _relog_completion_stats(self, mode: str, batch: _Batch, tokens_before: int) -> None:
        """TRL's completion-length metrics and token count (``_generate``), from the final batch's rows."""
        device = self.accelerator.device
        ids = batch.rows.completion_ids
        lengths = self.accelerator.gather(torch.tensor([len(x) for x in ids], device=device))
        eos_and_pad = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        truncated = self.accelerator.gather(
            torch.tensor([bool(len(x)) and x[-1] not in eos_and_pad for x in ids], device=device)
        )
        prompt_tokens = self.accelerator.gather(batch.output["prompt_mask"].sum(dim=1).to(device))
        self.state.num_input_tokens_seen = tokens_before + int((prompt_tokens.sum() + lengths.sum()).item())
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        lengths = lengths.float()
        term = lengths[~truncated]
        term = term if term.numel() else torch.zeros(1, device=device)
        for name, value in (
            ("mean_length", lengths.mean()), ("min_length", lengths.min()), ("max_length", lengths.max()),
            ("clipped_ratio", truncated.float().mean()), ("mean_terminated_length", term.mean()),
            ("min_terminated_length", term.min()), ("max_terminated_length", term.max()),
        ):
            _replace_last(metrics[f"completions/{name}"], value.item())

    def _relog_reward_logs(self, mode: str, batch: _Batch) -> None:
        """The reward functions' ``log_metric`` / ``log_extra`` values of the final batch (TRL logged the first
        generation's): its rows are scored again and the values flushed as TRL flushes them."""
        from accelerate.utils import gather_object

        device = self.accelerator.device
        flag = torch.tensor([1.0 if self._reward_logged else 0.0], device=device)
        if float(self.accelerator.gather(flag).sum().item()) == 0.0:  # the same answer on every rank
            return
        saved_rpf, saved_scored = self._last_rewards_per_func, self._last_scored
        self._pending_metrics.clear()
        self._pending_extra_logs.clear()
        rows = batch.rows
        self._calculate_rewards(rows.inputs, rows.prompts, rows.completions, rows.completion_ids)
        self._last_rewards_per_func, self._last_scored = saved_rpf, saved_scored
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(rows.prompts))
            _replace_tail(self._logs["extra"][column], gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(dim=0).tolist()
            _replace_last(self._metrics[mode][name], total / count)
        self._pending_metrics.clear()

    # ------------------------------------------------------------- protocol metrics (evaluation.py)
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """TRL's evaluation, plus the protocol metrics (``<prefix>_differad/…``) of the dataset evaluated."""
        with self._protocol_eval.target(self, eval_dataset), self._vision_cache_paused():
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)

    def _vision_cache_paused(self) -> Any:
        from contextlib import nullcontext

        return self.vision_cache.paused() if self.vision_cache is not None else nullcontext()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's training; the vision feature cache is emptied and stopped when it ends."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.vision_cache is not None:
                self.vision_cache.stop()

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        output.metrics.update(self._protocol_eval.metrics(self, metric_key_prefix))  # {} outside evaluate()
        return output

    # --------------------------------------------------------------------------------------- logging
    def _logged_advantages_global(self, weights: torch.Tensor) -> torch.Tensor:
        """Global weighted advantages for the completions table (no collective: from the gathered rewards)."""
        rpf = self._last_rewards_per_func
        adv, _ = trl_advantages(
            rpf, self.reward_weights, self.num_generations, self.scale_rewards, self.multi_objective_aggregation
        )
        return adv * weights.to(adv.device, adv.dtype)

    def _replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        _replace_tail(self._logs["advantages"], advantages.tolist())

    def _relog_after_resampling(
        self,
        mode: str,
        rewards_per_func: torch.Tensor,
        advantages: torch.Tensor,
        is_std_zero: torch.Tensor,
        table: dict[str, dict[int, Any]],
    ) -> None:
        """Replace this step's reward metrics and completions-table rows (``table[column][global row]``) with
        the post-regeneration values."""
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            _replace_last(metrics[f"rewards/{name}/mean"], torch.nanmean(rewards_per_func[:, i]).item())
            _replace_last(metrics[f"rewards/{name}/std"], nanstd(rewards_per_func[:, i]).item())
            _replace_tail(self._logs["rewards"][name], rewards_per_func[:, i].tolist())
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        _replace_last(metrics["reward"], torch.nanmean(rewards).item())
        _replace_last(metrics["reward_std"], nanstd(rewards).item())
        _replace_last(metrics["frac_reward_zero_std"], is_std_zero.float().mean().item())
        _replace_tail(self._logs["advantages"], advantages.tolist())
        n = rewards_per_func.size(0)
        for key, rows in table.items():
            column = list(self._logs[key])
            if len(column) < n:
                continue
            base = len(column) - n
            for row, value in rows.items():
                column[base + row] = value
            self._logs[key].clear()
            self._logs[key].extend(column)


class _ScoredRows:
    """This rank's rows as the reward functions saw them: inputs, prompts, completions, completion ids."""

    __slots__ = ("inputs", "prompts", "completions", "completion_ids")

    def __init__(self, inputs: list, prompts: list, completions: list, completion_ids: list) -> None:
        self.inputs, self.prompts, self.completions, self.completion_ids = inputs, prompts, completions, completion_ids

    def copy(self) -> _ScoredRows:
        return _ScoredRows(list(self.inputs), list(self.prompts), list(self.completions), list(self.completion_ids))

    def replace(self, i: int, src: _ScoredRows, j: int) -> None:
        """Row ``i`` becomes row ``j`` of ``src`` (its input is set by the caller)."""
        self.prompts[i], self.completions[i], self.completion_ids[i] = (
            src.prompts[j], src.completions[j], src.completion_ids[j])


class _Batch:
    """One training generation batch while groups are regenerated: TRL's output (this rank), the gathered
    (N, F) rewards, this rank's scored rows and the replaced completions-table rows."""

    def __init__(self, output: dict[str, Any], rpf: torch.Tensor, rows: _ScoredRows) -> None:
        self.output, self.rpf, self.rows = output, rpf, rows
        self.table: dict[str, dict[int, Any]] = {}
        self.changed = False


def _resample_blocked_message(cfg: Any, used: Sequence[str]) -> str:
    k = int(getattr(cfg, "resample_rounds", 0) or 0)
    name, value = ("resample_rounds", k) if k > 0 else (
        "group_filter_refill_rounds", int(getattr(cfg, "group_filter_refill_rounds", 0) or 0))
    return (
        f"{name}={value} is not supported together with {', '.join(used)}; group regeneration generates "
        f"single rows with TRL's own generation (transformers or vLLM). Set {name}=0."
    )


def _map_style(dataset: Any) -> bool:
    return dataset is not None and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def _is_text_only_reward(func: Any) -> bool:
    """The core's format reward (judges the text only; its values say nothing about the box)."""
    from differad_rl.rewards import FormatReward

    return isinstance(func, FormatReward)


def _check_before_build(*args: Any, **kwargs: Any) -> None:
    """What ``DifferADGRPOTrainer`` can refuse before ``GRPOTrainer.__init__`` runs (it builds a
    colocated vLLM engine or waits up to 240 s for a vLLM server; without vLLM installed it raises
    TRL's import error): resampling with vLLM / rollout_func / tools / environments, and a
    training dataset missing the columns the box rewards read."""
    names = ("model", "reward_funcs", "args", "train_dataset")
    given = dict(zip(names, args))
    given.update({k: kwargs[k] for k in names if k in kwargs})
    cfg = given.get("args")
    k = int(getattr(cfg, "resample_rounds", 0) or 0) + int(getattr(cfg, "group_filter_refill_rounds", 0) or 0)
    if k > 0:
        check_vllm_regeneration(cfg)  # a vLLM server needs whole groups per block of G gathered rows
        used = [name for name, on in (
            ("rollout_func", kwargs.get("rollout_func") is not None),
            ("tools", bool(kwargs.get("tools"))),
            ("environment_factory", kwargs.get("environment_factory") is not None),
        ) if on]
        if used:
            raise ValueError(_resample_blocked_message(cfg, used))
    funcs = given.get("reward_funcs")
    funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs] if funcs is not None else []
    check_dataset_columns(given.get("train_dataset"), funcs)
    processor = kwargs.get("processing_class", args[5] if len(args) > 5 else None)
    if processor is not None and getattr(getattr(processor, "tokenizer", processor), "padding_side", "left") != "left":
        # TRL's own loader pads on the left; with a right-padded processor the image-token positions
        # and the log-probs of padded rows silently change: make it right, loudly.
        import warnings

        from differad_rl.integrations.qwen_vl.loading import force_left_padding

        warnings.warn("DifferADGRPOTrainer: processing_class pads on the right; set to left padding "
                      "(Qwen-VL generation and log-probs need it)", stacklevel=3)
        force_left_padding(processor)


def check_dataset_columns(dataset: Any, reward_funcs: Sequence[Any]) -> None:
    """Raise ``ValueError`` when ``dataset`` lacks a column that one of ``reward_funcs`` reads.

    Box rewards (:class:`~differad_rl.integrations.trl.rewards.TargetSizeReward`) read ``solution``
    (``boxes`` for the multi-box reward may replace it) and the target size, from ``image_size`` or
    the last image of ``images`` / ``image``. A dataset whose columns are unknown (an
    ``IterableDataset`` without features) is not checked.
    """
    from .rewards import TargetSizeReward

    columns = getattr(dataset, "column_names", None)
    if dataset is None or not columns:
        return
    columns = set(columns)
    for func in reward_funcs:
        if not isinstance(func, TargetSizeReward):
            continue
        need_box = {"solution", "boxes"} if func.multi_box else {"solution"}
        if not columns & need_box:
            raise ValueError(
                f"train_dataset has no {' or '.join(repr(c) for c in sorted(need_box))} column, which reward "
                f"{func.__name__!r} reads (the target's box(es) in original pixels, [0, 0, 0, 0] for a normal target); "
                f"its columns are {sorted(columns)}. Build it with differad_rl.integrations.trl.to_trl_dataset"
            )
        if not columns & {"image_size", "images", "image"}:
            raise ValueError(
                f"train_dataset has neither an 'image_size' column nor an 'images' / 'image' column, so reward "
                f"{func.__name__!r} cannot know the target image's size; its columns are {sorted(columns)}. "
                "Add image_size = [width, height] of the target (to_trl_dataset does)"
            )


def _replace_last(values: list, value: float) -> None:
    if values:
        values[-1] = value


def _replace_tail(values: deque, tail: list) -> None:
    """Overwrite the last ``len(tail)`` entries of a deque (TRL keeps one generation batch there)."""
    if len(values) < len(tail):
        return
    kept = list(values)[: len(values) - len(tail)]
    values.clear()
    values.extend(kept + tail)


__all__ += ["DifferADGRPOConfig"]
