"""``python -m models``: build the bnfold model zoo or the README's demo model.

python -m models demo [-o PATH]                   # rebuild models/demo_resnet.onnx
python -m models build OUT_DIR [--only NAME ...] [--quick]
python -m models list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description="Build the bnfold model zoo.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="rebuild the bundled demo model models/demo_resnet.onnx")
    demo.add_argument("-o", "--output", type=Path, default=None, help="write the demo here instead")
    build = commands.add_parser("build", help="export the zoo into OUT_DIR and write OUT_DIR/manifest.json")
    build.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    build.add_argument("--only", nargs="+", metavar="NAME", help="build only these models (see `list`)")
    build.add_argument(
        "--quick",
        action="store_true",
        help="one file per exporter (TorchScript opset 17, dynamo opset 18) instead of the matrix",
    )
    commands.add_parser("list", help="list the zoo's models and the export matrix")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from models.demo import DEMO_PATH, build_demo

        path = build_demo(args.output or DEMO_PATH)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        return 0
    from models.build import MANIFEST_NAME, build_zoo, zoo_matrix
    from models.zoo import ZOO

    if args.command == "list":
        for entry in ZOO:
            print(f"{entry.name:18} {entry.family:12} {entry.note}")
        print("variants:", ", ".join(variant.tag for variant in zoo_matrix()))
        return 0
    known = {entry.name for entry in ZOO}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    records = build_zoo(args.out_dir, only=args.only, quick=args.quick)
    print(f"wrote {len(records)} models and {args.out_dir / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
