"""python -m llava_mlx train --model_name_or_path lmsys/vicuna-7b-v1.5 --vision_tower ... (train.py's arguments)"""

import json
import sys

from . import command


@command
def main(argv=None) -> int:
    from ..train.arguments import parse
    from ..train.run import run

    args = parse(sys.argv[1:] if argv is None else argv)
    summary = run(args)
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0
