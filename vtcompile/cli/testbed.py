"""`vtcompile testbed`: train the shipped testbed model, write its data as JSONL."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError

log = logging.getLogger("vtcompile.cli")


def cmd_testbed_data(args) -> int:
    from ..testbed.scenes import write_split

    if args.n < 1:
        raise InputError(f"-n must be >= 1, found {args.n}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a directory for <split>.jsonl and images/")
    for split in args.split or ["test"]:
        path = write_split(args.out, split, args.n, args.seed, force=args.force)
        log.info(f"wrote {args.n} {split} samples: {path}")
    return 0


def train(argv: list[str]) -> int:
    """`vtcompile testbed train ...`: its own parser (argparse's REMAINDER would swallow no leading option)."""
    from ..testbed.train import main as train_main

    return train_main(argv)


def register(sub) -> None:
    p = sub.add_parser("testbed", help="the shipped testbed model: train it from scratch, write its data as JSONL",
                       description="The testbed is a small LLaVA (CLIP vision tower + Llama decoder) trained on "
                                   "synthetic scenes; its checkpoint ships as package data and is the default "
                                   "--model.")
    tsub = p.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    tsub.add_parser("train", add_help=False, help="train a testbed checkpoint from scratch on the CPU "
                                                  "(`vtcompile testbed train --help` lists its options)")
    t = tsub.add_parser("data", help="write testbed splits as PNG images + JSONL (the format `vtcompile eval --data` "
                                     "reads)")
    t.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for <split>.jsonl and images/")
    t.add_argument("--split", action="append", choices=["train", "val", "test"],
                   help="split to write (repeatable; default: test)")
    t.add_argument("-n", type=int, default=500, help="samples per split (default 500)")
    t.add_argument("--seed", type=int, default=0, help="generator seed (default 0, the shipped model's)")
    t.add_argument("--force", action="store_true", help="replace an existing <split>.jsonl and images/<split>/ in "
                                                        "--out (refused without it)")
    t.set_defaults(func=cmd_testbed_data)
