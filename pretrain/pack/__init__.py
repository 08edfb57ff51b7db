"""Tokenize a corpus and pack it into fixed-length token blocks for pretraining.

Every document becomes BOS + ids + EOS (a tokenizer.json tokenizer: its own BOS/EOS from
tokenizer_config.json, ids + EOS when it has no BOS); documents are concatenated and cut into blocks of exactly
--block-size tokens (blocks span document boundaries, as the group_texts step of HF run_clm does).
With --keep-documents a document that fits a block is never cut: documents go whole into blocks, first
fit (pack/layout.py), which a long-context stage wants (--block-size 16384). The result is a directory
of uint16/uint32 token shards, an index and a manifest (tokenizer fingerprint, block size, sources with
sizes and sha256, counts, the document length distribution) that `zhllama train` memory-maps.

How it stays fast, bounded and safe:
  * Inputs are cut into work units (--unit-mb of text, on document boundaries; a .gz file is one unit;
    a parquet/Arrow file, or a dataset saved with save_to_disk, is cut into row ranges on its row groups /
    record batches; a hf:// Hub dataset into its stream's shards) and text units into ~1 MB slices that
    worker processes tokenize with SentencePiece. Memory is bounded by the slices in flight, whatever
    the corpus size. The same documents as JSON lines or as a dataset give the same shards.
  * Each unit becomes one shard, written to a temp name, renamed when complete, and recorded in
    progress.jsonl. An interrupted pack resumes with the units that are not recorded.
  * The tokens after a unit's last full block go, in unit order, into one tail shard per split, so the
    corpus loses only one final partial block per split (counted in the manifest).
  * manifest.json is written last, atomically. Re-running with the same tokenizer, options and
    unchanged input files does nothing; a changed input re-packs only that file's units.
  * Over a complete pack the new one is built beside it (.OUT.pack-next, unchanged units hard-linked)
    and swapped in when complete: the old pack stays usable until then, whatever happens (full disk,
    Ctrl-C). One run per --out (a second is refused naming the first); a line longer than
    --max-line-mb is refused naming it.
  * The validation split is by document: a hash of the document's text decides, so it is the same on
    every run and machine, and identical documents never straddle train and validation.

examples:
  zhllama data pack --tokenizer out/merged --input corpus/ --block-size 512 --out data/packed
  zhllama data pack --tokenizer out/merged --input 'web/*.jsonl.gz' --text-field content \\
      --out data/web --workers 16 --validation-ratio 0.001
  zhllama data pack --tokenizer out/merged --input data/wiki_saved/ --split train --out data/wiki
  zhllama data pack --tokenizer out/merged --input hf://Salesforce/wikitext/wikitext-2-raw-v1 --out data/wt2
"""

# The package, one job a module: `plan` (input files -> units -> slices; the validation split),
# `settings` (the tokenizer, and what keys a pack), `workers` (the tokenizing processes), `writer`
# (shard files, progress records, the output directory), `packer` (one run), `cli` (the command).
# The docstring above is the command's --help description.

from .cli import add_arguments, run
from .packer import Packer
from .plan import is_validation_doc, plan_file
from .settings import Tokenizer, load_tokenizer, make_settings

__all__ = ["Packer", "Tokenizer", "add_arguments", "is_validation_doc", "load_tokenizer", "make_settings",
           "plan_file", "run"]
