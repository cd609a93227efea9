"""Convert from a config file: the entry point for cluster jobs.

    ray job submit --working-dir . -- python jobs/convert.py --config jobs/examples/laion-s3.toml
    python jobs/convert.py --config my-job.toml          # same job, on this machine

The config holds the fields of `ConvertConfig` (TOML or JSON). Inside `ray
job submit`, Ray sets RAY_ADDRESS and the job joins that cluster. Credentials
belong in the environment (AWS_* variables, instance roles), not in the
config: storage options never reach the manifest, but a config file travels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tokshard.errors import TokshardError, UsageError

if TYPE_CHECKING:
    from tokshard.pipeline.convert.config import ConvertConfig


def load_config(path: str) -> ConvertConfig:
    from tokshard.pipeline.convert.config import ConvertConfig
    text = Path(path).read_text()
    if path.endswith(".toml"):
        import tomllib
        data = tomllib.loads(text)
    elif path.endswith(".json"):
        data = json.loads(text)
    else:
        raise UsageError(f"{path}: config must be .toml or .json")
    known = {f.name for f in dataclasses.fields(ConvertConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    missing = [k for k in ("sources", "out") if k not in data]
    if missing:
        raise UsageError(f"{path}: missing {missing}")
    return ConvertConfig(**data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/convert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a .toml or .json file with ConvertConfig fields")
    p.add_argument("--address", help="Ray address (overrides the config; default $RAY_ADDRESS)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        from tokshard.jobs.cli import _summary
        from tokshard.pipeline.convert.job import convert
        cfg = load_config(args.config)
        if args.address:
            cfg.address = args.address
        print(_summary(convert(cfg, quiet=args.quiet)))
    except (OSError, ValueError, TypeError) as e:
        print(f"tokshard: error: {args.config}: {e}", file=sys.stderr)
        return 2
    except TokshardError as e:
        print(f"tokshard: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
