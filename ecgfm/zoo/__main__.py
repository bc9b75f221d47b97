"""``python -m ecgfm.zoo KIND CHECKPOINT OUT_DIR [options]``: import a published checkpoint (see docs/ZOO.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _class_names(value: str | None) -> list[str] | None:
    """``--class-names``: a JSON file (a list of names, or an object with one under ``classes``), a text file (one
    name a line) or a comma-separated list.

    Raises:
        ValueError: naming the file: not UTF-8 text, not valid JSON, or JSON without a list of names (the importer
            refuses names given twice or a count other than the head's outputs).
    """
    if value is None:
        return None
    p = Path(value)
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--class-names {p}: not a UTF-8 text file ({exc})") from exc
        if p.suffix == ".json":
            try:
                names = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--class-names {p}: not valid JSON: {exc}") from exc
            if isinstance(names, dict):
                names = names.get("classes")
            if not isinstance(names, list):
                raise ValueError(f"--class-names {p}: expected a JSON list of class names (or an object with a "
                                 f"'classes' list), got {type(names).__name__}")
            return [str(n) for n in names]
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [n.strip() for n in value.split(",") if n.strip()]


def _int_list(flag: str, value: str | None) -> list[int] | None:
    """A comma-separated list of whole numbers (``--conv-stride 5,2,2``), or None when not given.

    Raises:
        ValueError: an entry that is not a whole number, naming the option.
    """
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated whole numbers (e.g. 5,2,2), got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from ecgfm.zoo.importer import KINDS, NOT_IMPORTABLE

    kinds = "\n".join(f"  {k}: {s.title}; options: " + "; ".join(f"{o} ({h})" for o, h in s.options.items())
                      for k, s in KINDS.items())
    ap = argparse.ArgumentParser(
        prog="python -m ecgfm.zoo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Import a published ECG foundation model checkpoint (a local file) as an ecgfm encoder "
                    "folder (or, with --classifier, a classifier folder).",
        epilog=f"kinds:\n{kinds}\n\nexample: python -m ecgfm.zoo stmem st_mem_vit_base.pth encoders/stmem_base")
    ap.add_argument("kind", choices=sorted({*KINDS, *NOT_IMPORTABLE}))   # ecg_fm: refused with its reason
    ap.add_argument("checkpoint", help="local weights file (.pth / .pt / .bin read with weights_only, .safetensors)")
    ap.add_argument("out_dir", help="artifact folder to create")
    ap.add_argument("--num-heads", type=int, help="stmem: attention heads (not in the weights; without it the ViT-S / "
                                                  "ViT-B shapes are assumed to have 6 / 12 heads, with a warning)")
    ap.add_argument("--leads", help="comma-separated canonical lead names of the model's input channels, in order "
                                    "(each once)")
    ap.add_argument("--checkpoint-leads", dest="checkpoint_leads",
                    help="stmem: comma-separated lead of each of the checkpoint's 12 lead embeddings (its training "
                         "channel order, e.g. HEEDB's I,II,III,aVR,aVF,aVL,V1,V2,V3,V4,V5,V6)")
    ap.add_argument("--stride", type=int, help="ecgfounder: stage downsampling stride (default 2)")
    ap.add_argument("--use-bn", dest="use_bn", action="store_true", default=None,
                    help="ecgfounder: the model uses BatchNorm (default: inferred)")
    ap.add_argument("--no-bn", dest="use_bn", action="store_false", help="ecgfounder: no BatchNorm")
    ap.add_argument("--window-seconds", type=float, help="ecgfounder / hubert_ecg: input window in seconds")
    ap.add_argument("--config", help="hubert_ecg: the model's config.json (default: the one beside CHECKPOINT)")
    ap.add_argument("--conv-stride", help="hubert_ecg: comma-separated feature-encoder strides")
    ap.add_argument("--stable-layer-norm", dest="stable_layer_norm", action="store_true", default=None,
                    help="hubert_ecg: pre-norm transformer layers")
    ap.add_argument("--post-norm", dest="stable_layer_norm", action="store_false",
                    help="hubert_ecg: post-norm transformer layers")
    ap.add_argument("--feat-extract-norm", choices=("group", "layer"),
                    help="hubert_ecg: feature-encoder normalisation (needed for a single-convolution feature encoder "
                         "without config.json)")
    ap.add_argument("--classifier", action="store_true", help="write a classifier (encoder + the checkpoint's head)")
    ap.add_argument("--class-names", help="classifier: JSON list file, text file (one a line) or comma list")
    act = ap.add_mutually_exclusive_group()
    act.add_argument("--multilabel", dest="multilabel", action="store_const", const=True, default=None,
                     help="classifier: sigmoid outputs, independent labels (a head trained with binary "
                          "cross-entropy; ecgfounder's default)")
    act.add_argument("--multiclass", dest="multilabel", action="store_const", const=False,
                     help="classifier: softmax outputs, one class per record (a head trained with cross-entropy, "
                          "ST-MEM's recipe); stmem needs --multilabel or --multiclass")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from ecgfm.zoo.base import ZooImportError
    from ecgfm.zoo.importer import KINDS, NOT_IMPORTABLE, import_classifier, import_encoder

    args = build_parser().parse_args(argv)
    if args.kind not in KINDS:
        print(f"error: {args.kind}: cannot be imported: {NOT_IMPORTABLE[args.kind]}", file=sys.stderr)
        return 1
    known = KINDS[args.kind].options
    try:
        conv_stride = _int_list("--conv-stride", args.conv_stride)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    given = {"num_heads": args.num_heads, "stride": args.stride, "use_bn": args.use_bn,
             "window_seconds": args.window_seconds, "config": args.config,
             "stable_layer_norm": args.stable_layer_norm,
             "feat_extract_norm": args.feat_extract_norm,
             "conv_stride": conv_stride,
             "leads": None if args.leads is None else [x.strip() for x in args.leads.split(",") if x.strip()],
             "checkpoint_leads": None if args.checkpoint_leads is None else
             [x.strip() for x in args.checkpoint_leads.split(",") if x.strip()]}
    misplaced = sorted(k for k, v in given.items() if v is not None and k not in known)
    if misplaced:
        print(f"error: option(s) {', '.join('--' + k.replace('_', '-') for k in misplaced)} do not apply to "
              f"{args.kind}", file=sys.stderr)
        return 2
    if not args.classifier and (args.multilabel is not None or args.class_names is not None):
        # an encoder has no outputs to name or activate: saying so beats silently dropping the option
        flag = "--class-names" if args.class_names is not None else \
            ("--multilabel" if args.multilabel else "--multiclass")
        print(f"error: {flag} applies to a classifier import only (add --classifier)", file=sys.stderr)
        return 2
    options = {k: v for k, v in given.items() if v is not None}
    try:
        if args.classifier:
            out = import_classifier(args.kind, args.checkpoint, args.out_dir,
                                    class_names=_class_names(args.class_names), multilabel=args.multilabel,
                                    overwrite=args.overwrite, **options)
        else:
            out = import_encoder(args.kind, args.checkpoint, args.out_dir, overwrite=args.overwrite, **options)
    except (ZooImportError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {'classifier' if args.classifier else 'encoder'} {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
