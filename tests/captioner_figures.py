"""The issue's figures for a trained captioner (CapPa or CoCa) on a labelled dataset, printed as JSON:

    .venv/bin/python -m tests.captioner_figures runs/demo_cappa_check --dataset-root data/demo/fashion-mnist

- linear probe: scikit-learn LogisticRegression on frozen pooled image features (train split -> test split);
- zero-shot top-1 by caption scoring, parallel and autoregressive (captioners without a text tower) or with the
  contrastive head (CoCa);
- the share of greedy captions of test images that name the image's class.
"""

from __future__ import annotations

import argparse
import json

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from contrastive.eval.captioning import caption_classification_scores, caption_dataset, named_class
from contrastive.eval.features import encode_images
from contrastive.eval.labelled import open_classification_dataset
from contrastive.eval.loading import load_trained_model
from contrastive.eval.zeroshot import ZeroShotClassification, classification_metrics


def first(loader, count: int):
    seen = 0
    for images, captions, labels, keys in loader:
        yield images[: count - seen], captions, torch.as_tensor(labels)[: count - seen], keys
        seen += len(images)
        if seen >= count:
            return


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset-root", required=True)
    parser.add_argument("--probe-train", type=int, default=10000, help="train-split images for the probe")
    parser.add_argument("--captions", type=int, default=1000, help="test images to caption greedily")
    parser.add_argument("--autoregressive", action="store_true",
                        help="also score captions with teacher forcing (one decoder pass per prompt: slow on CPU)")
    args = parser.parse_args()
    device = torch.device("cpu")
    model, tokenizer, run = load_trained_model(args.checkpoint)
    test = open_classification_dataset(args.dataset_root, "test")
    train = open_classification_dataset(args.dataset_root, "train")
    figures: dict = {"checkpoint": run["checkpoint"], "step": run["step"]}

    train_features = encode_images(model, first(train.loader(model.cfg, 500), args.probe_train), device, normalize=False)
    test_features = encode_images(model, test.loader(model.cfg, 500), device, normalize=False)
    scaler = StandardScaler().fit(train_features.features.numpy())
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_features.features.numpy()),
                                                  train_features.labels.numpy())
    predictions = probe.predict(scaler.transform(test_features.features.numpy()))
    figures["linear_probe_acc1"] = float((predictions == test_features.labels.numpy()).mean())

    if hasattr(model, "encode_text"):
        figures["zeroshot_contrastive"] = ZeroShotClassification(None, args.dataset_root, "test").run(
            model, tokenizer, device)
    else:
        for mode in ("parallel", "autoregressive") if args.autoregressive else ("parallel",):
            scores, labels = caption_classification_scores(model, tokenizer, test.classnames, test.templates,
                                                           test.loader(model.cfg, 250), device, mode=mode)
            figures[f"zeroshot_caption_scoring_{mode}"] = classification_metrics(scores, labels)

    records = caption_dataset(model, tokenizer, test.loader(model.cfg, 250), device, args.captions,
                              model.context_length)
    named = sum(named_class(r["caption"], test.classnames) == r["label"] for r in records)
    figures["greedy_captions_naming_class"] = named / len(records)
    figures["greedy_caption_examples"] = [f"{test.classnames[r['label']]}: {r['caption']}" for r in records[:5]]
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
