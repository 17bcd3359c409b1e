"""Data: text corpora -> packed token rows -> batches, without TensorFlow.

    sources.py      find, read, split (train/validation) and pack the corpus files
    fingerprint.py  content digests of the files (what datasets and resumes are keyed by)
    sft.py          prompt/response JSONL examples, loss on the response only
    builder.py      the TFDS builder that stores the packed rows (array_record)
    dataset.py      grain iterators over them: ``make_data`` -> ``Data`` (one process's rows)
    tokenizers.py   byte and GPT-2 tokenizers

Imports run one way: sources <- sft <- builder <- dataset.
"""
