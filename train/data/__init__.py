"""Everything between a file on disk and a batch of training rows.

- formats.py: reading the data files (pretraining text, SFT conversations, DPO pairs); errors name FILE:LINE
- records.py: the records those files hold, as small dataclasses
- tokenizer.py: the byte-level BPE tokenizer (train, save, load) and what a checkpoint's tokenizer must match
- packing.py: documents -> one token stream -> fixed-length rows with document masks
- chat_masks.py: conversations rendered with the chat template, and which tokens are trained on
- finetune.py: SFT and DPO rows (padding, packing, image tokens)
- batches.py: the seeded, resumable, rank-sharded batch order, and collation
- images.py: image loading and preprocessing for the VLM
- synthetic.py, synthetic_images.py: the embedded data generators (nothing is downloaded)
"""
