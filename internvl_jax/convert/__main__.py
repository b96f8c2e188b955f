"""python -m internvl_jax.convert {import,export}: HF checkpoints <-> internvl-jax checkpoints.

  import SRC DST   HF folder (official `internvl_chat` or transformers' `internvl` layout, local or
                   gs://) -> internvl-jax checkpoint (model_config.json + params/, orbax), restorable on
                   any mesh; the folder's tokenizer, config and remote-code files are kept in DST/source/.
  export SRC DST   internvl-jax checkpoint (or any HF folder, to change its layout) -> HF folder in the
                   official layout or transformers' native one, LoRA merged, sharded safetensors + index +
                   config.json + tokenizer files; written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from etils import epath

from internvl_jax.config import MeshConfig

SOURCE_SUBDIR = "source"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5·10⁹ bytes (decimal units, as transformers' max_shard_size)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    return int(float(match[1]) * 1000 ** " KMGT".index(match[2].upper() or " "))


def parse_mesh(text: str) -> MeshConfig:
    """'data,fsdp,tensor' sizes, e.g. '1,-1,1' (-1 = the remaining devices)."""
    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"mesh must be three sizes 'data,fsdp,tensor', got {text!r}") from e
    return MeshConfig(data=data, fsdp=fsdp, tensor=tensor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m internvl_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src", help="source directory (local path or gs://...)")
    common.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    common.add_argument("--dtype", default=None,
                        help="dtype of the written parameters (bfloat16, float32, float16); default: keep")
    common.add_argument("--mesh", type=parse_mesh, default=None,
                        help="load sharded over a device mesh 'data,fsdp,tensor' (e.g. 1,-1,1); default: one device")
    common.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    imp = sub.add_parser("import", parents=[common], help="HF folder -> internvl-jax checkpoint",
                         description="Import an HF InternVL checkpoint (official or transformers layout).")
    imp.add_argument("--lora", choices=("merge", "keep"), default="merge",
                     help="PEFT adapters in the checkpoint: merge into the weights (default) or keep as adapters")
    imp.add_argument("--img-context-token-id", type=int, default=None,
                     help="id of <IMG_CONTEXT> when the folder has no tokenizer")
    exp = sub.add_parser("export", parents=[common], help="internvl-jax checkpoint (or HF folder) -> HF folder",
                         description="Export to an HF folder; LoRA adapters are merged.")
    exp.add_argument("--layout", choices=("official", "hf"), required=True,
                     help="official: InternVL remote-code names; hf: transformers' InternVLForConditionalGeneration")
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                     help="largest safetensors shard (default 5GB)")
    exp.add_argument("--tokenizer", default=None,
                     help="folder whose tokenizer files to include (default: the source's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Heavy imports (jax, the model) only after argument parsing, so --help is instant.
    from internvl_jax.sharding import make_mesh
    mesh = make_mesh(args.mesh) if args.mesh is not None else None
    src, dst = epath.Path(args.src), epath.Path(args.dst)
    (_import if args.command == "import" else _export)(src, dst, args, mesh)
    return 0


def _import(src: epath.Path, dst: epath.Path, args, mesh) -> None:
    from internvl_jax.convert import native
    from internvl_jax.convert.export import SOURCE_FILES, TOKENIZER_FILES, staged_directory
    from internvl_jax.pretrained import load_pretrained
    model, _, _ = load_pretrained(src, mesh, args.dtype, args.img_context_token_id, lora=args.lora)
    with staged_directory(dst, args.overwrite) as tmp:
        native.save_native(model, tmp)
        kept = tmp / SOURCE_SUBDIR
        kept.mkdir()
        for name in ("config.json",) + TOKENIZER_FILES + SOURCE_FILES + tuple(p.name for p in src.glob("*.py")):
            if (src / name).exists():
                (src / name).copy(kept / name)


def _export(src: epath.Path, dst: epath.Path, args, mesh) -> None:
    from internvl_jax.convert import native
    from internvl_jax.convert.export import export_model
    from internvl_jax.data.tokenizer import load_tokenizer
    from internvl_jax.pretrained import load_pretrained
    if native.is_native(src):
        model, source = native.load_native(src, mesh), src / SOURCE_SUBDIR
        source = source if source.exists() else None
    else:
        model, source = load_pretrained(src, mesh)[0], src
    tokenizer_dir = args.tokenizer or source
    tokenizer = load_tokenizer(tokenizer_dir, required_tokens=()) if tokenizer_dir is not None else None
    export_model(model, dst, args.layout, tokenizer=tokenizer, source_dir=source, dtype=args.dtype,
                 max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
