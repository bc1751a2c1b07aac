"""Sample-quality commands: train-classifier, score."""

from __future__ import annotations

import json
from pathlib import Path

from vqkit import distributed
from vqkit.cli.args import add_config_args, config_args, config_from_args, field_help
from vqkit.cli.common import DATA_HELP, RUN_CHOICES, announce_placement, checkpoint_arg, distributed_args
from vqkit.data.datasets import load_dataset
from vqkit.inspect.score import ScoreSettings, score_chain, table
from vqkit.nn.classifier import ClassifierConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.training.classifier import (
    ClassifierTrainConfig,
    accuracy,
    classifier_config_for,
    train_classifier,
)

# ClassifierConfig's fields that the data decide.
_FROM_DATA = ("in_channels", "num_classes")
_WIDTHS = ClassifierConfig().widths


def cmd_train_classifier(args) -> None:
    config = config_from_args(ClassifierTrainConfig, args)
    if args.resume and (Path(args.out) / "config.json").exists():
        model_config = ClassifierConfig.from_dict(ckpt.read_config(args.out, kind="classifier")["model"])
        train = None
    else:
        train = load_dataset(config.data, "train", image_size=config.image_size)
        sizes = config_args(ClassifierConfig, args)
        model_config = classifier_config_for(train, **sizes, widths=args.widths or _WIDTHS)
    announce_placement(config)
    result = train_classifier(args.out, model_config, config, resume=args.resume, dataset=train,
                              tensorboard=not args.no_tensorboard)
    if not distributed.is_main():
        return
    classifier, _ = ckpt.load_classifier(args.out)
    test = load_dataset(config.data, "test", image_size=config.image_size)
    images, labels = test.batch(_all(test))
    acc = accuracy(classifier, images, labels)
    checkpoint = ckpt.latest_checkpoint(args.out)
    ckpt.save_eval(args.out, {"step": checkpoint.step, "fingerprint": checkpoint.state.get("fingerprint"),
                              "data": test.spec, "split": "test", "images": len(test), "accuracy": acc})
    why = "time budget reached" if result.stopped_by_time else "done"
    print(f"{why}: step {result.step} in {result.seconds:.0f} s; test accuracy {100 * acc:.2f}% "
          f"on {len(test)} images of {test.spec}")


def _all(dataset):
    import torch

    return torch.arange(len(dataset))


def cmd_score(args) -> None:
    record = score_chain(args.runs, args.classifier, args.out, config_from_args(ScoreSettings, args),
                         progress=not args.json, which=args.checkpoint)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(table(record))
        print(f"wrote {args.out / 'score.json'} and {args.out / 'score.png'}")


def add_parsers(sub) -> None:
    tc = sub.add_parser("train-classifier", help="train the image classifier that vqkit score and "
                                                  "vqkit sample --reject use, on a data set's training split")
    tc.add_argument("-o", "--out", required=True, type=Path, help="classifier run folder")
    add_config_args(tc, ClassifierTrainConfig, choices=RUN_CHOICES)
    model = tc.add_argument_group("the classifier's model (with --resume, the run's own)")
    add_config_args(model, ClassifierConfig, exclude=(*_FROM_DATA, "widths"))
    model.add_argument("--widths", type=int, nargs="+", metavar="W",
                       help=field_help(ClassifierConfig)["widths"] + f" (default: {' '.join(map(str, _WIDTHS))})")
    tc.add_argument("--resume", action="store_true")
    tc.add_argument("--no-tensorboard", action="store_true")
    distributed_args(tc)
    tc.set_defaults(func=cmd_train_classifier)
    tc.description = f"--data: {DATA_HELP}"

    sc = sub.add_parser("score", help="score samples against real images in the feature space of a "
                                      "classifier: accuracy, CAS, Fréchet distance, precision, recall")
    sc.add_argument("runs", nargs="+", type=Path, metavar="PRIOR",
                    help="prior run folder(s), top-first as vqkit sample takes them")
    sc.add_argument("--classifier", required=True, type=Path, help="classifier run (vqkit train-classifier)")
    sc.add_argument("-o", "--out", required=True, type=Path, help="folder for score.json and score.png")
    add_config_args(sc, ScoreSettings, flags={"n": "-n", "k": "-k"})
    sc.add_argument("--json", action="store_true", help="print score.json instead of the table")
    checkpoint_arg(sc)
    sc.set_defaults(func=cmd_score)
