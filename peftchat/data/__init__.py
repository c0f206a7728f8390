"""Conversation data: raw records -> normalized conversations -> training samples -> batches.

* `sources.load_records`    JSON/JSONL files, saved dataset dirs or hub names through `datasets`,
                             malformed lines named by file:line
* `readers.normalize`       moss / chatglm / messages / sharegpt records -> `Conversation`
* `peftchat.formats`        the conversation formats (`data.collator`): `Conversation` -> samples
                             (and, for inference, chat prompts)
* `pipeline.build_datasets` recipe + tokenizer -> `DataBundle(train, eval, report)`, cached
* `batching.plan_batches`, `batching.collate`   deterministic batch plans and batch tensors
* `batching.Batches`        plan -> fetch -> collate -> loss targets, the loop's one batch iterator
* `inspect.dump_samples`, `inspect.inspect_samples`   `peftchat data dump|inspect`

Submodules are imported on use; importing this package loads nothing heavy.
"""
