"""Evaluate a restored digits model on the held-out digits: the evaluation step of the CI templates
(infra/ci/github-restore-evaluate.yml, infra/ci/gitlab-ci.yml) for the demo's model. Put your own in its place.

    python examples/evaluate.py --model checkpoint/digits.keras --report evaluation/report.json

A full model (``.keras``) is loaded as it is; weights alone (``.weights.h5``) go into the examples' digits model.
The report is JSON: the model file, the test loss and accuracy, the number of digits.
"""

import argparse
import json
import sys
from pathlib import Path

import keras

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits import digits, get_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model file (the restore step's model-path output)")
    p.add_argument("--report", help="write the results here as JSON")
    a = p.parse_args()
    if a.model.endswith(".weights.h5"):
        model = get_model()
        model.load_weights(a.model)
    else:
        model = keras.models.load_model(a.model)
    _, (x_test, y_test) = digits()
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"{Path(a.model).name}: test accuracy {accuracy:.4f} (loss {loss:.4f}) on {len(y_test)} held-out digits")
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps({"model": a.model, "loss": loss, "accuracy": accuracy,
                                              "examples": len(y_test)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
