"""Write the `word` miniature's problems as GSM8K-format JSONL files: a stand-in for a user's own data set.

    python studies/word_gsm8k.py OUT_DIR --train 20000 --test 500

OUT_DIR/train.jsonl and OUT_DIR/test.jsonl hold one {"question", "answer"} object per line, the answer being the
worked steps and a last line "#### N", as in GSM8K. The two files come from the generator's hash-disjoint train and
test splits, so no test question appears in the train file. The README's "Your own data" section was measured on
these files.
"""

import argparse
import json
from pathlib import Path

from trb.tasks import SETTINGS


def gsm8k_record(problem) -> dict:
    steps = problem.solution.rsplit("\n", 1)[0]  # the worked lines, without the closing \boxed{N}
    return {"question": problem.question, "answer": f"{steps}\n#### {problem.answer}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("test", args.test)):
        problems = SETTINGS["word"](split, count, args.seed)
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(gsm8k_record(p)) + "\n" for p in problems))
        print(f"{args.out / f'{split}.jsonl'}: {len(problems)} problems")


if __name__ == "__main__":
    main()
