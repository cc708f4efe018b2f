"""The commands that measure a model as it is or under a given mask: eval, importance, head-map, drift, tasks."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from analysis.budget import budget
from analysis.cli.command import Result, before_load, command, progress_bar, renders
from analysis.cli.options import int_list, name_list, read_mask, read_windows, text_arguments
from analysis.drift import cached_mask_drift
from analysis.evaluation import cached_perplexity
from analysis.head_map import DEFAULT_CLUSTERS, DEFAULT_METRICS, cached_head_map
from analysis.importance import HEAD_METRICS, cached_head_result
from analysis.lm_eval_tasks import write_lm_eval
from analysis.loading import LoadedModel
from analysis.masks import Mask
from analysis.task_files import cached_user_task, load_task_file
from analysis.task_suite import BUILT_IN, check_task_names, run_suite


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    text_arguments(p)
    p.add_argument("--mask", default=None, help="a v1 mask JSON file (default: unpruned)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if the result is cached")


@command("protocol perplexity of a model, optionally under a mask, with its budget", _eval_arguments)
def cmd_eval(args: argparse.Namespace, lm: LoadedModel) -> Result:
    windows = read_windows(lm, args)
    mask = read_mask(lm, args.mask) if args.mask else Mask.unpruned(lm.shape, lm.name, lm.fingerprint)
    result = cached_perplexity(
        lm.arch, lm.fingerprint, windows, mask, progress=progress_bar("eval"), refresh=args.no_cache
    )
    return {**result.to_json(), "budget": budget(mask, lm.shape, args.seqlen).to_json()}


def _importance_arguments(p: argparse.ArgumentParser) -> None:
    text_arguments(p, "--text", "default-calib", max_tokens=2048)
    p.add_argument("--metric", required=True, choices=sorted(HEAD_METRICS), help="the importance metric")
    p.add_argument("--layers", type=int_list, default=None, help="only these layers, e.g. 28,29 (others: null)")


def _score_rows(scores: list[list[float] | None]) -> Iterator[str]:
    for i, row in enumerate(scores):
        yield f"  {i:>3}: " + ("-" if row is None else " ".join(f"{v:9.4g}" for v in row))


@renders(scores=_score_rows)
@command("per-head importance scores of one metric, one row per layer", _importance_arguments)
def cmd_importance(args: argparse.Namespace, lm: LoadedModel) -> Result:
    windows = read_windows(lm, args)
    result = cached_head_result(lm, windows, args.metric, args.layers, progress=progress_bar(args.metric))
    return {**result.to_json(), "windows": windows.metadata()}


def _head_map_arguments(p: argparse.ArgumentParser) -> None:
    text_arguments(p, "--text", "default-calib", max_tokens=2048)
    p.add_argument(
        "--metrics",
        type=name_list,
        default=list(DEFAULT_METRICS),
        help=f"importance metrics among the features (default {','.join(DEFAULT_METRICS)})",
    )
    p.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS, help="k-means clusters")
    p.add_argument("--seed", type=int, default=0, help="seed of UMAP and k-means (same seed, same map)")


def _map_summary(head_map: Result) -> Iterator[str]:
    yield f"  {len(head_map['heads'])} heads, features {', '.join(head_map['feature_names'])}"


@renders(map=_map_summary)
@command("every head placed by its features (PCA and UMAP) and clustered", _head_map_arguments)
def cmd_head_map(args: argparse.Namespace, lm: LoadedModel) -> Result:
    windows = read_windows(lm, args)
    head_map = cached_head_map(lm, windows, args.metrics, args.clusters, args.seed, progress=progress_bar("head map"))
    return {"map": head_map.to_json(), "cluster_members": head_map.cluster_members(), "windows": windows.metadata()}


def _drift_arguments(p: argparse.ArgumentParser) -> None:
    text_arguments(p, "--text", "default-eval", max_tokens=2048)
    p.add_argument("--mask", required=True, help="a v1 mask JSON file")


def _drift_table(report: Result) -> Iterator[str]:
    yield f"  KL(unpruned || masked) of the next-token distribution: {report['kl_nats_per_token']:.4f} nats/token"
    yield "  layer  |h| unpruned (q10 q50 q90)     |h| masked (q10 q50 q90)      cos"
    for row in report["layers"]:
        u, m = row["unpruned"], row["masked"]
        yield (
            f"  {row['layer']:>5}  {u['l2_mean']:7.2f} ({u['l2_q10']:.1f} {u['l2_q50']:.1f} {u['l2_q90']:.1f})"
            f"   {m['l2_mean']:7.2f} ({m['l2_q10']:.1f} {m['l2_q50']:.1f} {m['l2_q90']:.1f})   {row['cosine_mean']:.4f}"
        )


@renders(mask=_drift_table, without_rescaling=_drift_table)
@command("per-layer residual-norm drift of a mask against the unpruned model", _drift_arguments)
def cmd_drift(args: argparse.Namespace, lm: LoadedModel) -> Result:
    """The mask's drift; for a mask with drop-QK layers also the same mask with alpha = 1 there."""
    return cached_mask_drift(lm, read_windows(lm, args), read_mask(lm, args.mask)).to_json()


def _tasks_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask", default=None, help="a mask JSON file (default: unpruned)")
    p.add_argument(
        "--tasks", type=name_list, default=list(BUILT_IN), help=f"comma-separated (default {','.join(BUILT_IN)})"
    )
    p.add_argument(
        "--task-file",
        action="append",
        default=[],
        help='a JSONL file of {"prompt", "target"} or {"prompt", "choices", "answer"} items; repeat for several',
    )
    p.add_argument(
        "--write-lm-eval",
        metavar="DIR",
        default=None,
        help="instead of scoring, write the tasks (and task files) as lm-evaluation-harness YAMLs with data into DIR",
    )
    p.add_argument("--no-cache", action="store_true", help="recompute even if the results are cached")


def _check_tasks(args: argparse.Namespace) -> None:
    """Bad task names and task files stop before the model loads; the parsed files ride on ``args``."""
    args.tasks = check_task_names(args.tasks)
    args.user_tasks = tuple(load_task_file(path) for path in args.task_file)


def _task_names(tasks: Result) -> Iterator[str]:
    yield f"  {', '.join(tasks)} (every number with --json)"


@renders(tasks=_task_names)
@before_load(_check_tasks)
@command(
    "offline tasks under a mask: passkey, induction, last word, continuation, long-context perplexity", _tasks_arguments
)
def cmd_tasks(args: argparse.Namespace, lm: LoadedModel) -> Result:
    if args.write_lm_eval:
        return write_lm_eval(lm, args.write_lm_eval, args.user_tasks).to_json()
    mask = read_mask(lm, args.mask) if args.mask else None
    results = {**run_suite(lm, args.tasks, mask, progress=progress_bar("tasks"), refresh=args.no_cache)}
    for task in args.user_tasks:
        bar = progress_bar(task.name)
        results[f"user:{task.name}"] = cached_user_task(lm, task, mask, progress=bar, refresh=args.no_cache)
    return {
        "headline": {k: v for result in results.values() for k, v in result.headline().items()},
        "tasks": {name: result.to_json() for name, result in results.items()},
        "mask": mask.summary() if mask else "unpruned",
    }
