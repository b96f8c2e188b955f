"""Settings of the training data pipeline that are not model or optimiser settings.

The sequence length (``TrainConfig.max_seq_length``), the length-grouped order
(``TrainConfig.group_by_length``), the tile size, tokens per tile, template and tile limits
(``ModelConfig``) are read from the main config; everything here only changes how data is read,
packed and checked.
"""
from __future__ import annotations

import dataclasses

from internvl_jax.data.images import DEFAULT_MAX_PIXELS

BAD_SAMPLE_POLICIES = ("skip", "resample", "raise")
BAD_LINE_POLICIES = ("skip", "raise")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data pipeline settings.

    Attributes:
        meta_path: the official meta JSON listing the data sets (local path or gs://).
        tokenizer_path: folder with the checkpoint's tokenizer files.
        seed: drives the order of every epoch, resampling and augmentation.
        num_epochs: passes over the data; 0 repeats forever (every epoch in a new order).
        shuffle: a new random order every epoch; off keeps the meta-file order.
        megabatch_size: samples per length-sorted group when the length-grouped order is on.
        packing_window: consecutive samples packed together; a larger window packs tighter but
            moves samples further from their place in the order.
        max_tiles_per_row: tile cap of one packed row (a process batch holds rows × this many
            tiles); 0 means max_seq_length // tokens per tile, which can never bind.
        num_workers: grain worker processes that decode, tile and tokenise; 0 works in-process.
        worker_buffer_size: batches each worker prepares ahead.
        on_bad_sample: what a sample that cannot be trained correctly (bad image, placeholder
            mismatch, image tokens cut by truncation, ...) does: "skip" drops it with a count and
            a log line, "resample" puts a random other sample in its place (up to
            max_resample_tries), "raise" stops with an error naming file and line.
        max_resample_tries: replacement draws per bad sample before its slot stays empty.
        on_bad_line: a JSONL line that does not parse into a sample: "raise" (file:line error
            when the data is opened) or "skip" (counted, logged).
        max_pixels: images whose header declares more pixels are refused (decompression bombs).
        exif_transpose: apply EXIF orientation (the reference ignores it).
        alpha_on_white: composite transparency on white (the reference keeps the stored RGB).
        use_annotation_sizes: plan tile counts from the JSONL width/height when present instead
            of reading image headers; an image whose real size gives another tile count is
            dropped (reason "size_mismatch"). Ignored when exif_transpose is on.
    """

    meta_path: str = ""
    tokenizer_path: str = ""
    seed: int = 0
    num_epochs: int = 0
    shuffle: bool = True
    megabatch_size: int = 256
    packing_window: int = 128
    max_tiles_per_row: int = 0
    num_workers: int = 2
    worker_buffer_size: int = 2
    on_bad_sample: str = "skip"
    max_resample_tries: int = 10
    on_bad_line: str = "raise"
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    alpha_on_white: bool = False
    use_annotation_sizes: bool = True

    def __post_init__(self):
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {self.on_bad_sample!r}")
        if self.on_bad_line not in BAD_LINE_POLICIES:
            raise ValueError(f"on_bad_line must be one of {BAD_LINE_POLICIES}, got {self.on_bad_line!r}")
        for name in ("megabatch_size", "packing_window", "max_pixels", "worker_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_epochs", "max_tiles_per_row", "num_workers", "max_resample_tries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    def tiles_per_row(self, seq_len: int, tokens_per_tile: int) -> int:
        """Tile cap of a packed row: max_tiles_per_row, else all a row of seq_len tokens can hold."""
        return self.max_tiles_per_row or seq_len // tokens_per_tile
