"""How a run talks to its launcher: the command line and config, and reporting either to Dagster
Pipes or to stdout.

A run works standalone (``python -m training.run_dpo --config cfg.json --set train.max_steps=10``)
or as a Dagster Pipes subprocess. Launched by Dagster (``PipesEnvVarParamsLoader()
.is_dagster_pipes_process()``), it opens ``open_dagster_pipes()``, reads its configuration from the
launcher's extras (``extras["config"]``: a dict, merged over ``--config`` if both are given; or
``extras["config_path"]``), logs progress with ``context.log``, reports one
``report_asset_materialization(metadata=...)`` and its asset checks with ``report_asset_check``.
Standalone, the same reports are JSON lines on stdout. The loss curve goes into the metadata as a
file path and as a markdown image (base64 PNG).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from training.config import apply_overrides, deep_merge

log = logging.getLogger("lineup.training")


class Reporter:
    """Standalone reporting: logging + a final JSON line on stdout."""

    pipes = False

    def info(self, msg: str) -> None:
        log.info(msg)
        print(msg, file=sys.stderr, flush=True)

    def warning(self, msg: str) -> None:
        log.warning(msg)
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    def materialize(self, metadata: Mapping[str, Any]) -> None:
        print(json.dumps({"materialization": _plain(metadata)}, default=str), flush=True)

    def check(self, check_name: str, passed: bool, severity: str, metadata: Mapping[str, Any]) -> None:
        print(json.dumps({"check": {"check_name": check_name, "passed": passed, "severity": severity,
                                    "metadata": _plain(metadata)}}, default=str), flush=True)


class Quiet(Reporter):
    """Ranks other than 0 of a multi-GPU run: no progress lines, no materialization."""

    def info(self, msg: str) -> None:
        log.debug(msg)

    def materialize(self, metadata: Mapping[str, Any]) -> None:
        pass

    def check(self, check_name: str, passed: bool, severity: str, metadata: Mapping[str, Any]) -> None:
        pass


class PipesReporter(Reporter):
    pipes = True

    def __init__(self, context):
        self.context = context

    def info(self, msg: str) -> None:
        self.context.log.info(msg)

    def warning(self, msg: str) -> None:
        self.context.log.warning(msg)

    def materialize(self, metadata: Mapping[str, Any]) -> None:
        self.context.report_asset_materialization(metadata=dict(metadata))

    def check(self, check_name: str, passed: bool, severity: str, metadata: Mapping[str, Any]) -> None:
        self.context.report_asset_check(check_name=check_name, passed=passed, severity=severity,
                                        metadata=dict(metadata))


def _plain(md: Mapping[str, Any]) -> dict:
    """Metadata for stdout: raw values, inline base64 images shortened (the PNG file is on disk)."""
    out = {}
    for k, v in md.items():
        v = v["raw_value"] if isinstance(v, Mapping) and "raw_value" in v else v
        if isinstance(v, str) and "base64," in v and len(v) > 200:
            v = v[:60] + f"...<{len(v)} chars>"
        out[k] = v
    return out


def is_dagster_pipes_process() -> bool:
    """True when launched by a Dagster Pipes client (the default env-var params loader)."""
    from dagster_pipes import PipesEnvVarParamsLoader

    return PipesEnvVarParamsLoader().is_dagster_pipes_process()


@contextlib.contextmanager
def session(argv: list[str] | None, description: str) -> Iterator[tuple[dict, Reporter]]:
    """Parse the CLI, open Pipes when launched by Dagster, and yield (config, reporter)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="JSON config file")
    ap.add_argument("--set", action="append", default=[], help="override: dotted.key=value (JSON)")
    args = ap.parse_args(argv)
    cfg: dict = json.loads(Path(args.config).read_text()) if args.config else {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from dagster_pipes import open_dagster_pipes

    if is_dagster_pipes_process():
        with open_dagster_pipes() as context:
            extras = context.extras or {}
            if extras.get("config_path"):
                cfg = deep_merge(cfg, json.loads(Path(extras["config_path"]).read_text()))
            if isinstance(extras.get("config"), Mapping):
                cfg = deep_merge(cfg, extras["config"])
            cfg = apply_overrides(cfg, args.set)
            yield cfg, PipesReporter(context)
    else:
        yield apply_overrides(cfg, args.set), Reporter()


def md_value(text: str) -> dict:
    return {"raw_value": text, "type": "md"}


def path_value(p: str | Path) -> dict:
    return {"raw_value": str(p), "type": "path"}


def json_value(v: Any) -> dict:
    return {"raw_value": v, "type": "json"}



def loss_curve_png(history: list[dict], path: Path, keys=("loss",)) -> Path | None:
    """A PNG of the training curves (matplotlib, Agg); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k in keys:
        xs = [h["step"] for h in history if k in h]
        ys = [h[k] for h in history if k in h]
        if xs:
            ax.plot(xs, ys, label=k)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

def curve_metadata(png: Path | None) -> dict:
    if png is None or not Path(png).exists():
        return {}
    b64 = base64.b64encode(Path(png).read_bytes()).decode()
    return {"loss_curve_path": path_value(png), "loss_curve": md_value(f"![loss curve](data:image/png;base64,{b64})")}


def dataset_metadata(manifest: Mapping[str, Any]) -> dict:
    """Which dataset version (the manifest's content-hash id) and split a run trained on."""
    return {
        "dataset": manifest.get("dataset"),
        "dataset_version": manifest.get("version"),
        "dataset_split": manifest.get("split"),
        "dataset_fingerprint": manifest.get("config_fingerprint"),
    }


def numeric(d: Mapping[str, Any]) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
